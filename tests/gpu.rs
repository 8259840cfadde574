//! The GPU tensor path on Burn's wgpu backend (the CLI's `wgpu` feature; `.ci/run` installs Mesa's software
//! Vulkan driver, lavapipe, and runs these): the path CUDA takes (cubecl kernels, no fused CPU kernel), checked
//! against transformers' references of the tiny Qwen2 checkpoint and against the CPU run of the same config.
//! Empty without the feature.
#![cfg(feature = "wgpu")]

mod common;
use common::*;

#[path = "../crates/ytrainer-models/tests/common/mod.rs"]
#[allow(unused)]
mod reference;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{LossFn, Registry};
use ytrainer_core::optim::GradAccumulator;
use ytrainer_core::step::{StepContext, train_micro_batch};
use ytrainer_data::MicroBatch;
use ytrainer_models::{AdapterSpec, Decoder, load_pretrained};
use ytrainer_plugin_ce as _;

/// `ytrainer ARGS` from the repository root, with a private `XDG_RUNTIME_DIR`: without one, Mesa's Vulkan
/// loader prints `error: XDG_RUNTIME_DIR is invalid or not set` lines (harmless; docs/gpu.md).
fn yt(args: &[&str]) -> std::process::Output {
    let xdg = std::env::temp_dir().join(format!("ytrainer-gpu-xdg-{}", std::process::id()));
    std::fs::create_dir_all(&xdg).unwrap();
    std::process::Command::new(bin())
        .args(args)
        .current_dir(root())
        .env("XDG_RUNTIME_DIR", &xdg)
        .output()
        .expect("failed to start ytrainer")
}

fn wgpu() -> Device {
    ytrainer_core::device::select("wgpu", 0).expect("a wgpu adapter (CI: Mesa's lavapipe)")
}

fn tiny(device: &Device) -> Decoder {
    load_pretrained(&assets().join("tiny-qwen2"), &AdapterSpec::Full, device)
        .unwrap()
        .0
}

/// One micro-batch of the reference ids, every position after the first supervised.
fn reference_batch(ids: &[i64]) -> MicroBatch {
    let t = 16;
    MicroBatch {
        batch: 2,
        seq: t,
        input_ids: ids.iter().map(|&i| i as u32).collect(),
        position_ids: (0..2).flat_map(|_| 0..t as u32).collect(),
        segment_ids: vec![1; 2 * t],
        target_mask: (0..2).flat_map(|_| (0..t).map(|p| p > 0)).collect(),
        examples: vec![0, 1],
        weights: Default::default(),
    }
}

/// The L2 norm of every parameter's gradient after one training step (mean CE over the 30 targets), by HF name.
fn step_gradient_norms(m: &Decoder, ids: &[i64], device: &Device) -> BTreeMap<String, f64> {
    let LossFn::Token(ce) = Registry::discover()
        .build("ce", &BTreeMap::new())
        .unwrap()
        .0
    else {
        unreachable!()
    };
    let mut acc = GradAccumulator::default();
    let ctx = StepContext {
        step: 0,
        progress: 0.0,
        zone_borders: [1.45, 6.6, 15.0],
    };
    let c =
        train_micro_batch(m, &reference_batch(ids), ce.as_ref(), ctx, &mut acc, device).unwrap();
    assert_eq!(c.tokens, 30);
    struct Paths(
        Vec<String>,
        Vec<(ytrainer_core::burn::module::ParamId, String)>,
    );
    impl ytrainer_core::burn::module::ModuleVisitor for Paths {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.0.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(
            &mut self,
            p: &ytrainer_core::burn::module::Param<Tensor<D>>,
        ) {
            self.1.push((p.id, self.0.join(".")));
        }
    }
    let mut paths = Paths(Vec::new(), Vec::new());
    ytrainer_core::burn::module::Module::visit(m, &mut paths);
    paths
        .1
        .into_iter()
        .filter_map(|(id, path)| {
            let g = acc.get(&id)?.clone();
            let norm = g.powi_scalar(2).sum().sqrt().into_scalar::<f32>() as f64 / 30.0;
            Some((format!("model.{path}"), norm))
        })
        .collect()
}

/// The in-process half, one test so that the kernel counters see this path alone: transformers parity of the
/// tiny Qwen2 on wgpu (logits, per-token CE, the gradient of every parameter through Burn's autodiff and through
/// the trainer's step, with and without gradient checkpointing), and not one fused CPU kernel called on the way.
#[test]
fn tiny_qwen2_on_wgpu_matches_transformers_without_a_cpu_kernel() {
    let device = wgpu();
    assert!(
        !ytrainer_kernels::on_host(&Tensor::<1, Int>::zeros([1], &device)),
        "a wgpu tensor must not count as a CPU one"
    );
    ytrainer_kernels::prof::start();
    let npz = reference::read_npz(&assets().join("tiny-qwen2/reference.npz"));
    let ids = &npz["input_ids"].i64;
    let model = tiny(&device);

    // 1. Logits at every position and per-token CE, through Burn's autodiff.
    let input = reference::plain_input(ids, 2, 16, &device);
    let logits = model.forward(&input);
    let diff = reference::max_abs_diff(&reference::to_vec(logits.clone()), &npz["logits"].f32);
    println!("wgpu logits max |diff| vs transformers: {diff:e}");
    assert!(diff <= 1e-4, "logits differ by {diff}");
    let ce = reference::per_token_ce(logits, &input.input_ids);
    let diff = reference::max_abs_diff(&reference::to_vec(ce.clone()), &npz["loss_per_token"].f32);
    println!("wgpu per-token CE max |diff| vs transformers: {diff:e}");
    assert!(diff <= 1e-4, "per-token CE differs by {diff}");
    let grads = ce.mean().backward();
    let ours = reference::grads_by_path(&model, &grads);
    let norms = reference::reference_grad_norms();
    assert_eq!(ours.len(), norms.len());
    let mut worst = 0.0f64;
    for (name, &want) in &norms {
        let (_, g) = &ours[name.strip_prefix("model.").unwrap()];
        worst = worst.max((reference::l2(g) - want).abs() / want);
    }
    // (The CPU parity test, crates/ytrainer-models/tests/parity.rs, holds the same 1e-4 against transformers;
    // step 3 below compares wgpu with the CPU at 1e-4.)
    println!("wgpu autodiff gradient norms: max rel diff vs transformers {worst:e}");
    assert!(
        worst <= 1e-4,
        "autodiff gradient norms differ by {worst} (relative)"
    );

    // 2. The trainer's step (LM head and CE outside autodiff on device tensors), plain and recomputing.
    let plain = step_gradient_norms(&model, ids, &device);
    let recomputed = step_gradient_norms(
        &model.clone().with_gradient_checkpointing(true),
        ids,
        &device,
    );
    assert_eq!(plain.len(), norms.len(), "every parameter has a gradient");
    let mut worst = 0.0f64;
    for (name, &want) in &norms {
        let got = plain[name];
        worst = worst.max((got - want).abs() / want);
        assert!(
            (recomputed[name] - got).abs() <= 1e-6 * got,
            "{name}: gradient checkpointing {} vs plain {got}",
            recomputed[name]
        );
    }
    println!("wgpu step gradient norms: max rel diff vs transformers {worst:e}");
    assert!(
        worst <= 1e-4,
        "step gradient norms differ by {worst} (relative)"
    );

    let calls = || -> Vec<(&str, u64)> {
        ytrainer_kernels::prof::read()
            .into_iter()
            .filter(|(_, _, n)| *n > 0)
            .map(|(op, _, n)| (op, n))
            .collect()
    };
    assert!(
        calls().is_empty(),
        "fused CPU kernels ran on the wgpu path: {:?}",
        calls()
    );

    // 3. The counters can fail that check: the same step on the CPU runs the fused kernels, and gives the same
    //    gradient norms as wgpu's.
    let cpu = Device::flex().autodiff();
    let on_cpu = step_gradient_norms(&tiny(&cpu), ids, &cpu);
    assert!(!calls().is_empty(), "the CPU step is counted");
    for (name, got) in &plain {
        let want = on_cpu[name];
        assert!(
            (got - want).abs() <= 1e-4 * want,
            "{name}: wgpu {got} vs cpu {want}"
        );
    }
}

/// `ytrainer run` with `--device DEVICE` and `extra` flags on the tiny Qwen2, into `dir/DEVICE`.
fn run(dir: &Path, device: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(device.replace(':', "-"));
    let mut args = vec![
        "run".to_string(),
        "--model".into(),
        s(&assets().join("tiny-qwen2")),
        "--device".into(),
        device.into(),
        "--output-dir".into(),
        s(&out),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = yt(&refs);
    assert!(o.status.success(), "{device}: {}", stderr(&o));
    out
}

fn losses(out: &Path, key: &str) -> Vec<f64> {
    jsonl(&out.join("metrics.jsonl"))
        .iter()
        .map(|m| m[key].as_f64().unwrap())
        .collect()
}

/// A short NLIRG LoRA run on wgpu tracks the CPU run of the same config step by step (dropout off: the two
/// backends draw different masks); scoring the adapter it exported, with `lora_dropout` 0.1 in its config (which
/// inference must ignore), gives the CPU's per-token values, and greedy generation the CPU's tokens.
#[test]
fn nlirg_lora_run_and_score_on_wgpu_track_the_cpu() {
    let d = TempDir::new("gpu-nlirg");
    let flags = [
        "--data",
        "examples/quickstart/train.jsonl",
        "--loss",
        "nlirg",
        "--adapter",
        "lora",
        "--lora-r",
        "4",
        "--max-steps",
        "4",
        "--tokens-per-step",
        "96",
        "--learning-rate",
        "0.002",
    ];
    let cpu = run(d.path(), "cpu", &flags);
    let gpu = run(d.path(), "wgpu", &flags);
    let (a, b) = (losses(&cpu, "loss"), losses(&gpu, "loss"));
    assert_eq!(a.len(), 4);
    assert_eq!(a.len(), b.len());
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-3,
            "step {}: cpu loss {x}, wgpu {y}",
            step + 1
        );
    }
    assert_ne!(a[1], a[0], "the steps differ: {a:?}");

    let config = cpu.join("final/adapter_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["lora_dropout"] = 0.1.into();
    std::fs::write(&config, c.to_string()).unwrap();
    let ids = d.path().join("ids.json");
    std::fs::write(
        &ids,
        "[[5157, 235, 3980, 5192, 7935, 905, 2763], [3462, 7449, 1202, 5396]]",
    )
    .unwrap();
    let score = |device: &str| -> Vec<f64> {
        let out = d.path().join(format!("score-{device}.jsonl"));
        let o = yt(&[
            "score",
            "--model",
            &s(&assets().join("tiny-qwen2")),
            "--adapter",
            &s(&cpu.join("final")),
            "--ids-json",
            &s(&ids),
            "--out",
            &s(&out),
            "--device",
            device,
        ]);
        assert!(o.status.success(), "{device}: {}", stderr(&o));
        jsonl(&out)
            .iter()
            .flat_map(|r| {
                r["tokens"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t["loss"].as_f64().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let (a, b) = (score("cpu"), score("wgpu"));
    assert_eq!(a.len(), 6 + 3);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-4, "score: cpu {x}, wgpu {y}");
    }

    // Greedy generation with the adapter: the same tokens.
    let generate = |device: &str| -> serde_json::Value {
        let o = yt(&[
            "generate",
            "--model",
            &s(&assets().join("tiny-qwen2")),
            "--adapter",
            &s(&cpu.join("final")),
            "--prompt-ids",
            "5157,235,3980",
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
            "--json",
            "--device",
            device,
        ]);
        assert!(o.status.success(), "{device}: {}", stderr(&o));
        serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap()
    };
    let (a, b) = (generate("cpu"), generate("wgpu"));
    assert_eq!(a["output_ids"].as_array().unwrap().len(), 8, "{a}");
    assert_eq!(a["output_ids"], b["output_ids"]);
}

/// LoRA over a quantised base (QLoRA, q8_0 on load): the CPU's fused quantised linear and wgpu's dequantising
/// path give the same per-step losses.
#[test]
fn qlora_on_wgpu_tracks_the_cpu() {
    let d = TempDir::new("gpu-qlora");
    let flags = [
        "--data",
        "examples/quickstart/train.jsonl",
        "--quantize-base",
        "q8_0",
        "--lora-r",
        "4",
        "--max-steps",
        "2",
        "--tokens-per-step",
        "96",
        "--learning-rate",
        "0.002",
    ];
    let (a, b) = (
        losses(&run(d.path(), "cpu", &flags), "loss"),
        losses(&run(d.path(), "wgpu", &flags), "loss"),
    );
    assert_eq!(a.len(), 2);
    assert_eq!(a.len(), b.len());
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-3,
            "step {}: cpu loss {x}, wgpu {y}",
            step + 1
        );
    }
}

/// DPO's step-0 identity on wgpu: a fresh LoRA (B = 0) is its own reference, so every pair's loss is ln 2.
#[test]
fn dpo_step_zero_is_ln2_on_wgpu() {
    let d = TempDir::new("gpu-dpo");
    let data = small_pairs(d.path(), 2);
    let out = run(
        d.path(),
        "wgpu",
        &[
            "--data",
            &s(&data),
            "--loss",
            "dpo",
            "--max-steps",
            "1",
            "--set",
            "preference.pairs_per_step=2",
        ],
    );
    let m = jsonl(&out.join("metrics.jsonl"));
    assert!(
        (m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        m[0]
    );
    assert_eq!(m[0]["rewards/accuracy"], 0.0);
}

/// bf16 has no WGSL type: asked for on wgpu, the run stops before loading anything and says what to use.
#[test]
fn bf16_on_wgpu_is_refused_with_what_to_use() {
    let d = TempDir::new("gpu-bf16");
    let o = yt(&[
        "run",
        "--model",
        &s(&assets().join("tiny-qwen2")),
        "--data",
        "examples/quickstart/train.jsonl",
        "--device",
        "wgpu",
        "--precision",
        "bf16",
        "--output-dir",
        &s(&d.path().join("out")),
    ]);
    assert_user_error(
        &o,
        "device `wgpu` cannot train in bf16: the wgpu backend has no bf16 type (WGSL has none); use \
         `--precision f32`",
    );
    let o = yt(&[
        "run",
        "--preset",
        "tiny",
        "--data",
        "examples/quickstart/train.jsonl",
        "--device",
        "wgpu:x",
        "--output-dir",
        &s(&d.path().join("out")),
    ]);
    assert_user_error(
        &o,
        "invalid device `wgpu:x`: expected `wgpu:N` with N a GPU index, e.g. `wgpu:0`",
    );
    let o = yt(&[
        "run",
        "--preset",
        "tiny",
        "--data",
        "examples/quickstart/train.jsonl",
        "--device",
        "wgpu:64",
        "--output-dir",
        &s(&d.path().join("out")),
    ]);
    assert_user_error(&o, "device `wgpu:64`: this machine has ");
}
