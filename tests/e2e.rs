//! Slow end-to-end runs (separate test target, still run by CI): training lowers eval loss, kill + resume is
//! exact, windowed mode trains every token once, LoRA on a real Hugging Face checkpoint exports a PEFT adapter.

mod common;
use common::*;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn summary(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn quickstart_lowers_eval_loss_and_exports_a_hf_checkpoint() {
    let d = TempDir::new("quick");
    let o = ytrainer(&[
        "run",
        "--config",
        "examples/quickstart/sft-nlirg.toml",
        "--output-dir",
        &s(d.path()),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("eval loss:"), "{out}");
    let sm = summary(d.path());
    let before = sm["summary"]["eval_before"]["eval_loss"].as_f64().unwrap();
    let after = sm["summary"]["eval_after"]["eval_loss"].as_f64().unwrap();
    assert!(after < 0.5 * before, "eval loss {before} -> {after}");
    assert_eq!(sm["summary"]["skipped_steps"], 0);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(d.path().join("final").join(f).exists(), "final/{f} missing");
    }
    // RoPE in both spellings: the preset's rope_theta (10000) at the top level and in rope_parameters.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("final/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["rope_theta"], 10000.0, "{cfg}");
    assert_eq!(cfg["rope_parameters"]["rope_theta"], 10000.0, "{cfg}");
    // metrics.jsonl carries the documented fields on every step
    let m = jsonl(&d.path().join("metrics.jsonl"));
    assert_eq!(m.len() as u64, sm["summary"]["steps"].as_u64().unwrap());
    for key in [
        "loss",
        "ce",
        "mean_weight",
        "zone_learned",
        "zone_learning",
        "zone_hard",
        "zone_noise",
        "token_accuracy",
        "lr",
        "grad_norm",
        "tokens_per_s",
    ] {
        assert!(m[0][key].is_number(), "metrics lack {key}: {}", m[0]);
    }
    let zones: f64 = ["zone_learned", "zone_learning", "zone_hard", "zone_noise"]
        .iter()
        .map(|k| m[5][k].as_f64().unwrap())
        .sum();
    assert!((zones - 1.0).abs() < 1e-9);
    // the exported full checkpoint loads back as a model and trains on
    let o = ytrainer(&[
        "run",
        "--model",
        &s(&d.path().join("final")),
        "--data",
        "examples/quickstart/eval.jsonl",
        "--max-steps",
        "1",
        "--adapter",
        "full",
        "--output-dir",
        &s(&d.path().join("again")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let again = summary(&d.path().join("again"));
    let b2 = again["summary"]["eval_before"]["eval_loss"]
        .as_f64()
        .unwrap();
    assert!(
        (b2 - after).abs() < 0.3,
        "reloaded model's loss {b2} far from trained {after}"
    );
}

fn last_metrics(dir: &std::path::Path) -> serde_json::Value {
    jsonl(&dir.join("metrics.jsonl")).pop().unwrap()
}

#[test]
fn killed_and_resumed_run_matches_uninterrupted_run() {
    let d = TempDir::new("resume");
    let common = |out: &std::path::Path| -> Vec<String> {
        [
            "run",
            "--config",
            "examples/quickstart/sft-nlirg.toml",
            "--max-steps",
            "12",
            "--save-every",
            "4",
            "--eval-every",
            "0",
            "--output-dir",
        ]
        .iter()
        .map(|x| x.to_string())
        .chain([s(out)])
        .collect()
    };
    let a = d.path().join("a");
    let args: Vec<String> = common(&a);
    let o = Command::new(bin())
        .args(&args)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // B: same run, killed (SIGKILL) once its first checkpoint exists.
    let b = d.path().join("b");
    let mut child = Command::new(bin())
        .args(common(&b))
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !b.join("checkpoint-4/trainer_state.json").exists()
        && t0.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        b.join("checkpoint-4").exists(),
        "no checkpoint written before the kill"
    );
    // Resume from the step-4 checkpoint explicitly: steps 5..12 are recomputed whatever the kill interrupted.
    let mut resume_args = common(&b);
    resume_args.extend(["--resume".to_string(), s(&b.join("checkpoint-4"))]);
    let o = Command::new(bin())
        .args(&resume_args)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resumed from"), "{}", stderr(&o));
    let (ma, mb) = (last_metrics(&a), last_metrics(&b));
    assert_eq!(ma["step"], 12);
    assert_eq!(mb["step"], 12);
    for key in ["loss", "ce", "grad_norm", "mean_weight"] {
        let (x, y) = (ma[key].as_f64().unwrap(), mb[key].as_f64().unwrap());
        assert!(
            (x - y).abs() <= 1e-6,
            "{key}: uninterrupted {x} vs resumed {y}"
        );
    }
    let (ea, eb) = (summary(&a), summary(&b));
    let (x, y) = (
        ea["summary"]["eval_after"]["eval_loss"].as_f64().unwrap(),
        eb["summary"]["eval_after"]["eval_loss"].as_f64().unwrap(),
    );
    assert!(
        (x - y).abs() <= 1e-6,
        "final eval loss: uninterrupted {x} vs resumed {y}"
    );

    // Resuming with a different training config is refused.
    let mut bad = common(&d.path().join("c"));
    bad.extend([
        "--resume".into(),
        s(&b),
        "--learning-rate".into(),
        "0.1".into(),
    ]);
    let o = Command::new(bin())
        .args(&bad)
        .current_dir(root())
        .output()
        .unwrap();
    assert_user_error(&o, "cannot resume from");
}

#[test]
fn windowed_mode_trains_every_supervised_token_exactly_once() {
    let d = TempDir::new("windowed");
    let o = ytrainer(&[
        "run",
        "--config",
        "examples/quickstart/sft-nlirg.toml",
        "--data",
        "examples/quickstart/eval.jsonl",
        "--eval-data",
        "examples/quickstart/eval.jsonl",
        "--epochs",
        "1",
        "--mode",
        "windowed",
        "--token-batch",
        "10",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--output-dir",
        &s(d.path()),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let sm = summary(d.path());
    let supervised = sm["data"]["supervised_tokens"].as_u64().unwrap();
    assert_eq!(
        sm["summary"]["tokens_trained"].as_u64().unwrap(),
        supervised
    );
    let m = jsonl(&d.path().join("metrics.jsonl"));
    assert!(m.iter().all(|l| l["tokens"].as_u64().unwrap() <= 10));
    // windows per example = ceil(targets / 10): more steps than one-pass, tail windows kept
    let full = m.iter().filter(|l| l["tokens"] == 10).count();
    assert!(
        full > 0 && full < m.len(),
        "expected full windows and tail windows"
    );
}

#[test]
fn lora_on_real_hf_checkpoint_exports_peft_adapter_and_continues_from_it() {
    let tiny = assets().join("tiny-qwen2");
    let data = assets().join("corpora/instruct/alpaca_en_demo.json");
    let d = TempDir::new("lora");
    for loss in ["ce", "nlirg"] {
        let out = d.path().join(loss);
        let o = ytrainer(&[
            "run",
            "--model",
            &s(&tiny),
            "--data",
            &s(&data),
            "--loss",
            loss,
            "--max-steps",
            "2",
            "--max-seq-len",
            "128",
            "--tokens-per-step",
            "256",
            "--set",
            "eval.max_samples=8",
            "--output-dir",
            &s(&out),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("final/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["r"], 16, "default adapter is LoRA r=16");
        let mut targets: Vec<&str> = cfg["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        targets.sort();
        assert_eq!(
            targets,
            [
                "down_proj",
                "gate_proj",
                "k_proj",
                "o_proj",
                "q_proj",
                "up_proj",
                "v_proj"
            ]
        );
        assert!(out.join("final/adapter_model.safetensors").exists());
    }
    // continue training from the exported adapter
    let out = d.path().join("continued");
    let o = ytrainer(&[
        "run",
        "--model",
        &s(&tiny),
        "--data",
        &s(&data),
        "--max-steps",
        "1",
        "--max-seq-len",
        "128",
        "--tokens-per-step",
        "256",
        "--set",
        "eval.max_samples=8",
        "--set",
        &format!("adapter.init_from=\"{}\"", s(&d.path().join("nlirg/final"))),
        "--output-dir",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = summary(&d.path().join("nlirg"))["summary"]["eval_after"]["eval_loss"]
        .as_f64()
        .unwrap();
    let cont = summary(&out)["summary"]["eval_before"]["eval_loss"]
        .as_f64()
        .unwrap();
    assert!(
        (first - cont).abs() < 1e-4,
        "loaded adapter reproduces the trained model: {first} vs {cont}"
    );
}

/// Every F32 value of a safetensors file, as raw bits.
fn f32_bits(path: &std::path::Path) -> Vec<u32> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = Vec::new();
    for (name, t) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(t["dtype"], "F32", "{name}");
        let [a, b] = [0, 1].map(|i| t["data_offsets"][i].as_u64().unwrap() as usize);
        out.extend(
            data[a..b]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap())),
        );
    }
    out
}

/// `--precision bf16` trains in bf16 (every exported weight is a bf16 value widened to f32), learns as the f32 run
/// does, and resumes exactly (the AdamW moments are saved and restored without loss).
#[test]
fn bf16_precision_trains_in_bf16_and_resumes_exactly() {
    let d = TempDir::new("bf16");
    let args = |out: &std::path::Path, precision: &str| -> Vec<String> {
        [
            "run",
            "--config",
            "examples/quickstart/sft-nlirg.toml",
            "--max-steps",
            "8",
            "--save-every",
            "4",
            "--eval-every",
            "0",
            "--precision",
            precision,
            "--output-dir",
        ]
        .iter()
        .map(|x| x.to_string())
        .chain([s(out)])
        .collect()
    };
    let run = |a: &[String]| {
        let o = Command::new(bin())
            .args(a)
            .current_dir(root())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        o
    };
    let (a, f) = (d.path().join("a"), d.path().join("f32"));
    let o = run(&args(&a, "bf16"));
    assert!(stderr(&o).contains("precision bf16"), "{}", stderr(&o));
    run(&args(&f, "f32"));
    let weights = f32_bits(&a.join("final/model.safetensors"));
    assert!(weights.len() > 100_000);
    assert!(
        weights.iter().all(|&b| b & 0xFFFF == 0),
        "a weight is not a bf16 value"
    );
    // The f32 run's weights are not all bf16 values: the check above can fail.
    assert!(
        f32_bits(&f.join("final/model.safetensors"))
            .iter()
            .any(|&b| b & 0xFFFF != 0)
    );
    let loss = |dir: &std::path::Path, when: &str| {
        summary(dir)["summary"][when]["eval_loss"].as_f64().unwrap()
    };
    let (b16, b32) = (loss(&a, "eval_before"), loss(&f, "eval_before"));
    assert!(
        (b16 - b32).abs() < 0.01,
        "eval loss before: bf16 {b16}, f32 {b32}"
    );
    let (a16, a32) = (loss(&a, "eval_after"), loss(&f, "eval_after"));
    assert!(a16 < b16 - 1.0, "bf16 eval loss {b16} -> {a16}");
    assert!(
        (a16 - a32).abs() < 0.15,
        "eval loss after: bf16 {a16}, f32 {a32}"
    );

    // The tensor path of the head (what CUDA runs; `YTRAINER_FUSED=0` forces it on the CPU) also computes the
    // softmax and CE in f32 and hands bf16 gradients back: it trains like the CPU's host head.
    let t = d.path().join("tensor-path");
    let o = Command::new(bin())
        .args(args(&t, "bf16"))
        .env("YTRAINER_FUSED", "0")
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let at = loss(&t, "eval_after");
    assert!(
        (at - a16).abs() < 0.01,
        "eval loss after: tensor path {at}, host head {a16}"
    );

    // Resume from the step-4 checkpoint in another directory: steps 5..8 equal the uninterrupted run's.
    let b = d.path().join("b");
    let mut resume = args(&b, "bf16");
    resume.extend(["--resume".to_string(), s(&a.join("checkpoint-4"))]);
    let o = run(&resume);
    assert!(stderr(&o).contains("resumed from"), "{}", stderr(&o));
    let (ma, mb) = (last_metrics(&a), last_metrics(&b));
    assert_eq!(mb["step"], 8);
    for key in ["loss", "ce", "grad_norm"] {
        let (x, y) = (ma[key].as_f64().unwrap(), mb[key].as_f64().unwrap());
        assert!(
            (x - y).abs() <= 1e-6,
            "{key}: uninterrupted {x} vs resumed {y}"
        );
    }
    // A checkpoint keeps its precision.
    let mut other = args(&d.path().join("c"), "f32");
    other.extend(["--resume".to_string(), s(&a.join("checkpoint-4"))]);
    let o = Command::new(bin())
        .args(&other)
        .current_dir(root())
        .output()
        .unwrap();
    assert_user_error(&o, "train.precision: \"bf16\" -> \"f32\"");
    // Unknown precisions are refused.
    let bad = args(&d.path().join("d"), "fp8");
    let o = Command::new(bin())
        .args(&bad)
        .current_dir(root())
        .output()
        .unwrap();
    assert_user_error(&o, "unknown variant `fp8`, expected `f32` or `bf16`");
    // Preference objectives need f32 sums of log-probabilities.
    let mut dpo = args(&d.path().join("e"), "bf16");
    dpo.extend(["--loss".to_string(), "dpo".to_string()]);
    let o = Command::new(bin())
        .args(&dpo)
        .current_dir(root())
        .output()
        .unwrap();
    assert_user_error(
        &o,
        "[train] precision = \"bf16\" is not supported for preference training (`--loss dpo`)",
    );
}

fn bench_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["bench", "--format", "json"];
    all.extend_from_slice(args);
    let o = ytrainer(&all);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)))
}

#[test]
fn bench_reports_throughput_phases_and_kernels() {
    let v = bench_json(&[
        "--shape", "tiny", "--mode", "lora", "--steps", "2", "--batch", "2", "--seq", "64",
    ]);
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    // Randomly initialised, random tokens: the CE is about ln(vocab) = ln(8192) = 9.01.
    let ce = v["final_ce"].as_f64().unwrap();
    assert!((ce - 8192f64.ln()).abs() < 0.5, "{v}");
    let step_ms = 1000.0 * v["median_step_s"].as_f64().unwrap();
    let phases = &v["phases_ms"];
    for k in ["body_forward", "head_ce_weights", "backward", "optimizer"] {
        assert!(phases[k].as_f64().unwrap() > 0.0, "{k}: {v}");
    }
    // The kernels run inside the step: each one's time per step is positive and below a few steps' time.
    for k in [
        "linear_forward",
        "linear_backward",
        "lora_products",
        "attention_forward",
        "rms_norm",
    ] {
        let ms = v["kernels_ms"][k].as_f64().unwrap();
        assert!(
            ms > 0.0 && ms < 3.0 * step_ms,
            "{k} {ms} ms vs step {step_ms} ms: {v}"
        );
    }
}

/// `bench --quantize-base` trains LoRA over the same random base quantised on load: the quantised kernels run
/// (the CE moves by the quantisation error only), and full fine-tuning over a quantised base is refused.
#[test]
fn bench_trains_over_a_base_quantised_on_load() {
    let args = [
        "--shape", "tiny", "--mode", "lora", "--steps", "1", "--batch", "2", "--seq", "64",
    ];
    let f32 = bench_json(&args);
    for q in ["q8_0", "q4_0", "nf4"] {
        let mut a = args.to_vec();
        a.extend_from_slice(&["--quantize-base", q]);
        let v = bench_json(&a);
        assert_eq!(v["quantize_base"], q, "{v}");
        let (x, y) = (
            v["final_ce"].as_f64().unwrap(),
            f32["final_ce"].as_f64().unwrap(),
        );
        // Random weights of std 0.02 quantised: the CE moves, but by far less than its ~9 nats.
        assert!(x != y && (x - y).abs() < 0.05, "{q}: {x} vs f32 {y}");
        assert!(
            v["kernels_ms"]["linear_forward"].as_f64().unwrap() > 0.0,
            "{v}"
        );
    }
    let o = ytrainer(&[
        "bench",
        "--mode",
        "full",
        "--quantize-base",
        "q4_0",
        "--steps",
        "1",
    ]);
    assert_user_error(
        &o,
        "--quantize-base needs --mode lora: full fine-tuning trains the base weights, which stay f32",
    );
}

#[test]
fn bench_windowed_alternates_rounds_and_times_our_windows() {
    // 8 prompt + 12 answer tokens in windows of 4 targets: 3 windows.
    let v = bench_json(&[
        "--windowed",
        "4",
        "--prompt",
        "8",
        "--seq",
        "12",
        "--rounds",
        "2",
    ]);
    assert_eq!(v["windows"], 3, "{v}");
    assert_eq!(v["rounds"], 2, "{v}");
    let ours = v["ytrainer_s_per_round"].as_array().unwrap();
    let seed = v["seed_way_s_per_round"].as_array().unwrap();
    let ratios = v["speedup_per_round"].as_array().unwrap();
    assert_eq!((ours.len(), seed.len(), ratios.len()), (2, 2, 2), "{v}");
    for i in 0..2 {
        let r = seed[i].as_f64().unwrap() / ours[i].as_f64().unwrap();
        assert!((r - ratios[i].as_f64().unwrap()).abs() < 1e-9, "{v}");
    }
    assert!(
        v["ytrainer_window_phases_ms"]["backward"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    assert!(
        v["ytrainer_window_kernels_ms"]["linear_forward"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{v}"
    );
}

#[test]
fn bench_windowed_needs_at_least_one_round() {
    let o = ytrainer(&["bench", "--windowed", "4", "--rounds", "0"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("--rounds") && err.contains("0 is not in 1.."),
        "{err}"
    );
}

#[test]
fn gradient_checkpointing_trains_exactly_like_the_plain_run() {
    let d = TempDir::new("ckpt");
    let run = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "run",
            "--config",
            "examples/quickstart/sft-nlirg.toml",
            "--max-steps",
            "6",
            "--eval-every",
            "0",
        ];
        args.extend_from_slice(extra);
        let out = s(out);
        args.extend(["--output-dir", &out]);
        let o = ytrainer(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    run(&a, &[]);
    run(&b, &["--gradient-checkpointing"]);
    let resolved = std::fs::read_to_string(b.join("config.resolved.toml")).unwrap();
    assert!(
        resolved.contains("gradient_checkpointing = true"),
        "{resolved}"
    );
    let (ma, mb) = (
        jsonl(&a.join("metrics.jsonl")),
        jsonl(&b.join("metrics.jsonl")),
    );
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        for key in ["loss", "ce", "grad_norm"] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(
                (p - q).abs() <= 1e-4 * p.abs().max(1.0),
                "step {}: {key} {p} plain vs {q} with gradient checkpointing",
                x["step"]
            );
        }
    }
    let (x, y) = (
        summary(&a)["summary"]["eval_after"]["eval_loss"]
            .as_f64()
            .unwrap(),
        summary(&b)["summary"]["eval_after"]["eval_loss"]
            .as_f64()
            .unwrap(),
    );
    assert!((x - y).abs() <= 1e-4, "final eval loss {x} vs {y}");
}

/// DoRA with `modules_to_save` (tied embeddings) through the CLI: the exported adapter says so and holds the
/// magnitudes and the embedding matrix; a run continued from it (`adapter.init_from`) starts at the first run's
/// final eval loss; a run killed after step 1 and resumed from its checkpoint (which must hold the magnitudes and
/// the embeddings) ends where the uninterrupted run ends.
#[test]
fn dora_with_modules_to_save_exports_resumes_and_continues() {
    let tiny = assets().join("tiny-qwen2");
    let data = assets().join("corpora/instruct/alpaca_en_demo.json");
    let d = TempDir::new("dora-mts");
    let args = |out: &std::path::Path, steps: &str, extra: &[String]| -> Vec<String> {
        let mut v: Vec<String> = [
            "run",
            "--model",
            &s(&tiny),
            "--data",
            &s(&data),
            "--max-steps",
            steps,
            "--max-seq-len",
            "128",
            "--tokens-per-step",
            "256",
            "--learning-rate",
            "0.01",
            "--lora-r",
            "4",
            "--set",
            "eval.max_samples=8",
            "--set",
            "adapter.use_dora=true",
            "--set",
            "adapter.modules_to_save=[\"embed_tokens\", \"lm_head\"]",
            "--save-every",
            "1",
            "--output-dir",
            &s(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().cloned());
        v
    };
    let run = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = ytrainer(&refs);
        assert!(o.status.success(), "{}", stderr(&o));
        o
    };
    let a = d.path().join("a");
    run(args(&a, "2", &[]));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(a.join("final/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["use_dora"], true);
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["embed_tokens", "lm_head"])
    );
    let bytes = std::fs::read(a.join("final/adapter_model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let keys: Vec<&String> = header.as_object().unwrap().keys().collect();
    let magnitudes = keys
        .iter()
        .filter(|k| k.ends_with(".lora_magnitude_vector"))
        .count();
    assert_eq!(magnitudes, 4 * 7, "one magnitude per adapted projection");
    for k in [
        "base_model.model.model.embed_tokens.weight",
        "base_model.model.lm_head.weight",
    ] {
        assert_eq!(header[k]["shape"], serde_json::json!([8192, 256]), "{k}");
    }
    let ev = summary(&a)["summary"].clone();
    let (before, after) = (
        ev["eval_before"]["eval_loss"].as_f64().unwrap(),
        ev["eval_after"]["eval_loss"].as_f64().unwrap(),
    );
    println!("DoRA + modules_to_save, 2 steps at lr 1e-2: eval loss {before} -> {after}");
    assert!((before - after).abs() > 1e-3, "training moved the model");

    // Continue from the exported adapter: it reproduces the trained model.
    let c = d.path().join("continued");
    run(args(
        &c,
        "1",
        &[
            "--set".into(),
            format!("adapter.init_from=\"{}\"", s(&a.join("final"))),
        ],
    ));
    let cont = summary(&c)["summary"]["eval_before"]["eval_loss"]
        .as_f64()
        .unwrap();
    println!("adapter reloaded: eval loss {cont} vs {after}");
    assert!((after - cont).abs() < 1e-5, "{after} vs {cont}");

    // The same run again, then resumed from its step-1 checkpoint (step 2 recomputed from what the checkpoint
    // holds): the same end as the uninterrupted run.
    let b = d.path().join("b");
    run(args(&b, "2", &[]));
    let o = run(args(
        &b,
        "2",
        &["--resume".into(), s(&b.join("checkpoint-1"))],
    ));
    assert!(stderr(&o).contains("resumed from"), "{}", stderr(&o));
    let (ma, mb) = (last_metrics(&a), last_metrics(&b));
    assert_eq!(mb["step"], 2);
    let (x, y) = (ma["loss"].as_f64().unwrap(), mb["loss"].as_f64().unwrap());
    println!("resumed step-2 loss {y} vs uninterrupted {x}");
    assert!((x - y).abs() <= 1e-6, "{x} vs {y}");

    // Gradient checkpointing (the embedding's gradient through the recomputing backward, the magnitudes through
    // each recomputed layer) trains as the plain run does.
    let g = d.path().join("recompute");
    run(args(&g, "2", &["--gradient-checkpointing".into()]));
    let (ja, jg) = (
        jsonl(&a.join("metrics.jsonl")),
        jsonl(&g.join("metrics.jsonl")),
    );
    assert_eq!(ja.len(), jg.len());
    for (p, q) in ja.iter().zip(&jg) {
        for key in ["loss", "grad_norm"] {
            let (u, v) = (p[key].as_f64().unwrap(), q[key].as_f64().unwrap());
            println!(
                "step {}: {key} plain {u} vs gradient checkpointing {v}",
                p["step"]
            );
            assert!(
                (u - v).abs() <= 1e-4 * u.abs().max(1.0),
                "{key}: {u} vs {v}"
            );
        }
    }
}
