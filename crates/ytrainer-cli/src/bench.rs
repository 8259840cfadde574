//! `ytrainer bench`: flags -> [`ytrainer_recipes::bench`] (throughput, or the windowed comparison) -> a text
//! summary or one JSON object on stdout.

use anyhow::Result;
use ytrainer_recipes::bench::{
    BenchAdapter, BenchReport, BenchSettings, WindowedReport, WindowedSettings,
};

use crate::cli::{BenchArgs, BenchMode, BenchShape, Format};

fn settings(a: &BenchArgs) -> BenchSettings {
    BenchSettings {
        shape: match a.shape {
            BenchShape::Tiny => ytrainer_recipes::bench::BenchShape::Tiny,
            BenchShape::Small => ytrainer_recipes::bench::BenchShape::Small,
            BenchShape::Smollm2 => ytrainer_recipes::bench::BenchShape::Smollm2,
        },
        adapter: match a.mode {
            BenchMode::Full => BenchAdapter::Full,
            BenchMode::Lora => BenchAdapter::Lora { rank: a.rank },
        },
        steps: a.steps,
        loss: a.loss.clone(),
        batch: a.batch,
        seq: a.seq,
        device: a.device.clone(),
        precision: a.precision,
        gradient_checkpointing: a.gradient_checkpointing,
        base: a
            .quantize_base
            .as_deref()
            .and_then(ytrainer_models::BaseWeights::parse_quantize)
            .unwrap_or_default(),
        plugin_dirs: crate::plugins_cmd::cli_plugin_dirs(),
    }
}

/// Runs the benchmark and prints tokens/s and peak RSS.
pub fn bench(a: BenchArgs) -> Result<()> {
    let s = settings(&a);
    if let Some(n) = a.windowed {
        let w = WindowedSettings {
            window: n,
            prompt: a.prompt,
            rounds: a.rounds,
        };
        let r = ytrainer_recipes::bench::bench_windowed(&s, &w)?;
        print_windowed(&a, n, &r);
        return Ok(());
    }
    let r = ytrainer_recipes::bench::bench(&s)?;
    print_bench(&a, &r);
    Ok(())
}

fn print_bench(a: &BenchArgs, r: &BenchReport) {
    let shape = format!("{:?}", a.shape).to_lowercase();
    let mode = format!("{:?}", a.mode).to_lowercase();
    let p = &r.phases_ms;
    match a.format {
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "shape": shape, "mode": mode, "loss": a.loss, "batch": a.batch, "seq": a.seq,
                "steps": a.steps, "tokens_per_s": r.tokens_per_s, "median_step_s": r.median_step_s,
                "peak_rss_mb": r.peak_rss_mb, "final_ce": r.final_ce, "device": a.device,
                "precision": a.precision.name(), "gradient_checkpointing": a.gradient_checkpointing,
                "quantize_base": a.quantize_base, "plugin_weights_us": r.plugin_weights_us,
                "phases_ms": {
                    "body_forward": p.body_forward, "head_ce_weights": p.head_ce_weights,
                    "backward": p.backward, "other": p.other, "optimizer": p.optimizer,
                },
                "kernels_ms": r.kernels_ms.iter().map(|k| (k.name.to_string(), serde_json::json!(k.ms)))
                    .collect::<serde_json::Map<_, _>>(),
            })
        ),
        Format::Text => {
            println!(
                "bench {shape}/{mode} loss={} batch {}x{} {}{}{}: {:.0} tokens/s (median step {:.3}s over {} steps), peak RSS {} MiB, last CE {:.4}",
                a.loss,
                a.batch,
                a.seq,
                a.precision,
                if a.gradient_checkpointing {
                    " gradient checkpointing"
                } else {
                    ""
                },
                a.quantize_base
                    .as_deref()
                    .map(|q| format!(" base {q}"))
                    .unwrap_or_default(),
                r.tokens_per_s,
                r.median_step_s,
                a.steps,
                r.peak_rss_mb
                    .map(|m| format!("{m:.0}"))
                    .unwrap_or_else(|| "n/a".into()),
                r.final_ce
            );
            println!(
                "  per step: body forward {:.0} ms, LM head + CE + weights {:.0} ms, backward {:.0} ms, other {:.0} ms, optimizer {:.0} ms",
                p.body_forward, p.head_ce_weights, p.backward, p.other, p.optimizer
            );
            let kernels: Vec<String> = r
                .kernels_ms
                .iter()
                .filter(|k| k.calls > 0)
                .map(|k| format!("{} {:.1}", k.name, k.ms))
                .collect();
            if !kernels.is_empty() {
                println!("  fused CPU kernels, ms per step: {}", kernels.join(", "));
            }
            println!(
                "  plugin `{}`: {:.1} us per weights call on {} tokens (median of 50, detached losses already on the device)",
                a.loss,
                r.plugin_weights_us,
                a.batch * a.seq
            );
        }
    }
}

fn print_windowed(a: &BenchArgs, n: usize, r: &WindowedReport) {
    let shape = format!("{:?}", a.shape).to_lowercase();
    let mode = format!("{:?}", a.mode).to_lowercase();
    let p = &r.phases_ms;
    match a.format {
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "ytrainer_window_phases_ms": {
                    "body_forward": p.body_forward, "head_ce_weights": p.head_ce_weights,
                    "backward": p.backward, "optimizer": p.optimizer,
                },
                "ytrainer_window_kernels_ms": r.kernels_ms.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v)))
                    .collect::<serde_json::Map<_, _>>(),
                "shape": shape, "mode": mode, "windowed": n, "prompt": a.prompt, "answer": a.seq,
                "windows": r.windows, "rounds": a.rounds, "ytrainer_s": r.ytrainer_s,
                "seed_way_s": r.seed_way_s, "speedup": r.speedup,
                "ytrainer_s_per_round": r.ytrainer_s_per_round, "seed_way_s_per_round": r.seed_way_s_per_round,
                "speedup_per_round": r.speedup_per_round, "peak_rss_mb": r.peak_rss_mb,
            })
        ),
        Format::Text => {
            let (lo, hi) = r.speedup_range;
            println!(
                "bench {shape}/{mode} windowed N={n}, prompt {} + answer {} tokens ({} windows): ytrainer {:.2}s, the seed's way {:.2}s per epoch of the sample: {:.1}x faster (median of {} alternating rounds, {:.1}-{:.1}x)",
                a.prompt, a.seq, r.windows, r.ytrainer_s, r.seed_way_s, r.speedup, a.rounds, lo, hi
            );
            println!(
                "  ytrainer per window: body forward {:.1} ms, LM head + CE + weights {:.1} ms, backward {:.1} ms, optimizer {:.1} ms",
                p.body_forward, p.head_ce_weights, p.backward, p.optimizer
            );
            let list: Vec<String> = r
                .kernels_ms
                .iter()
                .map(|(k, v)| format!("{k} {v:.1}"))
                .collect();
            println!("  fused CPU kernels, ms per window: {}", list.join(", "));
        }
    }
}
