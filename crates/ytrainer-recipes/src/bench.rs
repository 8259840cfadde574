//! Training throughput, phase timings and the per-kernel profile of the real training step and optimizer on the
//! fixed shapes PyTorch + PEFT was measured on (fp32, random data, every position supervised, AdamW): the work
//! behind `ytrainer bench`. Also the windowed comparison: ytrainer's windowed plan against the seed's way of
//! training the same windows.

use std::path::PathBuf;
use std::time::Instant;

use ytrainer_core::burn::prelude::Device;
use ytrainer_core::device::Precision;
use ytrainer_core::loss::{LossFn, TokenReweighter, TokenStats, tensor_from_slice, tensor_to_vec};
use ytrainer_core::optim::{AdamW, AdamWConfig, GradAccumulator};
use ytrainer_core::step::{StepContext, StepCounters, train_micro_batch};
use ytrainer_data::MicroBatch;
use ytrainer_data::batch::{BatchOptions, Mode, plan_epoch};
use ytrainer_data::tokenize::Example;
use ytrainer_models::{AdapterSpec, BaseWeights, Decoder, HfConfig, LoraConfig, init_random_with};

use crate::error::Result;
use crate::{RecipeError, bail, invalid};

/// Model shapes of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchShape {
    /// Qwen2-shaped: vocab 8192, hidden 256, inter 704, 4 layers, 4/2 heads, tied.
    Tiny,
    /// Qwen2-shaped: vocab 16384, hidden 512, inter 1408, 8 layers, 8/4 heads, tied.
    Small,
    /// SmolLM2-135M's shape (Llama): vocab 49152, hidden 576, inter 1536, 30 layers, 9/3 heads, tied.
    Smollm2,
}

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchAdapter {
    /// Every weight.
    Full,
    /// LoRA of this rank on all 7 projections; alpha is twice the rank, as in the PyTorch + PEFT measurement.
    Lora {
        /// The rank (0 counts as 1).
        rank: usize,
    },
}

/// The benchmark's model, data and step.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    /// Model shape.
    pub shape: BenchShape,
    /// Full or LoRA.
    pub adapter: BenchAdapter,
    /// Timed optimizer steps (after 2 warm-up steps).
    pub steps: usize,
    /// Token loss plugin.
    pub loss: String,
    /// Rows per step.
    pub batch: usize,
    /// Tokens per row; in windowed mode the answer's tokens.
    pub seq: usize,
    /// `cpu`, `cuda[:N]` or `wgpu[:N]`.
    pub device: String,
    /// Precision of every tensor of the model, its gradients and AdamW state.
    pub precision: Precision,
    /// Train with activation recomputation.
    pub gradient_checkpointing: bool,
    /// The base's linear weights: f32, or quantised (`--quantize-base`) for LoRA over a quantised base.
    pub base: BaseWeights,
    /// External plugin directories named outside any config (`--plugin-dir`).
    pub plugin_dirs: Vec<PathBuf>,
}

/// The windowed comparison's sample and rounds.
#[derive(Debug, Clone, Copy)]
pub struct WindowedSettings {
    /// Targets per window (one optimizer step each).
    pub window: usize,
    /// Prompt tokens before the answer's [`BenchSettings::seq`] tokens.
    pub prompt: usize,
    /// Timed rounds, each one epoch of the sample both ways, alternating (at least 1).
    pub rounds: u64,
}

/// Where a training step's time goes, in milliseconds per step (or per window).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Phases {
    /// The decoder body's forward pass.
    pub body_forward: f64,
    /// LM head, cross-entropy and the plugin's weights.
    pub head_ce_weights: f64,
    /// The backward pass.
    pub backward: f64,
    /// The rest of the micro-batch (upload, bookkeeping); 0 in windowed mode, which does not split it out.
    pub other: f64,
    /// The AdamW update.
    pub optimizer: f64,
}

/// One fused CPU kernel's share of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    /// The kernel's profiler name.
    pub name: &'static str,
    /// Milliseconds per step (or per window).
    pub ms: f64,
    /// Calls over the timed steps (0: the kernel did not run, e.g. off the CPU or with `YTRAINER_FUSED=0`).
    pub calls: u64,
}

/// The throughput benchmark's measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// Trained tokens per second over the timed steps.
    pub tokens_per_s: f64,
    /// Median wall time of one timed step.
    pub median_step_s: f64,
    /// Peak resident set size of the process in MiB, where the platform tells.
    pub peak_rss_mb: Option<f64>,
    /// Mean cross-entropy of the last step: the same random data and seed give the same value, so it checks
    /// that a speed change left the numbers alone.
    pub final_ce: f64,
    /// Median microseconds of one weights call of the plugin on a step's tokens.
    pub plugin_weights_us: f64,
    /// Time per timed step by phase.
    pub phases_ms: Phases,
    /// Every profiled kernel, called or not, in the profiler's order.
    pub kernels_ms: Vec<KernelTime>,
}

/// The windowed comparison's measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowedReport {
    /// Windows in one epoch of the sample.
    pub windows: usize,
    /// Seconds of one epoch, ytrainer's way, per round.
    pub ytrainer_s_per_round: Vec<f64>,
    /// Seconds of one epoch, the seed's way, per round.
    pub seed_way_s_per_round: Vec<f64>,
    /// The seed's time over ytrainer's, per round.
    pub speedup_per_round: Vec<f64>,
    /// Median of [`Self::ytrainer_s_per_round`].
    pub ytrainer_s: f64,
    /// Median of [`Self::seed_way_s_per_round`].
    pub seed_way_s: f64,
    /// Median of [`Self::speedup_per_round`] (not the ratio of the medians: the machine's speed drifts between
    /// rounds, and a per-round ratio compares the two ways under the same conditions).
    pub speedup: f64,
    /// Smallest and largest per-round speedup.
    pub speedup_range: (f64, f64),
    /// ytrainer's time per window by phase ([`Phases::other`] is 0).
    pub phases_ms: Phases,
    /// ytrainer's time per window in each kernel that ran, in the profiler's order.
    pub kernels_ms: Vec<(&'static str, f64)>,
    /// Peak resident set size of the process in MiB, where the platform tells.
    pub peak_rss_mb: Option<f64>,
}

fn shape_config(shape: BenchShape) -> Result<HfConfig> {
    let (model_type, vocab, hidden, inter, layers, heads, kv) = match shape {
        BenchShape::Tiny => ("qwen2", 8192, 256, 704, 4, 4, 2),
        BenchShape::Small => ("qwen2", 16384, 512, 1408, 8, 8, 4),
        BenchShape::Smollm2 => ("llama", 49152, 576, 1536, 30, 9, 3),
    };
    let json = serde_json::json!({
        "model_type": model_type, "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "tie_word_embeddings": true,
    });
    HfConfig::from_json_str(&json.to_string()).map_err(|e| invalid!("bench config: {e}"))
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if available.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn random_batch(b: usize, t: usize, vocab: usize, seed: u64) -> MicroBatch {
    // A self-contained deterministic stream, so every run benchmarks the same tokens.
    let mut rng = ytrainer_core::rng::SplitMix64::new(seed);
    let mut next = || rng.next_u64();
    let input_ids: Vec<u32> = (0..b * t).map(|_| (next() % vocab as u64) as u32).collect();
    MicroBatch {
        batch: b,
        seq: t,
        input_ids,
        position_ids: (0..b).flat_map(|_| 0..t as u32).collect(),
        segment_ids: vec![1; b * t],
        target_mask: (0..b * t).map(|p| p % t != 0).collect(),
        examples: (0..b).collect(),
        weights: Default::default(),
    }
}

/// The model (random, seed 0), the loss plugin, the device and the vocabulary size of a benchmark.
fn setup(s: &BenchSettings) -> Result<(Decoder, Box<dyn TokenReweighter>, Device, usize)> {
    let config = shape_config(s.shape)?;
    let device = ytrainer_core::device::select_with(&s.device, 0, s.precision)
        .map_err(|e| invalid!("{e}"))?;
    let adapter = match s.adapter {
        BenchAdapter::Full => AdapterSpec::Full,
        BenchAdapter::Lora { rank } => AdapterSpec::Lora(LoraConfig {
            r: rank.max(1),
            alpha: 2.0 * rank.max(1) as f64,
            ..LoraConfig::default()
        }),
    };
    if s.base != BaseWeights::F32 && matches!(s.adapter, BenchAdapter::Full) {
        bail!(
            "--quantize-base needs --mode lora: full fine-tuning trains the base weights, which stay f32"
        );
    }
    let model = init_random_with(&config, 0, &adapter, &device, s.base)?
        .with_gradient_checkpointing(s.gradient_checkpointing);
    let registry = crate::run::registry(&s.plugin_dirs, &[])?;
    let (loss, _) = registry.build(&s.loss, &Default::default())?;
    let LossFn::Token(plugin) = loss else {
        bail!("bench needs a token plugin, `{}` is pairwise", s.loss);
    };
    Ok((model, plugin, device, config.vocab_size))
}

/// Trains 2 warm-up and then `s.steps` timed steps on random rows, one micro-batch per optimizer step.
pub fn bench(s: &BenchSettings) -> Result<BenchReport> {
    let (mut model, plugin, device, vocab) = setup(s)?;
    let mut optim = AdamW::new(AdamWConfig::default());
    let mut acc = GradAccumulator::default();
    let warmup = 2;
    let mut step_times = Vec::new();
    let mut tokens = 0usize;
    let mut last = StepCounters::default();
    let mut optim_s = 0.0;
    for i in 0..warmup + s.steps {
        if i == warmup {
            ytrainer_core::step::profile_start();
            ytrainer_kernels::prof::start();
        }
        let mb = random_batch(s.batch, s.seq, vocab, i as u64);
        let t0 = Instant::now();
        let ctx = StepContext {
            step: i,
            progress: 0.0,
            zone_borders: [1.45, 6.6, 15.0],
        };
        let c = train_micro_batch(&model, &mb, plugin.as_ref(), ctx, &mut acc, &device)?;
        let scale = 1.0 / c.tokens.max(1) as f64;
        let to = Instant::now();
        model = optim.step(model, &mut acc, 1e-4, scale);
        if i >= warmup {
            optim_s += to.elapsed().as_secs_f64();
        }
        let dt = t0.elapsed().as_secs_f64();
        if i >= warmup {
            step_times.push(dt);
            tokens += s.batch * s.seq;
        }
        last = c;
    }
    let plugin_us = plugin_call_us(plugin.as_ref(), s.batch * s.seq, &device)?;
    let total: f64 = step_times.iter().sum();
    let mut sorted = step_times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let peak_rss_mb = peak_rss_mb();
    let [fwd, head, back, micro] = ytrainer_core::step::profile_read();
    let per = |x: f64| 1000.0 * x / s.steps.max(1) as f64;
    let kernels_ms = ytrainer_kernels::prof::read()
        .into_iter()
        .map(|(name, secs, calls)| KernelTime {
            name,
            ms: per(secs),
            calls,
        })
        .collect();
    Ok(BenchReport {
        tokens_per_s: tokens as f64 / total.max(1e-9),
        median_step_s: median,
        peak_rss_mb,
        final_ce: last.mean_ce(),
        plugin_weights_us: plugin_us,
        phases_ms: Phases {
            body_forward: per(fwd),
            head_ce_weights: per(head),
            backward: per(back),
            other: per(micro - fwd - head - back),
            optimizer: per(optim_s),
        },
        kernels_ms,
    })
}

/// Windowed mode: one sample, `w.prompt` prompt tokens then `s.seq` answer tokens, its answer cut into windows
/// of `w.window` targets, each window one forward/backward/AdamW step.
///
/// - **ytrainer**: the real planner (`plan_epoch` in windowed mode): each window's row ends at its last target
///   (later tokens cannot influence it) and logits are computed only at the window's positions.
/// - **the seed's way**: every window runs the whole prompt + answer and full-vocabulary logits and softmax for
///   every position, as the original does; the gradient is taken through all of them (the original masks the
///   other positions' labels, which costs the same dense softmax backward). Its cost, not its numbers, is what
///   is reproduced.
pub fn bench_windowed(s: &BenchSettings, w: &WindowedSettings) -> Result<WindowedReport> {
    if w.rounds == 0 {
        bail!("the windowed comparison needs at least one round");
    }
    let n = w.window;
    let (model, plugin, device, vocab) = setup(s)?;
    let len = w.prompt + s.seq;
    let ids = random_batch(1, len, vocab, 7).input_ids;
    let targets: Vec<bool> = (0..len).map(|t| t >= w.prompt.max(1)).collect();
    let example = Example::single(ids, targets, None);
    let opts = BatchOptions {
        seed: 0,
        shuffle: false,
        micro_batch_tokens: len,
        max_micro_batch_size: 1,
        tokens_per_step: n,
        mode: Mode::Windowed { token_batch: n },
        micro_batches_per_step: 0,
        pad_id: 0,
    };
    let ours: Vec<MicroBatch> = plan_epoch(std::slice::from_ref(&example), &opts, 0)?
        .into_iter()
        .flat_map(|s| s.micro_batches)
        .collect();
    let full = MicroBatch {
        batch: 1,
        seq: len,
        input_ids: example.input_ids.clone(),
        position_ids: (0..len as u32).collect(),
        segment_ids: vec![1; len],
        target_mask: (0..len).map(|t| t > 0).collect(),
        examples: vec![0],
        weights: Default::default(),
    };
    let seed_way: Vec<MicroBatch> = ours.iter().map(|_| full.clone()).collect();
    // Our side's phase and kernel totals over its timed rounds (`[forward, head, backward, optimizer]`).
    let mut phases = [0.0f64; 4];
    let mut kernels: Vec<(&'static str, f64)> = Vec::new();
    let mut run =
        |model: Decoder, batches: &[MicroBatch], profile: bool| -> Result<(f64, Decoder)> {
            let mut model = model;
            let mut optim = AdamW::new(AdamWConfig::default());
            let mut acc = GradAccumulator::default();
            if profile {
                ytrainer_core::step::profile_start();
                ytrainer_kernels::prof::start();
            }
            let mut optim_s = 0.0;
            let t0 = Instant::now();
            for (i, mb) in batches.iter().enumerate() {
                let ctx = StepContext {
                    step: i,
                    progress: 0.0,
                    zone_borders: [1.45, 6.6, 15.0],
                };
                let c = train_micro_batch(&model, mb, plugin.as_ref(), ctx, &mut acc, &device)?;
                let to = Instant::now();
                model = optim.step(model, &mut acc, 1e-4, 1.0 / c.tokens.max(1) as f64);
                optim_s += to.elapsed().as_secs_f64();
            }
            let elapsed = t0.elapsed().as_secs_f64();
            if profile {
                let [fwd, head, back, _] = ytrainer_core::step::profile_read();
                for (p, v) in phases.iter_mut().zip([fwd, head, back, optim_s]) {
                    *p += v;
                }
                for (i, (name, s, _)) in ytrainer_kernels::prof::read().into_iter().enumerate() {
                    match kernels.get_mut(i) {
                        Some(k) => k.1 += s,
                        None => kernels.push((name, s)),
                    }
                }
            }
            Ok((elapsed, model))
        };
    // Warm-up on two windows of each kind, then the timed rounds: one epoch each way, alternating.
    let (_, mut model) = run(model, &ours[..ours.len().min(2)], false)?;
    (_, model) = run(model, &seed_way[..2.min(seed_way.len())], false)?;
    let (mut t_ours, mut t_seed) = (Vec::new(), Vec::new());
    for _ in 0..w.rounds {
        let (t, m) = run(model, &ours, true)?;
        t_ours.push(t);
        let (t, m) = run(m, &seed_way, false)?;
        t_seed.push(t);
        model = m;
    }
    let ratios: Vec<f64> = t_seed
        .iter()
        .zip(&t_ours)
        .map(|(s, o)| s / o.max(1e-9))
        .collect();
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let (m_ours, m_seed, m_ratio) = (median(&t_ours), median(&t_seed), median(&ratios));
    let (lo, hi) = ratios
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(l, h), &r| (l.min(r), h.max(r)));
    let per_window = |secs: f64| 1000.0 * secs / (w.rounds as f64 * ours.len().max(1) as f64);
    let [fwd, head, back, opt] = phases.map(per_window);
    let kernels = kernels
        .into_iter()
        .map(|(k, secs)| (k, per_window(secs)))
        .collect();
    Ok(WindowedReport {
        windows: ours.len(),
        ytrainer_s_per_round: t_ours,
        seed_way_s_per_round: t_seed,
        speedup_per_round: ratios,
        ytrainer_s: m_ours,
        seed_way_s: m_seed,
        speedup: m_ratio,
        speedup_range: (lo, hi),
        phases_ms: Phases {
            body_forward: fwd,
            head_ce_weights: head,
            backward: back,
            other: 0.0,
            optimizer: opt,
        },
        kernels_ms: kernels,
        peak_rss_mb: peak_rss_mb(),
    })
}

/// Median wall time of one `try_weights` call on `n` tokens, in microseconds: the plugin's own share of a
/// step (for external plugins: device->host copy, the library call, checks and host->device copy).
fn plugin_call_us(plugin: &dyn TokenReweighter, n: usize, device: &Device) -> Result<f64> {
    let losses: Vec<f32> = (0..n).map(|i| (i % 200) as f32 * 0.1).collect();
    let needs = plugin.needs();
    let mut stats = TokenStats::from_loss(tensor_from_slice(&losses, device));
    let half = vec![0.5f32; n];
    stats.entropy = needs.entropy.then(|| tensor_from_slice(&half, device));
    stats.top_k_entropy = (needs.top_k_entropy > 0).then(|| tensor_from_slice(&half, device));
    stats.reference_loss = needs
        .reference_loss
        .then(|| tensor_from_slice(&half, device));
    stats.position = needs.position.then(|| (0..n as u32).collect());
    stats.sample = needs.sample.then(|| vec![0; n]);
    let mut times = Vec::new();
    for _ in 0..50 {
        let t0 = Instant::now();
        let w = plugin.try_weights(&stats).map_err(RecipeError::Invalid)?;
        // Reading the result back forces lazy backends to finish the work.
        let _ = tensor_to_vec(w);
        times.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
