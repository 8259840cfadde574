//! Taking a model back to the ecosystem: a Hugging Face checkpoint (LoRA merged into the base weights) or a PEFT
//! adapter directory, and loading a PEFT adapter back to continue training.
//!
//! Formats are those of transformers 5 / peft 0.21 (see shared/assets/oracles/peft_adapter_format.md): weights
//! in PyTorch layout `[out, in]`, F32, `{"format": "pt"}` metadata; adapter keys
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`; DoRA adds
//! `base_model.model.<module>.lora_magnitude_vector` `[out]` (no `.weight`: PEFT strips it when saving and adds it
//! back when loading, to keep the format of its first DoRA release), and `modules_to_save` adds the trained
//! module's own weight under its base name, `base_model.model.model.embed_tokens.weight` `[vocab, hidden]` and
//! `base_model.model.lm_head.weight` `[vocab, hidden]` (PEFT drops the `modules_to_save.default.` it holds them
//! under in memory).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::prelude::*;
use serde_json::{Value, json};

use super::load::transpose;
use super::st::{PendingTensor, SafetensorsReader, write_f32};
use crate::decoder::{Decoder, RmsNorm, modules_to_save_flags};
use crate::lora::{AdapterSpec, LoraConfig};
use crate::{HfConfig, ModelError};

/// File names PEFT reads.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// PEFT's prefix in front of the base model's own parameter path.
const PEFT_PREFIX: &str = "base_model.model.";

fn host(t: Tensor<2>) -> Vec<f32> {
    t.into_data()
        .try_into_vec_as::<f32>()
        .expect("float tensors convert to f32")
}

fn host1(t: Tensor<1>) -> Vec<f32> {
    t.into_data()
        .try_into_vec_as::<f32>()
        .expect("float tensors convert to f32")
}

/// A Burn `[in, out]` tensor as PyTorch `[out, in]` values.
fn to_torch_layout(t: Tensor<2>) -> Vec<f32> {
    let [d_in, d_out] = t.dims();
    transpose(&host(t), d_in, d_out)
}

fn write_text(path: &Path, text: &str) -> Result<(), ModelError> {
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

/// Writes `config.json` and `model.safetensors` in Hugging Face names and layout, with every LoRA branch merged
/// into its base weight (`W + s·A·B`). Tied models omit `lm_head.weight`, as transformers does.
pub fn save_hf_checkpoint(
    model: &Decoder,
    config: &HfConfig,
    dir: &Path,
) -> Result<Vec<PathBuf>, ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut config = config.clone();
    config.tie_word_embeddings = Some(model.lm_head.is_none());
    // The file holds f32 whatever the source dtype was.
    if config.torch_dtype.is_some() {
        config.torch_dtype = Some("float32".into());
    }
    if config.dtype.is_some() || config.torch_dtype.is_none() {
        config.dtype = Some("float32".into());
    }
    let config_path = dir.join("config.json");
    write_text(&config_path, &(config.to_json_string() + "\n"))?;
    let weights_path = dir.join("model.safetensors");
    write_f32(&weights_path, hf_tensors(model))?;
    Ok(vec![config_path, weights_path])
}

/// What a trained model exports (`CausalLm::export`): a PEFT adapter when LoRA was trained, else the full HF
/// checkpoint with the config it was loaded with.
pub(crate) fn export_trained(model: &Decoder, dir: &Path) -> Result<Vec<PathBuf>, String> {
    match &model.adapter {
        AdapterSpec::Lora(cfg) => {
            save_peft_adapter(model, cfg, &model.base_model_name_or_path, dir)
        }
        AdapterSpec::Full => save_hf_checkpoint(model, &model.config, dir),
    }
    .map_err(|e| e.to_string())
}

/// Every tensor of the HF checkpoint of `model` (LoRA merged), produced lazily, in HF names and layout.
pub(crate) fn hf_tensors(model: &Decoder) -> Vec<PendingTensor<'_>> {
    let spec = &model.spec;
    let mut tensors = Vec::new();
    let embed = model.embed_tokens.weight.val();
    tensors.push(PendingTensor::new(
        "model.embed_tokens.weight",
        vec![spec.vocab_size, spec.hidden_size],
        move || host(embed.detach()),
    ));
    let norm = |tensors: &mut Vec<PendingTensor>, name: String, n: &RmsNorm| {
        let w = n.weight.val();
        tensors.push(PendingTensor::new(name, w.dims().to_vec(), move || {
            host1(w.detach())
        }));
    };
    for (name, linear) in model.named_linears() {
        let shape = vec![linear.d_out(), linear.d_in()];
        tensors.push(PendingTensor::new(
            format!("{name}.weight"),
            shape,
            move || to_torch_layout(linear.merged_weight()),
        ));
        if let Some(bias) = &linear.bias {
            let b = bias.val();
            tensors.push(PendingTensor::new(
                format!("{name}.bias"),
                b.dims().to_vec(),
                move || host1(b.detach()),
            ));
        }
    }
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        norm(
            &mut tensors,
            format!("{p}.input_layernorm.weight"),
            &layer.input_layernorm,
        );
        norm(
            &mut tensors,
            format!("{p}.post_attention_layernorm.weight"),
            &layer.post_attention_layernorm,
        );
        if let Some(n) = &layer.self_attn.q_norm {
            norm(&mut tensors, format!("{p}.self_attn.q_norm.weight"), n);
        }
        if let Some(n) = &layer.self_attn.k_norm {
            norm(&mut tensors, format!("{p}.self_attn.k_norm.weight"), n);
        }
    }
    norm(&mut tensors, "model.norm.weight".into(), &model.norm);
    if let Some(head) = &model.lm_head {
        let w = head.weight.val();
        tensors.push(PendingTensor::new(
            "lm_head.weight",
            vec![spec.vocab_size, spec.hidden_size],
            move || to_torch_layout(w.detach()),
        ));
    }
    tensors
}

/// `alpha` as PEFT writes it: an integer when it is one.
fn json_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The `adapter_config.json` PEFT 0.21.2 writes (all 41 fields, alphabetical, 2-space indent).
pub fn adapter_config_json(cfg: &LoraConfig, base_model_name_or_path: &str) -> String {
    let fields: BTreeMap<&str, Value> = BTreeMap::from([
        ("alora_invocation_tokens", Value::Null),
        ("alpha_pattern", json!({})),
        ("arrow_config", Value::Null),
        ("auto_mapping", Value::Null),
        ("base_model_name_or_path", json!(base_model_name_or_path)),
        ("bias", json!("none")),
        ("corda_config", Value::Null),
        ("ensure_weight_tying", json!(false)),
        ("eva_config", Value::Null),
        ("exclude_modules", Value::Null),
        ("fan_in_fan_out", json!(false)),
        ("inference_mode", json!(true)),
        ("init_lora_weights", json!(true)),
        ("kasa_config", Value::Null),
        ("layer_replication", Value::Null),
        ("layers_pattern", Value::Null),
        ("layers_to_transform", Value::Null),
        ("loftq_config", json!({})),
        ("lora_alpha", json_number(cfg.alpha)),
        ("lora_bias", json!(false)),
        ("lora_dropout", json!(cfg.dropout)),
        ("lora_ga_config", Value::Null),
        ("megatron_config", Value::Null),
        ("megatron_core", json!("megatron.core")),
        (
            "modules_to_save",
            if cfg.modules_to_save.is_empty() {
                Value::Null
            } else {
                json!(cfg.modules_to_save)
            },
        ),
        ("monteclora_config", Value::Null),
        ("peft_type", json!("LORA")),
        ("peft_version", json!("0.21.2")),
        ("qalora_group_size", json!(16)),
        ("r", json!(cfg.r)),
        ("rank_pattern", json!({})),
        ("revision", Value::Null),
        ("target_modules", json!(cfg.target_modules)),
        ("target_parameters", Value::Null),
        ("task_type", json!("CAUSAL_LM")),
        ("trainable_token_indices", Value::Null),
        ("use_bdlora", Value::Null),
        ("use_dora", json!(cfg.use_dora)),
        ("use_qalora", json!(false)),
        ("use_rslora", json!(cfg.use_rslora)),
        ("velora_config", Value::Null),
    ]);
    serde_json::to_string_pretty(&fields).expect("adapter config serializes")
}

/// Writes a PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`, `README.md`) that
/// `PeftModel.from_pretrained(base, dir)` loads.
pub fn save_peft_adapter(
    model: &Decoder,
    lora: &LoraConfig,
    base_model_name_or_path: &str,
    dir: &Path,
) -> Result<Vec<PathBuf>, ModelError> {
    let mut tensors = Vec::new();
    let use_dora = model
        .named_linears()
        .iter()
        .any(|(_, l)| l.lora_magnitude.is_some());
    for (name, linear) in model.named_linears() {
        let (Some(a), Some(b)) = (&linear.lora_a, &linear.lora_b) else {
            continue;
        };
        if let Some(m) = &linear.lora_magnitude {
            let m = m.val();
            tensors.push(PendingTensor::new(
                format!("{PEFT_PREFIX}{name}.lora_magnitude_vector"),
                vec![linear.d_out()],
                move || host1(m.detach()),
            ));
        } else if use_dora {
            return Err(ModelError::Invalid(format!(
                "`{name}` has a LoRA branch without DoRA's magnitude while other projections have one; PEFT's \
                 `use_dora` applies to every adapted projection"
            )));
        }
        let (a, b) = (a.val(), b.val());
        let (d_in, d_out, r) = (linear.d_in(), linear.d_out(), a.dims()[1]);
        tensors.push(PendingTensor::new(
            format!("{PEFT_PREFIX}{name}.lora_A.weight"),
            vec![r, d_in],
            move || to_torch_layout(a.detach()),
        ));
        tensors.push(PendingTensor::new(
            format!("{PEFT_PREFIX}{name}.lora_B.weight"),
            vec![d_out, r],
            move || to_torch_layout(b.detach()),
        ));
    }
    if tensors.is_empty() {
        return Err(ModelError::Invalid(
            "the model has no LoRA adapter to save; use save_hf_checkpoint for a fully fine-tuned model".into(),
        ));
    }
    // modules_to_save: what the model trains, in PEFT's saved names and PyTorch layout `[vocab, hidden]`. A tied
    // model trains one matrix; it is written as both the embeddings and the head, and both are listed, so that
    // PEFT (which gives each listed module its own copy unless `ensure_weight_tying`) computes the same model.
    let (embed, head) = model.trained_beside_adapters();
    let tied = model.lm_head.is_none();
    let spec = &model.spec;
    let mut saved_modules = Vec::new();
    if embed {
        let e = model.embed_tokens.weight.val();
        saved_modules.push("embed_tokens".to_string());
        let e2 = e.clone();
        tensors.push(PendingTensor::new(
            format!("{PEFT_PREFIX}model.embed_tokens.weight"),
            vec![spec.vocab_size, spec.hidden_size],
            move || host(e2.detach()),
        ));
        if tied {
            saved_modules.push("lm_head".to_string());
            tensors.push(PendingTensor::new(
                format!("{PEFT_PREFIX}lm_head.weight"),
                vec![spec.vocab_size, spec.hidden_size],
                move || host(e.detach()),
            ));
        }
    }
    if head && let Some(h) = &model.lm_head {
        let w = h.weight.val();
        saved_modules.push("lm_head".to_string());
        tensors.push(PendingTensor::new(
            format!("{PEFT_PREFIX}lm_head.weight"),
            vec![spec.vocab_size, spec.hidden_size],
            move || to_torch_layout(w.detach()),
        ));
    }
    let lora = &LoraConfig {
        use_dora,
        modules_to_save: saved_modules,
        ..lora.clone()
    };
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    write_text(
        &config_path,
        &adapter_config_json(lora, base_model_name_or_path),
    )?;
    let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
    write_f32(&weights_path, tensors)?;
    let readme_path = dir.join("README.md");
    write_text(
        &readme_path,
        &format!(
            "---\nbase_model: {base_model_name_or_path}\nlibrary_name: peft\npipeline_tag: text-generation\n\
             tags:\n- lora\n- ytrainer\n---\n\n# LoRA adapter\n\nr = {}, lora_alpha = {}, target modules: {}.\n",
            lora.r,
            lora.alpha,
            lora.target_modules.join(", ")
        ),
    )?;
    Ok(vec![config_path, weights_path, readme_path])
}

/// Reads a PEFT `adapter_config.json`, accepting PEFT's minimal form, rejecting the variants we do not implement.
pub fn read_adapter_config(path: &Path) -> Result<LoraConfig, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let v: serde_json::Map<String, Value> =
        serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            what: "PEFT adapter_config.json",
            source,
        })?;
    let bad = |message: String| ModelError::Adapter {
        path: path.to_path_buf(),
        message,
    };
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    if let Some(t) = get("peft_type")
        && t != "LORA"
    {
        return Err(bad(format!(
            "field `peft_type`: {t} is not supported; only \"LORA\" is"
        )));
    }
    let unsupported_true = ["fan_in_fan_out", "use_qalora"];
    for k in unsupported_true {
        if get(k) == Some(&Value::Bool(true)) {
            return Err(bad(format!("field `{k}`: true is not supported")));
        }
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if let Some(p) = get(k)
            && p.as_object().is_some_and(|m| !m.is_empty())
        {
            return Err(bad(format!(
                "field `{k}`: per-module overrides are not supported"
            )));
        }
    }
    if let Some(b) = get("bias")
        && b != "none"
    {
        return Err(bad(format!(
            "field `bias`: {b} is not supported; only \"none\" is"
        )));
    }
    let r = get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("field `r`: missing or not a positive integer".into()))?
        as usize;
    let alpha = get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("field `lora_alpha`: missing or not a number".into()))?;
    let target_modules = match get("target_modules") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("field `target_modules`: entries must be strings".into()))?,
        Some(Value::String(s)) => {
            return Err(bad(format!(
                "field `target_modules`: the regex form \"{s}\" is not supported; use a list of module names"
            )));
        }
        _ => return Err(bad("field `target_modules`: missing".into())),
    };
    let modules_to_save = match get("modules_to_save") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("field `modules_to_save`: entries must be strings".into()))?,
        Some(other) => {
            return Err(bad(format!(
                "field `modules_to_save`: {other} is not a list of module names"
            )));
        }
    };
    modules_to_save_flags(&modules_to_save)
        .map_err(|e| bad(format!("field `modules_to_save`: {e}")))?;
    Ok(LoraConfig {
        r,
        alpha,
        dropout: get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        target_modules,
        use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        use_dora: get("use_dora").and_then(Value::as_bool).unwrap_or(false),
        modules_to_save,
        init_seed: LoraConfig::default().init_seed,
    })
}

/// One adapter tensor by its saved name, or by the in-memory name PEFT also loads (`in_memory`), checked for
/// shape and finiteness and marked used.
struct AdapterReader {
    reader: SafetensorsReader,
    path: PathBuf,
    unused: BTreeSet<String>,
}

impl AdapterReader {
    fn has(&self, saved: &str, in_memory: &str) -> bool {
        self.reader.contains(saved) || self.reader.contains(in_memory)
    }

    fn read(
        &mut self,
        saved: &str,
        in_memory: &str,
        shape: &[usize],
    ) -> Result<Vec<f32>, ModelError> {
        let key = if self.reader.contains(saved) || !self.reader.contains(in_memory) {
            saved
        } else {
            in_memory
        };
        let values = self.reader.read_f32(key, shape)?;
        let bad = values.iter().filter(|x| !x.is_finite()).count();
        if bad > 0 {
            return Err(ModelError::Adapter {
                path: self.path.clone(),
                message: format!(
                    "tensor `{key}` holds {bad} NaN or infinite values (of {}); the adapter is corrupt or comes \
                     from a diverged run, so it is not applied",
                    values.len()
                ),
            });
        }
        self.unused.remove(key);
        Ok(values)
    }
}

/// Loads a PEFT LoRA adapter onto `model` (replacing any adapter it has: LoRA branches on projections the file
/// does not target are removed, embeddings / head trained beside them go back to the base's) to continue
/// training: base weights are frozen, the adapter's A/B (and DoRA magnitudes, and `modules_to_save` weights)
/// become the trainable parameters. Keys may be in saved form or still carry `.default.`. Every adapter tensor
/// must be used: an unknown key (for example a LoRA on `lm_head`) is an error.
///
/// `modules_to_save` on a model with tied embeddings: an adapter that holds the same matrix for both (what
/// ytrainer writes) keeps the model tied; one that trains only one of them, or two different ones (PEFT without
/// `ensure_weight_tying` gives each listed module its own copy), unties the head so the model computes what PEFT
/// computes. PEFT's `ensure_weight_tying` adapter lists only the embeddings and holds the one matrix under both
/// names: the model stays tied.
pub fn load_peft_adapter(model: Decoder, dir: &Path) -> Result<Decoder, ModelError> {
    let lora = read_adapter_config(&dir.join(ADAPTER_CONFIG_FILE))?;
    crate::decoder::check_lora_config(&lora)?;
    let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
    let reader = SafetensorsReader::open(&weights_path)?;
    let unused: BTreeSet<String> = reader.names().map(str::to_string).collect();
    let mut file = AdapterReader {
        reader,
        path: weights_path.clone(),
        unused,
    };
    let device = model.embed_tokens.weight.lazy_device();
    let scaling = lora.scaling();
    let r = lora.r;
    let mut model = model
        .set_require_grad(false)
        .try_map_linears(|name, linear| {
            if !lora.targets(name) {
                // A branch the model was built with (the run config's `[adapter]`, which `init_from` replaces)
                // is not the adapter's: it would be trained and saved beside it.
                return Ok(linear.without_lora());
            }
            let (d_in, d_out) = (linear.d_in(), linear.d_out());
            let mut read =
                |part: &str, rows: usize, cols: usize| -> Result<Tensor<2>, ModelError> {
                    let values = file.read(
                        &format!("{PEFT_PREFIX}{name}.{part}.weight"),
                        &format!("{PEFT_PREFIX}{name}.{part}.default.weight"),
                        &[rows, cols],
                    )?;
                    Ok(Tensor::from_data(
                        TensorData::new(transpose(&values, rows, cols), [cols, rows]),
                        &device,
                    ))
                };
            let a = read("lora_A", r, d_in)?;
            let b = read("lora_B", d_out, r)?;
            let linear = linear.with_lora(a, b, scaling, lora.dropout);
            if !lora.use_dora {
                return Ok::<_, ModelError>(linear);
            }
            let m = file.read(
                &format!("{PEFT_PREFIX}{name}.lora_magnitude_vector"),
                &format!("{PEFT_PREFIX}{name}.lora_magnitude_vector.default.weight"),
                &[d_out],
            )?;
            Ok(linear.with_dora(Tensor::from_data(TensorData::new(m, [d_out]), &device)))
        })?;
    // Likewise the embeddings / head the model trains beside its own adapter: only the file's `modules_to_save`
    // are trained.
    model.embed_tokens = model.embed_tokens.base_only();
    model.lm_head = model.lm_head.map(crate::decoder::LmHead::base_only);
    let (embed, head) = modules_to_save_flags(&lora.modules_to_save)?;
    let (vocab, hidden) = (model.spec.vocab_size, model.spec.hidden_size);
    let missing = |module: &str| ModelError::Adapter {
        path: weights_path.clone(),
        message: format!(
            "`modules_to_save` lists `{module}` but the file holds no `{PEFT_PREFIX}{}{module}.weight`",
            if module == "embed_tokens" {
                "model."
            } else {
                ""
            }
        ),
    };
    let e_key = format!("{PEFT_PREFIX}model.embed_tokens.weight");
    let e_mem = format!("{PEFT_PREFIX}model.embed_tokens.modules_to_save.default.weight");
    let h_key = format!("{PEFT_PREFIX}lm_head.weight");
    let h_mem = format!("{PEFT_PREFIX}lm_head.modules_to_save.default.weight");
    let e_new = if embed {
        if !file.has(&e_key, &e_mem) {
            return Err(missing("embed_tokens"));
        }
        Some(file.read(&e_key, &e_mem, &[vocab, hidden])?)
    } else {
        None
    };
    let h_new = if head {
        if !file.has(&h_key, &h_mem) {
            return Err(missing("lm_head"));
        }
        Some(file.read(&h_key, &h_mem, &[vocab, hidden])?)
    } else {
        None
    };
    let tied = model.lm_head.is_none();
    // PEFT's `ensure_weight_tying` on a tied model lists only the embeddings (`["embed_tokens",
    // "model.embed_tokens"]`) and saves its one trained matrix under both names: the head is that matrix.
    let h_new = match h_new {
        None if tied && e_new.is_some() && file.has(&h_key, &h_mem) => {
            let h = file.read(&h_key, &h_mem, &[vocab, hidden])?;
            if Some(&h) != e_new.as_ref() {
                return Err(ModelError::Adapter {
                    path: weights_path.clone(),
                    message: format!(
                        "`{h_key}` differs from the embeddings, but `modules_to_save` lists only the embeddings \
                         of this model with tied embeddings (PEFT's `ensure_weight_tying`), which makes the head \
                         the embedding matrix; list `lm_head` too to train a separate head"
                    ),
                });
            }
            Some(h)
        }
        other => other,
    };
    let matrix = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [vocab, hidden]), &device);
    let trained = |v: Tensor<2>| Param::from_tensor(v).set_require_grad(true);
    let frozen = |v: Tensor<2>| Param::from_tensor(v).set_require_grad(false);
    let base_e = model.embed_tokens.weight.val();
    // The tied case in which the file's head is the embedding matrix: still one matrix, trained.
    let one_matrix = tied && e_new.is_some() && h_new == e_new;
    if tied && !one_matrix && (e_new.is_some() || h_new.is_some()) {
        // Untie: the head becomes its own matrix (the file's, or the base's), as PEFT computes it.
        model.lm_head = Some(crate::decoder::LmHead {
            weight: frozen(base_e.clone().transpose()),
            original: None,
        });
    }
    if let Some(e) = e_new {
        model.embed_tokens.weight = trained(matrix(e));
        model.embed_tokens.original = Some(frozen(base_e));
    }
    if let (Some(h), Some(lm)) = (h_new, model.lm_head.as_mut())
        && !one_matrix
    {
        let base_h = lm.weight.val();
        lm.weight = trained(matrix(h).transpose());
        lm.original = Some(frozen(base_h));
    }
    if !file.unused.is_empty() {
        return Err(ModelError::Adapter {
            path: weights_path,
            message: format!(
                "tensors not matching any adapted projection of this model: {}",
                file.unused.into_iter().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    model.adapter = AdapterSpec::Lora(lora);
    Ok(model)
}
