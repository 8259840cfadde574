//! The tokens view: one record of a run's data as training sees it, every supervised token with its loss and
//! entropy (from [`ytrainer_recipes::score::Scorer`], the numbers `ytrainer score` prints) and the weight a
//! strategy gives it (the plugin built from the registry, handed the same statistics the training step hands
//! it), and its telemetry zone.
//!
//! The model is the run's: before training its base model; after training its `final/` export (or, while it
//! trains, the newest `checkpoint-N/export`), as a full model or as a LoRA adapter on the base.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use ytrainer_core::loss::{LossFn, Registry};
use ytrainer_data::TrainOn;
use ytrainer_recipes::render::{RecordRender, render_record};
use ytrainer_recipes::score::{SampleScore, ScoreInput, ScoreSettings, Scorer, WeighError};

use crate::paths::{Root, resolve, resolve_path};
use crate::runs::toml_get;
use crate::{BoardError, Result};

/// Zone names, in the order of `ytrainer_core::step::zone`.
pub const ZONES: [&str; 4] = ["learned", "learning", "hard", "noise"];

/// Which model of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The base model, before training.
    Before,
    /// The trained model (final export, else the newest checkpoint's).
    After,
}

/// What the page asks for.
#[derive(Debug, Clone)]
pub struct TokenQuery {
    /// Run id, or the model, adapter and data ids when there is no run.
    pub run: Target,
    /// Sample index (as `ytrainer score` numbers them).
    pub record: usize,
    /// Model before or after training.
    pub stage: Stage,
    /// The training file (`false`) or the eval file (`true`).
    pub eval: bool,
    /// Strategy; `None`: the run's own.
    pub strategy: Option<String>,
    /// Strategy parameters; with the run's own strategy and none given, the run's.
    pub params: BTreeMap<String, f64>,
}

/// Whose tokens: a run's, or a model (+ adapter) on a data file, each an id inside the given folders.
#[derive(Debug, Clone)]
pub enum Target {
    /// A run id.
    Run(String),
    /// Ids of a model folder or `.gguf` file, an optional PEFT adapter folder and a data file.
    Model {
        /// The model.
        model: String,
        /// The adapter.
        adapter: Option<String>,
        /// The data file.
        data: String,
    },
}

/// Parses `name=value,name=value`.
pub fn parse_params(s: &str) -> Result<BTreeMap<String, f64>> {
    let mut m = BTreeMap::new();
    for kv in s.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            BoardError::bad(format!(
                "parameter `{kv}`: expected name=value, e.g. `center=6.2`"
            ))
        })?;
        let x: f64 = v.trim().parse().map_err(|_| {
            BoardError::bad(format!(
                "parameter `{kv}`: `{v}` is not a number; plugin parameters are numeric"
            ))
        })?;
        m.insert(k.trim().to_string(), x);
    }
    Ok(m)
}

impl TokenQuery {
    /// From `run`, `record`, `stage` (before|after), `split` (train|eval), `strategy`, `params`.
    pub fn from_query(q: &BTreeMap<String, String>) -> Result<TokenQuery> {
        let get = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
        let run = match (get("run"), get("model"), get("data")) {
            (Some(run), _, _) => Target::Run(run),
            (None, Some(model), Some(data)) => Target::Model {
                model,
                adapter: get("adapter"),
                data,
            },
            _ => {
                return Err(BoardError::bad(
                    "/api/tokens: give `run`, or `model` and `data` (and optionally `adapter`)",
                ));
            }
        };
        let record = match q.get("record").map(|s| s.trim()) {
            None | Some("") => 0,
            Some(r) => r.parse().map_err(|_| {
                BoardError::bad(format!(
                    "record `{r}`: expected a record number 0, 1, 2, ..."
                ))
            })?,
        };
        let stage = match q.get("stage").map(String::as_str) {
            None | Some("") | Some("after") => Stage::After,
            Some("before") => Stage::Before,
            Some(s) => {
                return Err(BoardError::bad(format!(
                    "stage `{s}`: expected `before` or `after` (training)"
                )));
            }
        };
        let eval = match q.get("split").map(String::as_str) {
            None | Some("") | Some("train") => false,
            Some("eval") => true,
            Some(s) => {
                return Err(BoardError::bad(format!(
                    "split `{s}`: expected `train` or `eval`"
                )));
            }
        };
        Ok(TokenQuery {
            run,
            record,
            stage,
            eval,
            strategy: q.get("strategy").filter(|s| !s.is_empty()).cloned(),
            params: parse_params(q.get("params").map(String::as_str).unwrap_or(""))?,
        })
    }
}

/// What a run's config says about its model and data.
#[derive(Debug, Clone)]
pub struct RunModel {
    /// The base model (before training).
    pub base: PathBuf,
    /// The trained model: `(model, adapter)`; `None` before anything was exported.
    pub trained: Option<(PathBuf, Option<PathBuf>)>,
    /// Whether the run trains a LoRA adapter (its base is then the reference model).
    pub lora: bool,
    /// `[data] train` / `eval`.
    pub train: Option<PathBuf>,
    /// See `train`.
    pub eval: Option<PathBuf>,
    /// `[data] max_seq_len`.
    pub max_seq_len: usize,
    /// `[data] train_on`.
    pub train_on: TrainOn,
    /// `[data.template_vars]`.
    pub template_vars: serde_json::Map<String, Value>,
    /// `[loss] name`.
    pub loss: String,
    /// `[loss.params]`.
    pub loss_params: BTreeMap<String, f64>,
    /// `[loss] zone_borders`.
    pub zone_borders: [f64; 3],
    /// `[loss] reference_model`.
    pub reference_model: Option<PathBuf>,
}

fn exported(dir: &Path) -> bool {
    dir.join("config.json").is_file() || dir.join("adapter_config.json").is_file()
}

/// Reads a run's `config.resolved.toml` (through `root`, so it lies inside the given folders).
pub fn run_model(root: &Root, dir: &Path) -> Result<RunModel> {
    let bytes = root.read(dir, "config.resolved.toml")?.ok_or_else(|| {
        BoardError::unusable(format!(
            "{}: no config.resolved.toml, so the board does not know its model and data (the run has not started, \
             or it was not made by `ytrainer run`)",
            dir.display()
        ))
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        BoardError::unusable(format!(
            "{}/config.resolved.toml: not UTF-8 text (invalid byte at offset {})",
            dir.display(),
            e.utf8_error().valid_up_to()
        ))
    })?;
    let c: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        BoardError::unusable(format!(
            "{}/config.resolved.toml: not valid TOML: {}",
            dir.display(),
            e.message()
        ))
    })?;
    let s = |k: &str| toml_get(&c, k).and_then(|v| v.as_str());
    let path = |k: &str| s(k).map(PathBuf::from);
    let base = if s("model.preset").is_some() {
        dir.join("base-model")
    } else {
        path("model.path").ok_or_else(|| {
            BoardError::unusable(format!(
                "{}/config.resolved.toml: neither [model] preset nor [model] path is set",
                dir.display()
            ))
        })?
    };
    let lora = s("adapter.type").is_some_and(|t| t != "full");
    let newest_checkpoint = std::fs::read_dir(dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            let export = e.path().join("export");
            exported(&export).then_some((n, export))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p);
    let trained_dir = Some(dir.join("final"))
        .filter(|f| exported(f))
        .or(newest_checkpoint);
    let trained = trained_dir.map(|t| {
        if lora {
            (base.clone(), Some(t))
        } else {
            (t, None)
        }
    });
    let train_on = toml_get(&c, "data.train_on")
        .cloned()
        .map(|v| v.try_into::<TrainOn>())
        .transpose()
        .map_err(|e| {
            BoardError::unusable(format!(
                "{}/config.resolved.toml: [data] train_on: {e}",
                dir.display()
            ))
        })?
        .unwrap_or_default();
    let template_vars = toml_get(&c, "data.template_vars")
        .and_then(|v| serde_json::to_value(v).ok())
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let loss_params = toml_get(&c, "loss.params")
        .and_then(|v| v.as_table())
        .map(|t| {
            t.iter()
                .filter_map(|(k, v)| {
                    v.as_float()
                        .or_else(|| v.as_integer().map(|i| i as f64))
                        .map(|x| (k.clone(), x))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut zone_borders = [1.45, 6.6, 15.0];
    if let Some(a) = toml_get(&c, "loss.zone_borders").and_then(|v| v.as_array()) {
        for (z, v) in zone_borders.iter_mut().zip(a) {
            if let Some(x) = v.as_float() {
                *z = x;
            }
        }
    }
    Ok(RunModel {
        base,
        trained,
        lora,
        train: path("data.train"),
        eval: path("data.eval"),
        max_seq_len: toml_get(&c, "data.max_seq_len")
            .and_then(|v| v.as_integer())
            .map(|n| n as usize)
            .unwrap_or(4096),
        train_on,
        template_vars,
        loss: s("loss.name").unwrap_or("ce").to_string(),
        loss_params,
        zone_borders,
        reference_model: path("loss.reference_model"),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    model: PathBuf,
    adapter: Option<PathBuf>,
    data: PathBuf,
    max_seq_len: usize,
    train_on: TrainOn,
    top_k: usize,
}

/// Loaded scorers, so moving between records does not reload the model (the last few are kept).
#[derive(Default)]
pub struct Cache {
    scorers: Mutex<Vec<(Key, Arc<Mutex<Scorer>>)>>,
}

const CACHED: usize = 4;

/// An error's message with its causes, as the CLI prints it.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Cache {
    fn get(&self, key: Key, m: &RunModel, device: &str) -> Result<Arc<Mutex<Scorer>>> {
        let mut scorers = self.scorers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, s)) = scorers.iter().find(|(k, _)| *k == key) {
            return Ok(Arc::clone(s));
        }
        let scorer = Scorer::load(&ScoreSettings {
            model: key.model.clone(),
            adapter: key.adapter.clone(),
            input: ScoreInput::Data {
                path: key.data.clone(),
                train_on: key.train_on,
                max_seq_len: key.max_seq_len,
                template_vars: m.template_vars.clone(),
            },
            top_k: key.top_k,
            device: device.to_string(),
        })
        .map_err(|e| BoardError::unusable(chain(&e)))?;
        let s = Arc::new(Mutex::new(scorer));
        if scorers.len() >= CACHED {
            scorers.remove(0);
        }
        scorers.push((key, Arc::clone(&s)));
        Ok(s)
    }
}

/// Which model scores which data file.
struct Source<'a> {
    model: &'a Path,
    adapter: Option<&'a Path>,
    data: &'a Path,
    top_k: usize,
}

fn score(
    cache: &Cache,
    m: &RunModel,
    device: &str,
    src: Source,
    record: usize,
) -> Result<(SampleScore, usize)> {
    let data = src.data;
    let key = Key {
        model: src.model.to_path_buf(),
        adapter: src.adapter.map(Path::to_path_buf),
        data: data.to_path_buf(),
        max_seq_len: m.max_seq_len,
        train_on: m.train_on,
        top_k: src.top_k,
    };
    let scorer = cache.get(key, m, device)?;
    let scorer = scorer.lock().unwrap_or_else(|p| p.into_inner());
    let n = scorer.len();
    if record >= n {
        return Err(BoardError::not_found(format!(
            "record {record} is out of range: {} has {n} samples (records 0..{}); pick a smaller number",
            data.display(),
            n.saturating_sub(1)
        )));
    }
    let s = scorer
        .score(record)
        .map_err(|e| BoardError::unusable(chain(&e)))?;
    Ok((s, n))
}

/// The weights plugin `name` gives the scored tokens, with the statistics the training step would hand it.
pub fn plugin_weights(
    registry: &Registry,
    name: &str,
    params: &BTreeMap<String, f64>,
    s: &SampleScore,
    reference: Option<&[f32]>,
) -> Result<(Vec<f32>, BTreeMap<String, f64>)> {
    let (f, resolved) = registry
        .build(name, params)
        .map_err(|e| BoardError::bad(format!("strategy `{name}`: {e}")))?;
    let LossFn::Token(p) = f else {
        return Err(BoardError::bad(format!(
            "`{name}` is a pairwise (preference) objective: it scores pairs of answers, not tokens; pick a token \
             strategy such as ce or nlirg"
        )));
    };
    let w = ytrainer_recipes::score::token_weights(p.as_ref(), s, reference).map_err(|e| match e {
        WeighError::NoReference => BoardError::unusable(format!(
            "strategy `{name}` weighs tokens by a reference model's loss; this run has none (a LoRA run's \
             reference is its base model; a full fine-tune needs [loss] reference_model)"
        )),
        e => BoardError::unusable(format!("strategy `{name}` {e}")),
    })?;
    Ok((w, resolved.values().clone()))
}

/// `/api/tokens`: one record under one model and one strategy.
pub fn view(
    roots: &[Root],
    registry: &Registry,
    cache: &Cache,
    device: &str,
    q: &TokenQuery,
) -> Result<Value> {
    let (m, dir, name) = match &q.run {
        Target::Run(id) => {
            let (root, dir) = resolve(roots, id)?;
            (run_model(root, &dir)?, dir, format!("run `{id}`"))
        }
        Target::Model {
            model,
            adapter,
            data,
        } => {
            let model = resolve_path(roots, model)?.1;
            let adapter = adapter
                .as_deref()
                .map(|a| resolve_path(roots, a).map(|r| r.1))
                .transpose()?;
            let data = resolve_path(roots, data)?.1;
            let m = RunModel {
                base: model.clone(),
                lora: adapter.is_some(),
                trained: Some((model.clone(), adapter)),
                train: Some(data),
                eval: None,
                max_seq_len: 4096,
                train_on: TrainOn::default(),
                template_vars: Default::default(),
                loss: "ce".into(),
                loss_params: BTreeMap::new(),
                zone_borders: [1.45, 6.6, 15.0],
                reference_model: None,
            };
            let name = format!("model {}", model.display());
            (m, model, name)
        }
    };
    let data = if q.eval { &m.eval } else { &m.train }
        .clone()
        .ok_or_else(|| {
            BoardError::unusable(format!(
                "{name} has no [data] {} file",
                if q.eval { "eval" } else { "train" }
            ))
        })?;
    let (model, adapter) = match q.stage {
        Stage::Before => (m.base.clone(), None),
        Stage::After => m.trained.clone().ok_or_else(|| {
            BoardError::unusable(format!(
                "{name} has exported no model yet (no final/ and no checkpoint-N/export/ in {}); look at it \
                 `before` training, or wait for its first checkpoint",
                dir.display()
            ))
        })?,
    };
    let strategy = q.strategy.clone().unwrap_or_else(|| m.loss.clone());
    let params = if q.params.is_empty() && strategy == m.loss {
        m.loss_params.clone()
    } else {
        q.params.clone()
    };
    let info = registry
        .get(&strategy)
        .map_err(|e| BoardError::bad(format!("strategy: {e}")))?;
    let needs = match registry.build(&strategy, &params) {
        Ok((LossFn::Token(p), _)) => p.needs(),
        Ok((LossFn::Pairwise(_), _)) => {
            return Err(BoardError::bad(format!(
                "`{strategy}` is a pairwise (preference) objective: it scores pairs of answers, not tokens; pick \
                 a token strategy such as ce or nlirg"
            )));
        }
        Err(e) => return Err(BoardError::bad(format!("strategy `{strategy}`: {e}"))),
    };
    let top_k = needs.top_k_entropy;
    let source = Source {
        model: &model,
        adapter: adapter.as_deref(),
        data: &data,
        top_k,
    };
    let (s, n) = score(cache, &m, device, source, q.record)?;
    let rendered = render_record(&RecordRender {
        model: model.clone(),
        data: data.clone(),
        record: q.record,
        train_on: m.train_on,
        max_seq_len: m.max_seq_len,
        vars: m.template_vars.clone(),
        date: None,
    })
    .map_err(|e| BoardError::unusable(chain(&e)))?;
    let targets: Vec<usize> = rendered
        .supervised
        .iter()
        .enumerate()
        .filter(|&(p, &t)| t && p > 0)
        .map(|(p, _)| p)
        .collect();
    if s.origin.as_deref() != Some(rendered.origin.as_str()) || targets.len() != s.tokens.len() {
        return Err(BoardError::unusable(format!(
            "record {} of {}: the rendered record ({}, {} supervised tokens) and the scored sample ({}, {} tokens) \
             differ: records without supervised tokens are skipped, so sample numbers shift after them",
            q.record,
            data.display(),
            rendered.origin,
            targets.len(),
            s.origin.as_deref().unwrap_or("?"),
            s.tokens.len()
        )));
    }
    let reference_model = m
        .reference_model
        .clone()
        .or_else(|| m.lora.then(|| m.base.clone()));
    let reference = match (&reference_model, needs.reference_loss) {
        (Some(rm), true) => {
            let source = Source {
                model: rm,
                adapter: None,
                data: &data,
                top_k: 0,
            };
            let (r, _) = score(cache, &m, device, source, q.record)?;
            Some(r.tokens.iter().map(|t| t.loss).collect::<Vec<f32>>())
        }
        _ => None,
    };
    let (weights, resolved) =
        plugin_weights(registry, &strategy, &params, &s, reference.as_deref())?;
    let mut tokens: Vec<Value> = rendered
        .pieces
        .iter()
        .zip(&rendered.supervised)
        .map(|(piece, _)| json!({ "t": piece, "s": false }))
        .collect();
    for (i, &p) in targets.iter().enumerate() {
        let t = &s.tokens[i];
        tokens[p] = json!({
            "t": rendered.pieces[p],
            "s": true,
            "id": t.id,
            "loss": t.loss,
            "entropy": t.entropy,
            "rank": t.rank,
            "weight": weights[i],
            "zone": ZONES[ytrainer_core::step::zone(t.loss, &m.zone_borders)],
        });
    }
    let mean_weight = if weights.is_empty() {
        None
    } else {
        Some(weights.iter().map(|&w| w as f64).sum::<f64>() / weights.len() as f64)
    };
    Ok(json!({
        "run": name,
        "stage": match q.stage { Stage::Before => "before", Stage::After => "after" },
        "model": model.display().to_string(),
        "adapter": adapter.map(|a| a.display().to_string()),
        "data": data.display().to_string(),
        "record": q.record,
        "samples": n,
        "origin": rendered.origin,
        "strategy": strategy,
        "params": resolved,
        "param_specs": info.params.iter().map(|p| json!({"name": p.name, "default": p.default, "help": p.help})).collect::<Vec<_>>(),
        "run_strategy": m.loss,
        "mean_loss": s.mean_loss,
        "mean_weight": mean_weight,
        "zone_borders": m.zone_borders,
        "tokens": tokens,
    }))
}
