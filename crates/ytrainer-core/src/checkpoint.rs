//! Resumable checkpoints: trainable parameters and AdamW moments keyed by module path, plus the trainer's
//! position, written to a temporary directory and renamed into place so a crash never leaves a half-written
//! checkpoint that `--resume` would trust.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::optim::AdamWState;

/// Checkpoint I/O errors.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Filesystem problem.
    #[error("{path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Corrupt or foreign file.
    #[error("{path}: {message}")]
    Format {
        /// File.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// Refusing to persist non-finite weights.
    #[error(
        "refusing to write checkpoint {path}: parameter `{param}` contains NaN or infinite values"
    )]
    NonFinite {
        /// Checkpoint directory.
        path: PathBuf,
        /// Offending parameter.
        param: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where training stood when the checkpoint was written.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed (the next step to run).
    pub step: usize,
    /// Total planned steps.
    pub total_steps: usize,
    /// Steps skipped for non-finite values so far.
    pub skipped_steps: usize,
    /// Supervised tokens trained so far.
    pub tokens_trained: u64,
    /// Seed the data plan was built from (must match on resume).
    pub seed: u64,
    /// The resolved config's training-relevant part as canonical JSON (must match on resume).
    pub config_fingerprint: String,
    /// The best evaluation during training so far (by `[eval] metric_for_best_model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<BestSoFar>,
    /// Evaluations since the last one that improved the best metric by more than the early-stopping threshold.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub evals_without_improvement: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The best evaluation of a run (transformers' `best_metric` / `best_model_checkpoint`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BestSoFar {
    /// Optimizer steps done when it was measured.
    pub step: usize,
    /// The `eval.jsonl` key compared (`eval_loss`, ...).
    pub metric: String,
    /// Its value.
    pub value: f64,
    /// The checkpoint written at that step, if one was (never pruned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
}

/// Tensors by name: shape and f32 values.
pub type TensorMap = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Trainable parameter values by module path.
pub fn trainable_params<M: Module>(model: &M) -> TensorMap {
    struct V {
        path: Vec<String>,
        out: TensorMap,
    }
    impl ModuleVisitor for V {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.is_require_grad() {
                return;
            }
            let t = param.val();
            let dims = t.dims().to_vec();
            let data = t
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap_or_default();
            self.out.insert(self.path.join("."), (dims, data));
        }
    }
    let mut v = V {
        path: Vec::new(),
        out: BTreeMap::new(),
    };
    model.visit(&mut v);
    v.out
}

/// Replaces trainable parameters by the values in `values` (by path). Every trainable parameter must be present
/// with the same shape: a checkpoint from another model or adapter layout is an error, not a partial load.
pub fn load_trainable<M: Module>(
    model: M,
    values: &TensorMap,
    file: &Path,
) -> Result<M, CheckpointError> {
    struct L<'a> {
        path: Vec<String>,
        values: &'a TensorMap,
        error: Option<String>,
        used: usize,
    }
    impl ModuleMapper for L<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if !param.is_require_grad() || self.error.is_some() {
                return param;
            }
            let path = self.path.join(".");
            let Some((dims, data)) = self.values.get(&path) else {
                self.error = Some(format!("parameter `{path}` is missing"));
                return param;
            };
            let (id, tensor, mapper) = param.consume();
            if dims.as_slice() != tensor.dims().as_slice() {
                self.error = Some(format!(
                    "parameter `{path}` has shape {dims:?} in the checkpoint but {:?} in the model",
                    tensor.dims()
                ));
                return Param::from_mapped_value(id, tensor, mapper);
            }
            self.used += 1;
            let device = tensor.device();
            let shape: [usize; D] = tensor.dims();
            let t: Tensor<D> = Tensor::from_data(TensorData::new(data.clone(), shape), &device);
            Param::from_mapped_value(id, t.require_grad(), mapper)
        }
    }
    let mut l = L {
        path: Vec::new(),
        values,
        error: None,
        used: 0,
    };
    let model = model.map(&mut l);
    if let Some(e) = l.error {
        return Err(CheckpointError::Format {
            path: file.to_path_buf(),
            message: format!(
                "{e}; the checkpoint was written for a different model or adapter configuration"
            ),
        });
    }
    if l.used != values.len() {
        return Err(CheckpointError::Format {
            path: file.to_path_buf(),
            message: format!(
                "checkpoint holds {} tensors but the model has {} trainable parameters; \
                 resume with the same model and adapter configuration",
                values.len(),
                l.used
            ),
        });
    }
    Ok(model)
}

fn write_safetensors(path: &Path, tensors: &TensorMap) -> Result<(), CheckpointError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, (dims, data))| {
            let b: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (k.clone(), dims.clone(), b)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(k, dims, b)| {
            let v = TensorView::new(Dtype::F32, dims.clone(), b).map_err(|e| {
                CheckpointError::Format {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                }
            })?;
            Ok((k.clone(), v))
        })
        .collect::<Result<_, CheckpointError>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| CheckpointError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads an f32 safetensors file written by [`write_safetensors`].
pub fn read_safetensors(path: &Path) -> Result<TensorMap, CheckpointError> {
    let buf = fs::read(path).map_err(io(path))?;
    let st = safetensors::SafeTensors::deserialize(&buf).map_err(|e| CheckpointError::Format {
        path: path.to_path_buf(),
        message: format!("not a valid safetensors file ({e})"),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::Format {
                path: path.to_path_buf(),
                message: format!("tensor `{name}` is {:?}, expected F32", view.dtype()),
            });
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, (view.shape().to_vec(), data));
    }
    Ok(out)
}

/// Writes `dir` atomically: parameters, optimizer moments, trainer state, and any extra files produced by
/// `extra` (called with the temporary directory, e.g. to export a PEFT adapter next to the state).
pub fn save<M: Module>(
    dir: &Path,
    model: &M,
    optim: &AdamWState,
    state: &TrainerState,
    extra: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), CheckpointError> {
    let params = trainable_params(model);
    for (name, (_, data)) in &params {
        if data.iter().any(|x| !x.is_finite()) {
            return Err(CheckpointError::NonFinite {
                path: dir.to_path_buf(),
                param: name.clone(),
            });
        }
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io(parent))?;
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "checkpoint".into());
    let tmp = parent.join(format!(".{name}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    write_safetensors(&tmp.join("trainable.safetensors"), &params)?;
    let mut moments = BTreeMap::new();
    for (k, (m, v)) in &optim.moments {
        let n = m.dims()[0];
        moments.insert(
            format!("{k}.exp_avg"),
            (vec![n], crate::loss::tensor_to_vec(m.clone())),
        );
        moments.insert(
            format!("{k}.exp_avg_sq"),
            (vec![n], crate::loss::tensor_to_vec(v.clone())),
        );
    }
    write_safetensors(&tmp.join("optimizer.safetensors"), &moments)?;
    // What the tensor files held when written: a resume refuses files changed since (edited, swapped, bit rot).
    let mut files = serde_json::Map::new();
    for name in ["trainable.safetensors", "optimizer.safetensors"] {
        let p = tmp.join(name);
        let bytes = fs::read(&p).map_err(io(&p))?;
        files.insert(name.into(), file_digest(&bytes).into());
    }
    let state_json = serde_json::json!({
        "writer": WRITER, "trainer": state, "optimizer_step": optim.step, "files": files,
    });
    let p = tmp.join("trainer_state.json");
    fs::write(
        &p,
        serde_json::to_string_pretty(&state_json).unwrap_or_default(),
    )
    .map_err(io(&p))?;
    extra(&tmp).map_err(|message| CheckpointError::Format {
        path: tmp.clone(),
        message,
    })?;
    // Durable before visible: the files and the temporary directory reach the disk before the rename makes the
    // checkpoint resumable, and the parent's entry after it (a power cut cannot leave a named, empty checkpoint).
    sync_dir_and_files(&tmp).map_err(io(&tmp))?;
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    fs::rename(&tmp, dir).map_err(io(dir))?;
    if let Some(parent) = dir.parent() {
        fs::File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(io(parent))?;
    }
    Ok(())
}

/// A fast, stable 64-bit hash of file contents (not cryptographic): the identity of a model file in the cache,
/// of a training file in the run fingerprint, and of a checkpoint's tensor files in its `trainer_state.json`.
pub fn content_hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = K ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h ^ v).wrapping_mul(K).rotate_left(29);
    }
    for &b in words.remainder() {
        h = (h ^ b as u64).wrapping_mul(K);
    }
    h ^ (h >> 32)
}

fn file_digest(bytes: &[u8]) -> String {
    format!("{:016x}{:016x}", content_hash(bytes), bytes.len())
}

/// fsyncs every file under `dir`, then `dir` itself.
fn sync_dir_and_files(dir: &Path) -> std::io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_file() {
            fs::File::open(e.path())?.sync_all()?;
        } else if t.is_dir() {
            sync_dir_and_files(&e.path())?;
        }
    }
    fs::File::open(dir)?.sync_all()
}

/// A loaded checkpoint.
pub struct Loaded {
    /// Trainable parameters by path.
    pub params: TensorMap,
    /// Optimizer moments.
    pub optim: AdamWState,
    /// Trainer position.
    pub state: TrainerState,
}

/// Reads a checkpoint directory written by [`save`].
pub fn load(dir: &Path, device: &Device) -> Result<Loaded, CheckpointError> {
    let sp = dir.join("trainer_state.json");
    let text = fs::read_to_string(&sp).map_err(io(&sp))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CheckpointError::Format {
            path: sp.clone(),
            message: format!("invalid JSON ({e})"),
        })?;
    let state: TrainerState =
        serde_json::from_value(v["trainer"].clone()).map_err(|e| CheckpointError::Format {
            path: sp.clone(),
            message: format!("field `trainer`: {e}"),
        })?;
    let optimizer_step = v["optimizer_step"].as_u64().unwrap_or(0);
    if let Some(files) = v["files"].as_object() {
        for (name, want) in files {
            let p = dir.join(name);
            let bytes = fs::read(&p).map_err(io(&p))?;
            if want.as_str() != Some(file_digest(&bytes).as_str()) {
                return Err(CheckpointError::Format {
                    path: p,
                    message: "its contents differ from what this checkpoint wrote (the digest in \
                              trainer_state.json): the file was modified or damaged after it was written; resume \
                              from another checkpoint"
                        .into(),
                });
            }
        }
    }
    let params = read_safetensors(&dir.join("trainable.safetensors"))?;
    let mp = dir.join("optimizer.safetensors");
    let raw = read_safetensors(&mp)?;
    let mut moments = BTreeMap::new();
    for (k, (_, m)) in &raw {
        if let Some(base) = k.strip_suffix(".exp_avg") {
            let Some((_, v)) = raw.get(&format!("{base}.exp_avg_sq")) else {
                return Err(CheckpointError::Format {
                    path: mp.clone(),
                    message: format!("`{base}.exp_avg_sq` missing"),
                });
            };
            let t = |d: &Vec<f32>| {
                Tensor::<1>::from_data(TensorData::new(d.clone(), [d.len()]), device)
            };
            moments.insert(base.to_string(), (t(m), t(v)));
        }
    }
    Ok(Loaded {
        params,
        optim: AdamWState {
            step: optimizer_step,
            moments,
        },
        state,
    })
}

/// The `writer` field of every `trainer_state.json` ytrainer writes: what tells its checkpoints from another
/// tool's (a Hugging Face Trainer's `checkpoint-N/trainer_state.json` has none).
pub const WRITER: &str = "ytrainer";

/// The trainer state of `dir` when it is a checkpoint ytrainer wrote (its `trainer_state.json` says
/// `"writer": "ytrainer"` and holds a trainer state); `None` for anything else.
pub fn ytrainer_state(dir: &Path) -> Option<TrainerState> {
    let text = fs::read_to_string(dir.join("trainer_state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    if v.get("writer")?.as_str()? != WRITER {
        return None;
    }
    serde_json::from_value(v.get("trainer")?.clone()).ok()
}

/// The checkpoints ytrainer wrote under `run_dir` (`checkpoint-N` with a ytrainer `trainer_state.json`), oldest
/// first. Other tools' `checkpoint-N` directories are not listed.
pub fn list(run_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            ytrainer_state(&e.path()).map(|_| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Removes the oldest checkpoints of this run beyond `keep` (0 = keep all) and returns them. Only checkpoints
/// ytrainer wrote with this run's `fingerprint` count: another tool's checkpoint or another run's is never
/// removed.
pub fn prune(run_dir: &Path, keep: usize, fingerprint: &str) -> Vec<PathBuf> {
    prune_keeping(run_dir, keep, fingerprint, None)
}

/// [`prune`] that never removes `best` (the best checkpoint): it counts towards `keep`, but the newest
/// checkpoint is kept besides an older best even when `keep` is 1 (as transformers does), so a run stays
/// resumable.
pub fn prune_keeping(
    run_dir: &Path,
    keep: usize,
    fingerprint: &str,
    best: Option<&Path>,
) -> Vec<PathBuf> {
    if keep == 0 {
        return Vec::new();
    }
    let same = |a: &Path, b: &Path| a == b || a.file_name() == b.file_name();
    let own: Vec<PathBuf> = list(run_dir)
        .into_iter()
        .filter(|(_, p)| ytrainer_state(p).is_some_and(|s| s.config_fingerprint == fingerprint))
        .map(|(_, p)| p)
        .collect();
    let has_best = best.is_some_and(|b| own.iter().any(|p| same(p, b)));
    let best_is_newest = best.is_some_and(|b| own.last().is_some_and(|p| same(p, b)));
    let own: Vec<PathBuf> = own
        .into_iter()
        .filter(|p| !best.is_some_and(|b| same(p, b)))
        .collect();
    let keep = match (has_best, best_is_newest) {
        // The best is the newest: it is the resumable one too.
        (true, true) => keep - 1,
        (true, false) => (keep - 1).max(1),
        _ => keep,
    };
    let mut removed = Vec::new();
    if own.len() > keep {
        for p in &own[..own.len() - keep] {
            if fs::remove_dir_all(p).is_ok() {
                removed.push(p.clone());
            }
        }
    }
    removed
}

/// Resolves `--resume DIR`: a checkpoint directory itself, or a run directory (its latest checkpoint).
pub fn resolve_resume(path: &Path) -> Result<PathBuf, CheckpointError> {
    if path.join("trainer_state.json").exists() {
        return Ok(path.to_path_buf());
    }
    list(path)
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| CheckpointError::Format {
            path: path.to_path_buf(),
            message:
                "no checkpoint here: expected a `checkpoint-N` directory (with trainer_state.json) \
                      or a run directory containing one"
                    .to_string(),
        })
}
