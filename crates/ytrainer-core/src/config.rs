//! The run configuration: one TOML file whose sections follow the path data takes. Every struct denies unknown
//! keys (a typo must not silently fall back to a default); the CLI adds the nearest valid key to the message.
//! Defaults here are the documented defaults (`docs/config.md`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::loss::Normalize;
use crate::optim::Schedule;

/// The whole run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Base model.
    pub model: ModelSection,
    /// LoRA or full fine-tuning.
    pub adapter: AdapterSection,
    /// Training / eval data and how it becomes tokens.
    pub data: DataSection,
    /// The loss plugin.
    pub loss: LossSection,
    /// Optimisation.
    pub train: TrainSection,
    /// Periodic evaluation.
    pub eval: EvalSection,
    /// Where results go.
    pub output: OutputSection,
    /// Preference training (used with pairwise losses such as `dpo`).
    pub preference: PreferenceSection,
}

/// `[preference]`: settings of DPO-family training (`--loss dpo|cdpo|ipo|hinge|simpo|dpo-nlirg`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreferenceSection {
    /// A separate reference model directory. Default: the policy's own base (LoRA adapters disabled), or the
    /// initial weights for full fine-tuning.
    pub reference: Option<PathBuf>,
    /// Compute reference log-probs once before training and cache them in the run directory (reused on resume).
    /// Always on for full fine-tuning and for a separate `reference` model.
    pub precompute_reference: bool,
    /// Weight of an SFT (NLL) term on the chosen completions.
    pub sft_weight: f64,
    /// Use length-averaged sequence log-probs instead of sums.
    pub average_log_prob: bool,
    /// Pairs per optimizer step.
    pub pairs_per_step: usize,
    /// Pairs per micro-batch (each pair is two rows).
    pub micro_pairs: usize,
}

impl Default for PreferenceSection {
    fn default() -> Self {
        PreferenceSection {
            reference: None,
            precompute_reference: false,
            sft_weight: 0.0,
            average_log_prob: false,
            pairs_per_step: 8,
            micro_pairs: 4,
        }
    }
}

/// `[model]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A Hugging Face model directory (`config.json`, safetensors, `tokenizer.json`, chat template).
    pub path: Option<PathBuf>,
    /// A self-made model instead of `path`: `tiny` (created deterministically from `seed`, with a tokenizer
    /// trained on the training data). Ignored when `path` is set.
    pub preset: Option<String>,
    /// Seed of the preset's initialisation.
    pub seed: u64,
    /// LoRA over a quantised GGUF keeps the base in its GGUF blocks (QLoRA); `true` dequantises it to f32 instead
    /// (about 6x the memory for a 4-bit file, no dequantisation inside the products).
    #[serde(skip_serializing_if = "is_false")]
    pub dequantize_base: bool,
    /// Quantise a Hugging Face base on load for LoRA: `q8_0`, `q4_0` or `nf4` (QLoRA's 4-bit NormalFloat).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantize_base: Option<String>,
    /// The base model's hub id (e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`), written as an exported adapter's
    /// `base_model_name_or_path` instead of the absolute path of `path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_model_id: Option<String>,
}

/// Keeps keys that were added later out of the serialised config when they are off, so the fingerprints of
/// existing runs (and their `--resume`) do not change.
fn is_false(b: &bool) -> bool {
    !*b
}

/// As [`is_false`], for counts whose 0 means "off".
fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// As [`is_zero`], for a float whose 0 means "off".
fn is_zero_f64(x: &f64) -> bool {
    *x == 0.0
}

/// `[adapter]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterSection {
    /// `lora` or `full`.
    #[serde(rename = "type")]
    pub kind: AdapterKind,
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with `use_rslora`).
    pub alpha: f64,
    /// Dropout on the LoRA input.
    pub dropout: f64,
    /// Projections that get adapters.
    pub target_modules: Vec<String>,
    /// Rank-stabilised scaling.
    pub use_rslora: bool,
    /// DoRA: a trainable magnitude per output feature of every adapted projection (PEFT's `use_dora`).
    #[serde(skip_serializing_if = "is_false")]
    pub use_dora: bool,
    /// Modules trained fully beside LoRA (PEFT's `modules_to_save`): `embed_tokens` and / or `lm_head`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub modules_to_save: Vec<String>,
    /// Continue training an existing PEFT adapter directory.
    pub init_from: Option<PathBuf>,
}

/// Adapter kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// Low-rank adapters on frozen base weights.
    Lora,
    /// Every weight trainable.
    Full,
}

/// The seven projections of a Llama-style block: the default LoRA targets.
pub const ALL_PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl Default for AdapterSection {
    fn default() -> Self {
        AdapterSection {
            kind: AdapterKind::Lora,
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: ALL_PROJECTIONS.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
            use_dora: false,
            modules_to_save: Vec::new(),
            init_from: None,
        }
    }
}

/// `[data]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Training file (json array, jsonl, csv or txt; format auto-detected).
    pub train: Option<PathBuf>,
    /// Evaluation file.
    pub eval: Option<PathBuf>,
    /// Fraction of the training records held out for evaluation when `eval` is not set (0 = none).
    pub eval_fraction: f64,
    /// `sft` (chat / instruction data, prompts masked) or `cpt` (raw text, every token supervised, packed).
    pub training_type: TrainingType,
    /// Longest tokenized sample.
    pub max_seq_len: usize,
    /// What to do with longer samples: `truncate` or `skip` (counted either way).
    pub overlong: Overlong,
    /// Which tokens are supervised: `all_assistant`, `last_assistant` or `everything`.
    pub train_on: TrainOn,
    /// Extra chat-template variables (e.g. `enable_thinking = false`).
    pub template_vars: BTreeMap<String, serde_json::Value>,
    /// Column map of `train` and `eval` (each source has its own): the field ytrainer reads -> the name the file
    /// uses (`{ instruction = "prompt", output = "target" }`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: BTreeMap<String, String>,
    /// Use at most the first N records of `train` (0 = all).
    #[serde(skip_serializing_if = "is_zero")]
    pub max_samples: usize,
    /// Mixing weight of `train`: how many times each record is used on average (0.5 = a seeded half).
    #[serde(skip_serializing_if = "is_one")]
    pub train_weight: f64,
    /// Sample packing of SFT examples (several whole examples per row, attention kept within each): `true`,
    /// `false`, or unset = on when it cuts the padded tokens of an epoch by at least 10%.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packing: Option<bool>,
    /// More training files mixed with `train`, each with its own weight, cap and column map.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<DataSource>,
}

/// `[[data.sources]]`: one more training file of the mix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSource {
    /// The file (any format `train` takes).
    pub path: PathBuf,
    /// How many times each record is used on average: 2 = twice, 0.5 = a seeded half, 1.5 = all and a half.
    pub weight: f64,
    /// Use at most the first N records (before the weight; 0 = all).
    pub max_samples: usize,
    /// This file's column map (none by default; `[data] columns` is `train`'s and `eval`'s).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: BTreeMap<String, String>,
}

impl Default for DataSource {
    fn default() -> Self {
        DataSource {
            path: PathBuf::new(),
            weight: 1.0,
            max_samples: 0,
            columns: BTreeMap::new(),
        }
    }
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

/// SFT or continued pretraining.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainingType {
    /// Supervised fine-tuning on conversations.
    Sft,
    /// Continued pretraining on raw text.
    Cpt,
}

// The data crate's own policies, so the config and the data pipeline cannot drift apart.
pub use ytrainer_data::{Overlong, TrainOn};

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            train: None,
            eval: None,
            eval_fraction: 0.0,
            training_type: TrainingType::Sft,
            max_seq_len: 1024,
            overlong: Overlong::Truncate,
            train_on: TrainOn::AllAssistant,
            template_vars: BTreeMap::new(),
            columns: BTreeMap::new(),
            max_samples: 0,
            train_weight: 1.0,
            packing: None,
            sources: Vec::new(),
        }
    }
}

/// `[loss]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossSection {
    /// Plugin name (`ytrainer plugins list`).
    pub name: String,
    /// Override of the plugin's default normalisation.
    pub normalize: Option<Normalize>,
    /// Plugin parameters.
    pub params: BTreeMap<String, f64>,
    /// Borders of the telemetry zones `learned | learning | hard | noise` (losses in nats).
    pub zone_borders: [f64; 3],
    /// External plugin libraries or directories of them, loaded besides `--plugin-dir` and
    /// `YTRAINER_PLUGIN_PATH` (relative paths are relative to the config file).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<std::path::PathBuf>,
    /// A separate reference model (HF directory or `.gguf`) for plugins that need reference losses (`rho1`).
    /// Default: the policy's own base model with its LoRA adapters disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_model: Option<std::path::PathBuf>,
}

impl Default for LossSection {
    fn default() -> Self {
        LossSection {
            name: "nlirg".to_string(),
            normalize: None,
            params: BTreeMap::new(),
            zone_borders: [1.45, 6.6, 15.0],
            plugins: Vec::new(),
            reference_model: None,
        }
    }
}

/// `[train]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// `one-pass` (every supervised token in one forward/backward) or `windowed` (the seed's `token_batch`).
    pub mode: TrainMode,
    /// Window size in target tokens for `windowed` mode.
    pub token_batch: usize,
    /// Passes over the training data.
    pub epochs: usize,
    /// Stop after this many optimizer steps (0 = no limit).
    pub max_steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Schedule after warmup.
    pub lr_scheduler: Schedule,
    /// Warmup steps (takes precedence over `warmup_ratio` when > 0).
    pub warmup_steps: usize,
    /// Warmup as a fraction of all steps.
    pub warmup_ratio: f64,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Decoupled weight decay (not applied to norms and biases).
    pub weight_decay: f64,
    /// Adam beta1.
    pub adam_beta1: f64,
    /// Adam beta2.
    pub adam_beta2: f64,
    /// Adam epsilon.
    pub adam_epsilon: f64,
    /// Global-norm gradient clipping (0 = off).
    pub max_grad_norm: f64,
    /// Supervised-token budget of one optimizer step (gradient accumulation by tokens).
    pub tokens_per_step: usize,
    /// Padded tokens per micro-batch (memory bound).
    pub micro_batch_tokens: usize,
    /// Rows per micro-batch at most.
    pub max_micro_batch_size: usize,
    /// Examples per micro-batch (transformers' `per_device_train_batch_size`); > 0 replaces the padded-token
    /// bound `micro_batch_tokens` and makes each step `grad_accum` (at least 1) micro-batches (0 = off).
    #[serde(skip_serializing_if = "is_zero")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (`gradient_accumulation_steps`); > 0 replaces `tokens_per_step`
    /// (0 = off).
    #[serde(skip_serializing_if = "is_zero")]
    pub grad_accum: usize,
    /// Seed for shuffling and adapter initialisation.
    pub seed: u64,
    /// Shuffle each epoch.
    pub shuffle: bool,
    /// `cpu`, `cuda[:N]` or `wgpu[:N]`.
    pub device: String,
    /// Float type of weights, activations, gradients and optimizer state.
    pub precision: crate::device::Precision,
    /// Activation recomputation: keep only each decoder layer's input in the forward pass and recompute the
    /// layer in the backward pass (less memory, about one more forward pass of compute).
    pub gradient_checkpointing: bool,
    /// Peak memory the run may plan for (`"700MB"`, `"8GB"`, `"auto"`); unset means `auto`, half of the memory
    /// available at start. The micro-batch is lowered and recomputation switched on to fit it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_budget: Option<String>,
    /// Stop the run with an error after this many consecutive steps whose loss or gradient was non-finite
    /// (their updates are skipped); 0 = never stop.
    pub max_skipped_steps: usize,
    /// Stop training when this many evaluations in a row have not improved `[eval] metric_for_best_model`
    /// by more than `early_stopping_threshold` (transformers' `EarlyStoppingCallback`); 0 = never stop early.
    #[serde(skip_serializing_if = "is_zero")]
    pub early_stopping_patience: usize,
    /// LoRA+ (`loraplus_lr_ratio` of LLaMA-Factory / PEFT's `create_loraplus_optimizer`): the learning rate of
    /// the LoRA `B` matrices is this times `learning_rate`; unset = the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loraplus_lr_ratio: Option<f64>,
    /// NEFTune: uniform noise of scale `alpha / sqrt(seq_len * hidden)` on the input embeddings in training
    /// (TRL's `neftune_noise_alpha`); 0 = off.
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub neftune_noise_alpha: f64,
    /// The improvement an evaluation must make over the best so far to reset the patience count.
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub early_stopping_threshold: f64,
}

/// Step modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainMode {
    /// Default.
    OnePass,
    /// Windows of `token_batch` targets, one optimizer step each.
    Windowed,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            mode: TrainMode::OnePass,
            token_batch: 10,
            epochs: 1,
            max_steps: 0,
            learning_rate: 2e-4,
            lr_scheduler: Schedule::Cosine,
            warmup_steps: 0,
            warmup_ratio: 0.03,
            min_lr_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            tokens_per_step: 4096,
            micro_batch_tokens: 4096,
            max_micro_batch_size: 16,
            batch_size: 0,
            grad_accum: 0,
            seed: 42,
            shuffle: true,
            device: "cpu".to_string(),
            precision: crate::device::Precision::F32,
            gradient_checkpointing: false,
            memory_budget: None,
            max_skipped_steps: 10,
            early_stopping_patience: 0,
            early_stopping_threshold: 0.0,
            loraplus_lr_ratio: None,
            neftune_noise_alpha: 0.0,
        }
    }
}

/// `[eval]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Evaluate every N optimizer steps (0 = only before and after training).
    pub every_steps: usize,
    /// Cap on evaluation samples (0 = all).
    pub max_samples: usize,
    /// The `eval.jsonl` field that decides which evaluation is the best (`eval_loss`, `eval_token_accuracy`,
    /// `eval_rewards/accuracy`...); a name without the `eval_` prefix gets it, as in transformers.
    pub metric_for_best_model: String,
    /// Whether a larger metric is better; unset: `false` for a metric whose name ends in `loss`, else `true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub greater_is_better: Option<bool>,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            every_steps: 0,
            max_samples: 256,
            metric_for_best_model: "eval_loss".to_string(),
            greater_is_better: None,
        }
    }
}

impl EvalSection {
    /// The `eval.jsonl` key of `metric_for_best_model` (`loss` -> `eval_loss`).
    pub fn best_metric_key(&self) -> String {
        let m = self.metric_for_best_model.trim();
        if m.starts_with("eval_") {
            m.to_string()
        } else {
            format!("eval_{m}")
        }
    }

    /// Whether a larger `metric_for_best_model` is better (`greater_is_better`, or its default).
    pub fn best_is_greater(&self) -> bool {
        self.greater_is_better
            .unwrap_or_else(|| !self.best_metric_key().ends_with("loss"))
    }
}

/// `[output]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSection {
    /// Run directory.
    pub dir: PathBuf,
    /// Write a resumable checkpoint every N optimizer steps (0 = only at the end).
    pub save_every_steps: usize,
    /// Keep at most this many checkpoints (0 = all); the best one is never removed.
    pub save_total_limit: usize,
    /// Write a checkpoint at every evaluation that improves `[eval] metric_for_best_model` and export the best
    /// model (not the last one) to `final` (transformers' `load_best_model_at_end`).
    #[serde(skip_serializing_if = "is_false")]
    pub load_best_model_at_end: bool,
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection {
            dir: PathBuf::from("runs/latest"),
            save_every_steps: 0,
            save_total_limit: 2,
            load_best_model_at_end: false,
        }
    }
}

/// A number as messages show it: plain for ordinary magnitudes (`0.0002`, `-1`), scientific for very large or
/// very small ones (`1e30`, `-1e-8`), `NaN` and `inf` as such.
pub fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if x.is_finite() && x != 0.0 && !(1e-4..1e6).contains(&a) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}
