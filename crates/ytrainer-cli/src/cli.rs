//! Command-line definitions. Each `run` flag overrides the config key named in its help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Fine-tune Llama / Qwen2 / Qwen3 models with pluggable token-level loss reweighting (NLIRG, CE, ...).
#[derive(Debug, Parser)]
#[command(name = "ytrainer", version = ytrainer_recipes::VERSION)]
pub struct Cli {
    /// Log progress details to stderr (or set YTRAINER_LOG=info|debug).
    #[arg(long, short, global = true)]
    pub verbose: bool,
    /// Load external loss plugins from this directory (or shared-library file); repeatable. Only for the
    /// commands that load plugins (run, sweep, bench, curve, plugins, board, score), which also take it after their
    /// name; also read: YTRAINER_PLUGIN_PATH (paths separated by `:`) and `[loss] plugins` of a run config.
    // Not `global`: a global flag is listed in every command's help, also where no plugin is ever loaded.
    #[arg(long = "plugin-dir", value_name = "DIR")]
    pub plugin_dirs: Vec<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// `--plugin-dir` of the commands that load loss plugins (flattened into their flags, so that only their help
/// lists it).
#[derive(Debug, Args, Default, Clone)]
pub struct PluginDirArgs {
    /// Load external loss plugins from this directory (or shared-library file); repeatable. Also read:
    /// YTRAINER_PLUGIN_PATH (paths separated by `:`) and `[loss] plugins` of a run config.
    #[arg(long = "plugin-dir", value_name = "DIR")]
    pub plugin_dirs: Vec<PathBuf>,
}

impl Command {
    /// The command's own `--plugin-dir` flags; `None` for a command that never loads a loss plugin.
    pub fn plugin_dirs(&self) -> Option<&[PathBuf]> {
        Some(match self {
            Command::Run(a) => a.plugins.plugin_dirs.as_slice(),
            Command::Plugins(a) => a.plugin_dirs.as_slice(),
            Command::Bench(a) => a.plugins.plugin_dirs.as_slice(),
            Command::Curve(a) => a.plugins.plugin_dirs.as_slice(),
            Command::Sweep(a) => a.plugins.plugin_dirs.as_slice(),
            Command::Board(a) => a.plugins.plugin_dirs.as_slice(),
            Command::Score(a) => a.plugins.plugin_dirs.as_slice(),
            _ => return None,
        })
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train: SFT or continued pretraining with a loss plugin.
    Run(Box<RunArgs>),
    /// Inspect the loss plugins discovered at startup.
    Plugins(PluginsArgs),
    /// Measure training throughput and peak memory on fixed model shapes.
    Bench(BenchArgs),
    /// Print (and draw) a loss plugin's weight as a function of the token loss.
    Curve(CurveArgs),
    /// Create a self-made model directory (random init from a seed, tokenizer trained on your data).
    Init(InitArgs),
    /// Import a llama.cpp GGUF file as a Hugging Face checkpoint directory.
    Convert(crate::convert::ConvertArgs),
    /// Per-token loss, entropy, rank and probability of a model (plus adapter) on data or raw token ids.
    Score(Box<crate::score::ScoreArgs>),
    /// Rank a corpus by how the model reacts to each sample, to find label errors and noise before training.
    Sort(Box<crate::sort::SortArgs>),
    /// Show what training sees for a record, or the raw rendering of a chat template.
    Render(Box<crate::render::RenderArgs>),
    /// Generate text (KV cache; greedy, temperature, top-k, top-p, repetition penalty), streaming.
    Generate(Box<crate::generate::GenerateArgs>),
    /// Interactive chat using the model's chat template.
    Chat(Box<crate::generate::ChatArgs>),
    /// Merge a LoRA adapter into its base and write a full Hugging Face checkpoint (f32 / bf16 / f16).
    Merge(crate::merge::MergeArgs),
    /// Write a model (LoRA merged) as a llama.cpp GGUF (f32 / f16 / q8_0 / q4_0), or an adapter as a LoRA GGUF.
    Export(crate::export::ExportArgs),
    /// Score models on data sets: mean token loss, perplexity, token accuracy, supervised-only loss.
    Eval(EvalArgs),
    /// Run a sweep file: one training run per trial, evaluated before/after, tables and plots.
    Sweep(SweepArgs),
    /// Draw a run directory's curves (metrics.jsonl, eval.jsonl) to PNG and SVG in RUN_DIR/plots.
    Plot(PlotArgs),
    /// Serve a local, read-only web page of runs (live curves), sweeps, per-token losses and weights.
    Board(crate::board_cmd::BoardArgs),
}

/// `ytrainer run`
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// TOML run config (optional: `--model` and `--data` alone are enough).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Hugging Face model directory [model.path].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Self-made model preset instead of --model, e.g. `tiny` [model.preset].
    #[arg(long)]
    pub preset: Option<String>,
    /// Training data file: json, jsonl, csv or txt [data.train].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Evaluation data file [data.eval].
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Another training file mixed with --data, repeatable: `FILE[,weight=W][,max_samples=N]`; replaces
    /// [[data.sources]].
    #[arg(long = "source", value_name = "FILE[,weight=W][,max_samples=N]")]
    pub sources: Vec<String>,
    /// Column map of --data and --eval-data: `instruction=prompt_text,output=target` (ytrainer's field =
    /// the file's) [data.columns].
    #[arg(long, value_name = "FIELD=COLUMN,...")]
    pub columns: Option<String>,
    /// Use at most the first N records of --data (0 = all) [data.max_samples].
    #[arg(long, value_name = "N")]
    pub max_samples: Option<usize>,
    /// Loss plugin name, see `ytrainer plugins list` [loss.name].
    #[arg(long)]
    pub loss: Option<String>,
    /// Loss plugin parameter, repeatable: `--loss-param x0=1.0` [loss.params.NAME].
    #[arg(long = "loss-param", value_name = "NAME=VALUE")]
    pub loss_params: Vec<String>,
    /// Loss normalisation: nonzero, tokens or weights [loss.normalize].
    #[arg(long)]
    pub normalize: Option<String>,
    /// Run directory for metrics, checkpoints and the exported model [output.dir].
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Stop after N optimizer steps [train.max_steps].
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Passes over the data [train.epochs].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Peak learning rate [train.learning_rate].
    #[arg(long, allow_negative_numbers = true)]
    pub learning_rate: Option<f64>,
    /// `cpu`, `cuda[:N]` or `wgpu[:N]` [train.device].
    #[arg(long)]
    pub device: Option<String>,
    /// Seed for shuffling and initialisation [train.seed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// `f32` (default) or `bf16`: float type of weights, gradients and optimizer state [train.precision].
    #[arg(long)]
    pub precision: Option<String>,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations: less memory,
    /// about one more forward pass of compute [train.gradient_checkpointing].
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Peak memory to plan for, e.g. `700MB`, `8GB` or `auto` (half of the available memory, the default):
    /// the micro-batch shrinks and recomputation switches on to fit [train.memory_budget].
    #[arg(long, value_name = "SIZE")]
    pub memory_budget: Option<String>,
    /// Supervised tokens per optimizer step [train.tokens_per_step].
    #[arg(long)]
    pub tokens_per_step: Option<usize>,
    /// Examples per micro-batch, as transformers' per_device_train_batch_size: replaces the padded-token bound
    /// and makes each step --grad-accum micro-batches (default 1) instead of --tokens-per-step [train.batch_size].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step (gradient accumulation by count) instead of --tokens-per-step
    /// [train.grad_accum].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// `one-pass` or `windowed` [train.mode].
    #[arg(long)]
    pub mode: Option<String>,
    /// Window size for `--mode windowed` [train.token_batch].
    #[arg(long)]
    pub token_batch: Option<usize>,
    /// `lora` (default) or `full` fine-tuning [adapter.type].
    #[arg(long)]
    pub adapter: Option<String>,
    /// LoRA rank [adapter.r].
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// Load a quantised GGUF base in f32 instead of training LoRA over its quantised blocks
    /// [model.dequantize_base].
    #[arg(long)]
    pub dequantize_base: bool,
    /// Quantise a Hugging Face base on load for LoRA (QLoRA): `q8_0`, `q4_0` or `nf4` [model.quantize_base].
    #[arg(long, value_name = "KIND")]
    pub quantize_base: Option<String>,
    /// Hub id of the base model (e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`) recorded as the exported adapter's
    /// `base_model_name_or_path` instead of the base's absolute path [model.base_model_id].
    #[arg(long, value_name = "ID")]
    pub base_model_id: Option<String>,
    /// LoRA alpha [adapter.alpha].
    #[arg(long, allow_negative_numbers = true)]
    pub lora_alpha: Option<f64>,
    /// Longest sample in tokens [data.max_seq_len].
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// `all_assistant`, `last_assistant` or `everything` [data.train_on].
    #[arg(long)]
    pub train_on: Option<String>,
    /// Evaluate every N steps [eval.every_steps].
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Checkpoint every N steps [output.save_every_steps].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Resume from a checkpoint directory, or from the latest checkpoint of a run directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Any other config key, repeatable: `--set train.weight_decay=0.01` (value parsed as TOML).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the resolved configuration and exit without training.
    #[arg(long)]
    pub dry_run: bool,
    /// Clear a non-empty output directory that is not this run's completely before training (without it such
    /// a directory is refused and left untouched).
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub plugins: PluginDirArgs,
}

/// `ytrainer plugins`
#[derive(Debug, Args)]
pub struct PluginsArgs {
    #[command(subcommand)]
    pub command: PluginsCommand,
    /// Load external loss plugins from this directory (or shared-library file); repeatable. Also read:
    /// YTRAINER_PLUGIN_PATH (paths separated by `:`).
    #[arg(long = "plugin-dir", value_name = "DIR", global = true)]
    pub plugin_dirs: Vec<PathBuf>,
}

pub use crate::format::Format;

/// `ytrainer plugins ...`
#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// List plugins with their kind, description and parameters.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Show one plugin: source, formula, parameters with defaults, and the statistics it needs.
    Describe {
        /// Plugin name.
        name: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

/// Output formats of `ytrainer curve`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum CurveFormat {
    /// Aligned columns.
    Table,
    /// `loss,weight` rows (one weight column per plugin with --compare).
    Csv,
    /// A list of `{"loss": l, "weight": w}` (an object of such lists per plugin with --compare).
    Json,
}

/// `ytrainer curve`
#[derive(Debug, Args)]
pub struct CurveArgs {
    /// Plugin name (built-in or external); omit with --compare.
    pub name: Option<String>,
    #[command(flatten)]
    pub plugins: PluginDirArgs,
    /// Plugin parameter, repeatable: `--param cutoff=10`.
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Overlay several plugins (default parameters): `--compare nlirg,dft,focal`.
    #[arg(long, value_delimiter = ',')]
    pub compare: Vec<String>,
    /// Smallest loss of the grid.
    #[arg(long, default_value_t = 0.0)]
    pub from: f64,
    /// Largest loss of the grid.
    #[arg(long, default_value_t = 20.0)]
    pub to: f64,
    /// Number of grid points between --from and --to.
    #[arg(long, default_value_t = 41)]
    pub points: usize,
    /// Exact losses instead of a grid: `--at 0.5,1.45,6.6`.
    #[arg(long, value_delimiter = ',')]
    pub at: Vec<f64>,
    /// What the x axis is: the token loss, or (for entropy-based plugins) the normalised entropy in [0, 1].
    #[arg(long, value_enum, default_value_t = CurveAxis::Loss)]
    pub vs: CurveAxis,
    /// Entropy (normalised, [0, 1]) given to the plugin while the loss varies.
    #[arg(long, default_value_t = 1.0)]
    pub entropy: f64,
    /// Loss given to the plugin while the entropy varies (`--vs entropy`).
    #[arg(long, default_value_t = 2.0)]
    pub loss: f64,
    /// Reference-model loss given to reference-based plugins (rho1).
    #[arg(long, default_value_t = 0.0)]
    pub reference_loss: f64,
    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = CurveFormat::Table)]
    pub format: CurveFormat,
    /// Also draw the curve to this file: `.svg` or `.png`.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The varying input of `ytrainer curve`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum CurveAxis {
    /// Token cross-entropy in nats.
    Loss,
    /// Normalised predictive entropy in [0, 1] (entropy and top-K entropy).
    Entropy,
}

/// Model shapes of the benchmark.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum BenchShape {
    /// Qwen2-shaped: vocab 8192, hidden 256, inter 704, 4 layers, 4/2 heads, tied.
    Tiny,
    /// Qwen2-shaped: vocab 16384, hidden 512, inter 1408, 8 layers, 8/4 heads, tied.
    Small,
    /// SmolLM2-135M's shape (Llama): vocab 49152, hidden 576, inter 1536, 30 layers, 9/3 heads, tied.
    Smollm2,
}

/// Fine-tuning modes of the benchmark.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum BenchMode {
    /// Every weight trainable.
    Full,
    /// LoRA r=8 on all 7 projections.
    Lora,
}

/// `ytrainer bench`
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub plugins: PluginDirArgs,
    /// Model shape.
    #[arg(long, value_enum, default_value_t = BenchShape::Tiny)]
    pub shape: BenchShape,
    /// Full or LoRA.
    #[arg(long, value_enum, default_value_t = BenchMode::Lora)]
    pub mode: BenchMode,
    /// Timed optimizer steps (after 2 warm-up steps).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Loss plugin.
    #[arg(long, default_value = "ce")]
    pub loss: String,
    /// Rows per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// `cpu`, `cuda[:N]` or `wgpu[:N]`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// `f32` or `bf16` (every tensor of the model, its gradients and AdamW state).
    #[arg(long, default_value = "f32")]
    pub precision: ytrainer_core::device::Precision,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// LoRA rank (`--mode lora`); alpha is twice the rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Windowed mode instead: one sample of `--prompt` prompt tokens and `--seq` answer tokens trained in windows of
    /// N targets (one optimizer step each), timed against the seed's way of running the same windows.
    #[arg(long, value_name = "N")]
    pub windowed: Option<usize>,
    /// Prompt tokens of the `--windowed` sample.
    #[arg(long, default_value_t = 64)]
    pub prompt: usize,
    /// Train with activation recomputation (`train.gradient_checkpointing`).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// LoRA over the same random base quantised on load (QLoRA): `q8_0`, `q4_0` or `nf4` (`--mode lora` only).
    #[arg(long, value_parser = ["q8_0", "q4_0", "nf4"])]
    pub quantize_base: Option<String>,
    /// `--windowed`: timed rounds, each one epoch of the sample both ways, alternating (the ratio is taken per
    /// round, then the median: the VM's speed drifts between rounds).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub rounds: u64,
}

/// `ytrainer init`
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Preset name (`tiny`).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Text the tokenizer is trained on (any data file ytrainer reads).
    #[arg(long)]
    pub data: PathBuf,
    /// Initialisation seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory to write (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
    #[arg(long)]
    pub out: PathBuf,
}

/// `ytrainer eval`
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Hugging Face model directory or llama.cpp `.gguf` file (dequantised to f32).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory applied on top of --model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Data file, repeatable: instruction data (chat records) or raw text (cut into windows).
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,
    /// Window length in tokens for raw text; longer instruction samples are truncated to it.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// At most N windows / samples per data set (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_samples: usize,
    /// `cpu`, `cuda[:N]` or `wgpu[:N]`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// `ytrainer sweep`
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Sweep file (TOML: a base run config plus axes; see docs/sweeps.md).
    pub file: PathBuf,
    /// Sweep directory (overrides `output` of the sweep file).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// List the trials and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Devices to train on, comma-separated (`cuda:0,cuda:1`): one worker process per device, trial i on device
    /// i mod N; a single device overrides every trial's `train.device`. Default: each trial's own config.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Internal: run only the trials of shard `K/N` (set by `--devices` for its worker processes).
    #[arg(long, hide = true)]
    pub shard: Option<String>,
    #[command(flatten)]
    pub plugins: PluginDirArgs,
}

/// `ytrainer plot`
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run directory (holds metrics.jsonl).
    pub run_dir: PathBuf,
}
