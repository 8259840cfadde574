//! Every example config a user picks up from `examples/` runs as written (only the output directory, and for the
//! real model the model path and budgets, changed): preference training (DPO) on the quick start's model,
//! continued pretraining on plain text, and LoRA on the real SmolLM2-135M-Instruct.

mod common;
use common::*;

fn summary(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

/// `examples/preference/dpo.toml` trains DPO with a LoRA adapter on the model the quick start exports (here a
/// shortened quick start): the first step is the fresh adapter's ln 2, the pairs get ordered right, a PEFT
/// adapter comes out.
#[test]
fn preference_example_trains_dpo_on_the_quickstart_model() {
    let d = TempDir::new("ex-dpo");
    let qs = d.path().join("qs");
    ytrainer_ok(&[
        "run",
        "--config",
        "examples/quickstart/sft-nlirg.toml",
        "--max-steps",
        "20",
        "--output-dir",
        &s(&qs),
    ]);
    let out = d.path().join("dpo");
    // As the file says, with the quick start's output where it is: the model path is the only change.
    ytrainer_ok(&[
        "run",
        "--config",
        "examples/preference/dpo.toml",
        "--model",
        &s(&qs.join("final")),
        "--output-dir",
        &s(&out),
    ]);
    let m = jsonl(&out.join("metrics.jsonl"));
    assert_eq!(m.len(), 24, "96 pairs x 2 epochs / 8 pairs per step");
    assert!(
        (m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-5,
        "{}",
        m[0]
    );
    let last = m.last().unwrap();
    assert!(last["loss"].as_f64().unwrap() < 0.6, "{last}");
    assert!(last["rewards/accuracy"].as_f64().unwrap() >= 0.75, "{last}");
    let sm = summary(&out);
    // the held-out pairs (other numbers and words) are ordered right too
    assert!(
        sm["summary"]["eval_after"]["eval_rewards/accuracy"]
            .as_f64()
            .unwrap()
            >= 0.75,
        "{sm}"
    );
    assert!(out.join("final/adapter_config.json").exists());
}

/// `examples/cpt/cpt.toml` packs the repository's docs into rows (five files mixed, one at half weight) and lowers
/// the loss on a held-out doc.
#[test]
fn cpt_example_packs_text_and_lowers_held_out_loss() {
    let d = TempDir::new("ex-cpt");
    let o = ytrainer_ok(&[
        "run",
        "--config",
        "examples/cpt/cpt.toml",
        "--output-dir",
        &s(d.path()),
    ]);
    let err = stderr(&o);
    // the two mixed-in sources are read, each with its own data line
    for f in [
        "architecture.md",
        "quickstart.md",
        "data.md",
        "config.md",
        "losses.md",
    ] {
        assert!(err.contains(&format!("data: docs/{f} (text)")), "{err}");
    }
    assert!(err.contains("weight 0.5"), "{err}");
    let sm = summary(d.path());
    let before = sm["summary"]["eval_before"]["eval_loss"].as_f64().unwrap();
    let after = sm["summary"]["eval_after"]["eval_loss"].as_f64().unwrap();
    // a random tiny model on a few hundred paragraphs: it learns the corpus' vocabulary (7.6 -> 6.2 nats), no more
    assert!(
        after < before - 1.0,
        "held-out eval loss {before} -> {after}"
    );
    assert!(d.path().join("final/model.safetensors").exists());
}

/// `examples/smollm2/lora-nlirg.toml` on the real SmolLM2-135M-Instruct: the GGUF given with `--model` (QLoRA),
/// tiny budgets so that one step runs; the adapter names the hub id the config sets.
#[test]
fn smollm2_example_trains_a_lora_step_on_the_real_model() {
    let gguf = assets().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let d = TempDir::new("ex-smollm2");
    // The plan of the file as written, with the model swapped in: no weights loaded.
    let o = ytrainer_ok(&[
        "run",
        "--config",
        "examples/smollm2/lora-nlirg.toml",
        "--model",
        &s(&gguf),
        "--output-dir",
        &s(d.path()),
        "--dry-run",
    ]);
    let plan = format!("{}{}", stdout(&o), stderr(&o));
    assert!(plan.contains("steps"), "{plan}");
    ytrainer_ok(&[
        "run",
        "--config",
        "examples/smollm2/lora-nlirg.toml",
        "--model",
        &s(&gguf),
        "--output-dir",
        &s(d.path()),
        "--max-steps",
        "1",
        "--tokens-per-step",
        "48",
        "--max-seq-len",
        "64",
        "--set",
        "eval.max_samples=2",
        "--set",
        "data.max_samples=8",
    ]);
    let sm = summary(d.path());
    assert_eq!(sm["summary"]["steps"], 1, "{sm}");
    let m = jsonl(&d.path().join("metrics.jsonl"));
    assert!(m[0]["ce"].as_f64().unwrap().is_finite());
    let ac: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("final/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        ac["base_model_name_or_path"],
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    );
    assert_eq!(ac["r"], 16);
}
