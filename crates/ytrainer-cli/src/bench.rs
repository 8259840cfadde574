//! `ytrainer bench`: training throughput and peak memory on the fixed shapes PyTorch + PEFT was measured on
//! (fp32, random data, every position supervised, AdamW). Uses the real training step and optimizer.

use std::time::Instant;

use anyhow::{Result, anyhow};
use ytrainer_core::loss::LossFn;
use ytrainer_core::optim::{AdamW, AdamWConfig, GradAccumulator};
use ytrainer_core::step::{StepContext, StepCounters, train_micro_batch};
use ytrainer_data::MicroBatch;
use ytrainer_models::{AdapterSpec, HfConfig, LoraConfig, init_random};

use crate::cli::{BenchArgs, BenchMode, BenchShape, Format};

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
    HfConfig::from_json_str(&json.to_string()).map_err(|e| anyhow!("bench config: {e}"))
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
    }
}

type Setup = (
    ytrainer_models::Decoder,
    Box<dyn ytrainer_core::loss::TokenReweighter>,
    ytrainer_core::burn::prelude::Device,
    usize,
);

/// The model (random, seed 0), the loss plugin and the device of a benchmark.
fn setup(a: &BenchArgs) -> Result<Setup> {
    let config = shape_config(a.shape)?;
    let device =
        ytrainer_core::device::select_with(&a.device, 0, a.precision).map_err(|e| anyhow!(e))?;
    let adapter = match a.mode {
        BenchMode::Full => AdapterSpec::Full,
        BenchMode::Lora => AdapterSpec::Lora(LoraConfig {
            r: a.rank.max(1),
            alpha: 2.0 * a.rank.max(1) as f64,
            ..LoraConfig::default()
        }),
    };
    let model = init_random(&config, 0, &adapter, &device)?
        .with_gradient_checkpointing(a.gradient_checkpointing);
    let registry = crate::plugins_cmd::registry(&[])?;
    let (loss, _) = registry.build(&a.loss, &Default::default())?;
    let LossFn::Token(plugin) = loss else {
        return Err(anyhow!(
            "bench needs a token plugin, `{}` is pairwise",
            a.loss
        ));
    };
    Ok((model, plugin, device, config.vocab_size))
}

/// Runs the benchmark and prints tokens/s and peak RSS.
pub fn bench(a: BenchArgs) -> Result<()> {
    if let Some(n) = a.windowed {
        return bench_windowed(&a, n);
    }
    let (mut model, plugin, device, vocab) = setup(&a)?;
    let mut optim = AdamW::new(AdamWConfig::default());
    let mut acc = GradAccumulator::default();
    let warmup = 2;
    let mut step_times = Vec::new();
    let mut tokens = 0usize;
    let mut last = StepCounters::default();
    let mut optim_s = 0.0;
    for i in 0..warmup + a.steps {
        if i == warmup {
            ytrainer_core::step::profile_start();
            ytrainer_kernels::prof::start();
        }
        let mb = random_batch(a.batch, a.seq, vocab, i as u64);
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
            tokens += a.batch * a.seq;
        }
        last = c;
    }
    let plugin_us = plugin_call_us(plugin.as_ref(), a.batch * a.seq, &device)?;
    let total: f64 = step_times.iter().sum();
    let mut sorted = step_times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let tps = tokens as f64 / total.max(1e-9);
    let rss = peak_rss_mb();
    let shape = format!("{:?}", a.shape).to_lowercase();
    let mode = format!("{:?}", a.mode).to_lowercase();
    let [fwd, head, back, micro] = ytrainer_core::step::profile_read();
    let per = |x: f64| 1000.0 * x / a.steps.max(1) as f64;
    let ops = ytrainer_kernels::prof::read();
    let ops_json: serde_json::Map<String, serde_json::Value> = ops
        .iter()
        .map(|(name, s, _)| (name.to_string(), serde_json::json!(per(*s))))
        .collect();
    match a.format {
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "shape": shape, "mode": mode, "loss": a.loss, "batch": a.batch, "seq": a.seq,
                "steps": a.steps, "tokens_per_s": tps, "median_step_s": median,
                "peak_rss_mb": rss, "final_ce": last.mean_ce(), "device": a.device,
                "precision": a.precision.name(), "gradient_checkpointing": a.gradient_checkpointing,
                "plugin_weights_us": plugin_us,
                "phases_ms": {
                    "body_forward": per(fwd), "head_ce_weights": per(head), "backward": per(back),
                    "other": per(micro - fwd - head - back), "optimizer": per(optim_s),
                },
                "kernels_ms": ops_json,
            })
        ),
        Format::Text => println!(
            "bench {shape}/{mode} loss={} batch {}x{} {}{}: {:.0} tokens/s (median step {:.3}s over {} steps), peak RSS {} MiB, last CE {:.4}",
            a.loss,
            a.batch,
            a.seq,
            a.precision,
            if a.gradient_checkpointing {
                " gradient checkpointing"
            } else {
                ""
            },
            tps,
            median,
            a.steps,
            rss.map(|r| format!("{r:.0}"))
                .unwrap_or_else(|| "n/a".into()),
            last.mean_ce()
        ),
    }
    if a.format == Format::Text {
        println!(
            "  per step: body forward {:.0} ms, LM head + CE + weights {:.0} ms, backward {:.0} ms, other {:.0} ms, optimizer {:.0} ms",
            per(fwd),
            per(head),
            per(back),
            per(micro - fwd - head - back),
            per(optim_s)
        );
        let kernels: Vec<String> = ops
            .iter()
            .filter(|(_, _, calls)| *calls > 0)
            .map(|(name, s, _)| format!("{name} {:.1}", per(*s)))
            .collect();
        if !kernels.is_empty() {
            println!("  fused CPU kernels, ms per step: {}", kernels.join(", "));
        }
        println!(
            "  plugin `{}`: {:.1} us per weights call on {} tokens (median of 50, detached losses already on the device)",
            a.loss,
            plugin_us,
            a.batch * a.seq
        );
    }
    Ok(())
}

/// Windowed mode (`--windowed N`): one sample, `prompt` prompt tokens then `seq` answer tokens, its answer cut
/// into windows of N targets, each window one forward/backward/AdamW step.
///
/// - **ytrainer**: the real planner (`plan_epoch` in windowed mode): each window's row ends at its last target
///   (later tokens cannot influence it) and logits are computed only at the window's N positions.
/// - **the seed's way**: every window runs the whole prompt + answer and full-vocabulary logits and softmax for
///   every position, as the original does; the gradient is taken through all of them (the original masks the
///   other positions' labels, which costs the same dense softmax backward). Its cost, not its numbers, is what
///   is reproduced.
fn bench_windowed(a: &BenchArgs, n: usize) -> Result<()> {
    use ytrainer_data::batch::{BatchOptions, Mode, plan_epoch};
    use ytrainer_data::tokenize::Example;
    let (model, plugin, device, vocab) = setup(a)?;
    let len = a.prompt + a.seq;
    let ids = random_batch(1, len, vocab, 7).input_ids;
    let targets: Vec<bool> = (0..len).map(|t| t >= a.prompt.max(1)).collect();
    let example = Example::single(ids, targets, None);
    let opts = BatchOptions {
        seed: 0,
        shuffle: false,
        micro_batch_tokens: len,
        max_micro_batch_size: 1,
        tokens_per_step: n,
        mode: Mode::Windowed { token_batch: n },
        pad_id: 0,
    };
    let ours: Vec<MicroBatch> = plan_epoch(std::slice::from_ref(&example), &opts, 0)
        .map_err(|e| anyhow!("{e}"))?
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
    };
    let seed_way: Vec<MicroBatch> = ours.iter().map(|_| full.clone()).collect();
    // Our side's phase and kernel totals over its timed rounds (`[forward, head, backward, optimizer]`).
    let mut phases = [0.0f64; 4];
    let mut kernels: Vec<(&'static str, f64)> = Vec::new();
    let mut run = |model: ytrainer_models::Decoder,
                   batches: &[MicroBatch],
                   profile: bool|
     -> Result<(f64, ytrainer_models::Decoder)> {
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
    for _ in 0..a.rounds {
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
    let per_window = |s: f64| 1000.0 * s / (a.rounds as f64 * ours.len().max(1) as f64);
    let [fwd, head, back, opt] = phases.map(per_window);
    let kernels: Vec<(&str, f64)> = kernels
        .into_iter()
        .map(|(k, s)| (k, per_window(s)))
        .collect();
    let shape = format!("{:?}", a.shape).to_lowercase();
    let mode = format!("{:?}", a.mode).to_lowercase();
    match a.format {
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "ytrainer_window_phases_ms": {
                    "body_forward": fwd, "head_ce_weights": head, "backward": back, "optimizer": opt,
                },
                "ytrainer_window_kernels_ms": kernels.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v)))
                    .collect::<serde_json::Map<_, _>>(),
                "shape": shape, "mode": mode, "windowed": n, "prompt": a.prompt, "answer": a.seq,
                "windows": ours.len(), "rounds": a.rounds, "ytrainer_s": m_ours, "seed_way_s": m_seed,
                "speedup": m_ratio, "ytrainer_s_per_round": t_ours, "seed_way_s_per_round": t_seed,
                "speedup_per_round": ratios, "peak_rss_mb": peak_rss_mb(),
            })
        ),
        Format::Text => println!(
            "bench {shape}/{mode} windowed N={n}, prompt {} + answer {} tokens ({} windows): ytrainer {:.2}s, the seed's way {:.2}s per epoch of the sample: {:.1}x faster (median of {} alternating rounds, {:.1}-{:.1}x)",
            a.prompt,
            a.seq,
            ours.len(),
            m_ours,
            m_seed,
            m_ratio,
            a.rounds,
            lo,
            hi
        ),
    }
    if a.format == Format::Text {
        println!(
            "  ytrainer per window: body forward {fwd:.1} ms, LM head + CE + weights {head:.1} ms, backward {back:.1} ms, optimizer {opt:.1} ms"
        );
        let list: Vec<String> = kernels.iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
        println!("  fused CPU kernels, ms per window: {}", list.join(", "));
    }
    Ok(())
}

/// Median wall time of one `try_weights` call on `n` tokens, in microseconds: the plugin's own share of a
/// step (for external plugins: device->host copy, the library call, checks and host->device copy).
fn plugin_call_us(
    plugin: &dyn ytrainer_core::loss::TokenReweighter,
    n: usize,
    device: &ytrainer_core::burn::prelude::Device,
) -> Result<f64> {
    use ytrainer_core::loss::{TokenStats, tensor_from_slice, tensor_to_vec};
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
        let w = plugin.try_weights(&stats).map_err(|e| anyhow!(e))?;
        // Reading the result back forces lazy backends to finish the work.
        let _ = tensor_to_vec(w);
        times.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
