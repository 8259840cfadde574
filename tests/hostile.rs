//! Hostile inputs and reused directories (issue 21): every case makes its own inputs, asserts the exact error,
//! the exit code, and where a directory is involved that nothing ytrainer did not write was touched.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

/// Every file under `dir` with its bytes (directories as `None`), for before / after comparisons.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if p.is_dir() {
                out.insert(rel, None);
                stack.push(p);
            } else {
                out.insert(rel, Some(std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

/// A two-step run of the tiny preset on the quick-start data.
fn tiny(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "run".to_string(),
        "--preset".into(),
        "tiny".into(),
        "--data".into(),
        "examples/quickstart/train.jsonl".into(),
        "--max-steps".into(),
        "2".into(),
        "--tokens-per-step".into(),
        "64".into(),
        "--set".into(),
        "eval.max_samples=4".into(),
        "--output-dir".into(),
        s(out),
    ];
    args.extend(extra.iter().map(|x| x.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ytrainer(&refs)
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}\n{}", stdout(o), stderr(o));
}

/// A user's notes and a Hugging Face Trainer checkpoint (it has a `trainer_state.json` too).
fn foreign_files(dir: &Path) {
    std::fs::create_dir_all(dir.join("checkpoint-1")).unwrap();
    std::fs::write(
        dir.join("checkpoint-1/trainer_state.json"),
        r#"{"global_step": 1, "log_history": []}"#,
    )
    .unwrap();
    std::fs::write(dir.join("checkpoint-1/model.safetensors"), b"not ours").unwrap();
    std::fs::write(dir.join("notes.txt"), b"my notes").unwrap();
}

fn refusal(dir: &Path, what: &str) -> String {
    let d = dir.display();
    format!(
        "error: output directory {d} {what}; nothing in it was changed: pass `--overwrite` to clear it completely \
         and start again, `--resume {d}` to continue a ytrainer run with the same settings, or choose another \
         `--output-dir`"
    )
}

#[test]
fn a_directory_with_foreign_files_is_refused_and_left_untouched() {
    let d = TempDir::new("foreign");
    let out = d.path().join("run");
    foreign_files(&out);
    let before = snapshot(&out);
    let o = tiny(&out, &[]);
    assert_user_error(
        &o,
        &refusal(
            &out,
            "is not empty and was not written by ytrainer (it holds `checkpoint-1`, `notes.txt`)",
        ),
    );
    assert_eq!(
        snapshot(&out),
        before,
        "a refused run touched the directory"
    );
    // --resume does not make a foreign directory ours either.
    let o = tiny(&out, &["--resume", &s(&out)]);
    assert_user_error(
        &o,
        &refusal(
            &out,
            "is not empty and was not written by ytrainer (it holds `checkpoint-1`, `notes.txt`)",
        ),
    );
    assert_eq!(snapshot(&out), before);
}

#[test]
fn overwrite_clears_the_directory_completely_first() {
    let d = TempDir::new("overwrite");
    let out = d.path().join("run");
    foreign_files(&out);
    std::fs::create_dir_all(out.join("final")).unwrap();
    std::fs::write(out.join("final/adapter_model.safetensors"), b"stale").unwrap();
    ok(&tiny(&out, &["--overwrite"]));
    assert!(!out.join("notes.txt").exists() && !out.join("checkpoint-1").exists());
    assert!(out.join("checkpoint-2/trainable.safetensors").is_file());
    // A LoRA run exports an adapter; the stale file was replaced by the new one, not kept beside it.
    let stale = std::fs::read(out.join("final/adapter_model.safetensors")).unwrap();
    assert_ne!(stale, b"stale");
}

#[test]
fn a_finished_run_is_not_rerun_over_but_resumes() {
    let d = TempDir::new("rerun");
    let out = d.path().join("run");
    ok(&tiny(&out, &[]));
    let before = snapshot(&out);
    // The same command again would mix two runs' metrics and checkpoints.
    let o = tiny(&out, &[]);
    assert_user_error(
        &o,
        &refusal(
            &out,
            "holds a ytrainer run with the same settings and its results (`checkpoint-2`, `final`)",
        ),
    );
    assert_eq!(snapshot(&out), before);
    // Other settings: named, nothing changed.
    let o = tiny(&out, &["--learning-rate", "0.001"]);
    assert_user_error(
        &o,
        &refusal(
            &out,
            "holds a ytrainer run with other settings (train.learning_rate: 0.0002 -> 0.001)",
        ),
    );
    assert_eq!(snapshot(&out), before);
    // --resume continues it (nothing left to train: the model is exported again).
    ok(&tiny(&out, &["--resume", &s(&out)]));
}

#[test]
fn final_keeps_no_stale_adapter_files_next_to_a_full_model() {
    let d = TempDir::new("final");
    let out = d.path().join("run");
    ok(&tiny(&out, &["--adapter", "full"]));
    // A stale adapter from somewhere else next to the full model (adapter-aware loaders would apply it).
    std::fs::write(out.join("final/adapter_config.json"), b"{}").unwrap();
    std::fs::write(out.join("final/adapter_model.safetensors"), b"stale").unwrap();
    ok(&tiny(&out, &["--adapter", "full", "--resume", &s(&out)]));
    assert!(out.join("final/model.safetensors").is_file());
    assert!(!out.join("final/adapter_config.json").exists());
    assert!(!out.join("final/adapter_model.safetensors").exists());
    // No temporary directory is left behind.
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(!names.iter().any(|n| n.contains("tmp")), "{names:?}");
}

#[test]
fn merge_never_leaves_a_stale_model_file() {
    let d = TempDir::new("merge");
    let base = assets().join("tiny-qwen2");
    let target = d.path().join("merged");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("model.safetensors"), b"stale single-file model").unwrap();
    std::fs::write(target.join("notes.txt"), b"mine").unwrap();
    let before = snapshot(&target);
    let args = [
        "merge",
        "--model",
        &s(&base),
        "--out",
        &s(&target),
        "--max-shard-size",
        "4MB",
    ];
    let o = ytrainer(&args);
    assert_user_error(
        &o,
        &format!(
            "error: --out {}: the directory is not empty (it holds `model.safetensors`, `notes.txt`); nothing was \
             changed: pass `--overwrite` to replace it completely, or choose another --out",
            target.display()
        ),
    );
    assert_eq!(snapshot(&target), before);
    let mut with = args.to_vec();
    with.push("--overwrite");
    ok(&ytrainer(&with));
    // Sharded output: the index and its shards, and nothing that was there before.
    assert!(target.join("model.safetensors.index.json").is_file());
    assert!(!target.join("model.safetensors").exists());
    assert!(!target.join("notes.txt").exists());
    let names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        names,
        vec!["merged".to_string()],
        "temporary directory left"
    );
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn a_diverged_run_stops_with_the_cause_and_writes_no_weights() {
    let d = TempDir::new("diverged");
    let out = d.path().join("run");
    // A loss weight of 1e30 makes every step's loss or gradient non-finite from the first step on.
    let o = tiny(
        &out,
        &[
            "--set",
            "train.max_steps=20",
            "--loss-param",
            "a=1e30",
            "--set",
            "train.max_skipped_steps=3",
        ],
    );
    assert_user_error(
        &o,
        "error: training diverged: steps 1 to 3 (3 in a row) had a non-finite loss or gradient and their updates \
         were skipped ([train] max_skipped_steps = 3); no checkpoint or model was written. Lower [train] \
         learning_rate (now 0.0002), keep [train] max_grad_norm > 0 (now 1), check the loss plugin's parameters \
         and the data's weights, or raise [train] max_skipped_steps (0 = never stop)",
    );
    let n = names(&out);
    assert!(
        !n.iter()
            .any(|x| x.starts_with("checkpoint-") || x.contains("final")),
        "{n:?}"
    );
}

#[test]
fn an_exploding_learning_rate_stops_the_run_before_any_weight_is_written() {
    let d = TempDir::new("lr");
    let out = d.path().join("run");
    let o = tiny(
        &out,
        &[
            "--set",
            "train.max_steps=20",
            "--learning-rate",
            "1e30",
            "--set",
            "train.max_skipped_steps=2",
        ],
    );
    // Step 1 is applied and leaves weights near 1e30; from step 2 on every loss is non-finite.
    assert_user_error(
        &o,
        "error: training diverged: steps 2 to 3 (2 in a row) had a non-finite loss or gradient and their updates \
         were skipped ([train] max_skipped_steps = 2); no checkpoint or model was written. Lower [train] \
         learning_rate (now 1e30), keep [train] max_grad_norm > 0 (now 1)",
    );
    let n = names(&out);
    assert!(
        !n.iter()
            .any(|x| x.starts_with("checkpoint-") || x.contains("final")),
        "{n:?}"
    );
}

/// `[train] KEY = VALUE` (as a `--set`) is refused with the key, the value and the allowed range.
#[test]
fn out_of_range_settings_are_refused_with_key_value_and_range() {
    let d = TempDir::new("ranges");
    let cases: &[(&str, &str)] = &[
        (
            "train.min_lr_ratio=-1",
            "[train] min_lr_ratio = -1: must be in [0, 1]",
        ),
        (
            "train.weight_decay=1e6",
            "[train] weight_decay = 1e6: must be in [0, 10]",
        ),
        (
            "train.adam_beta1=1",
            "[train] adam_beta1 = 1: must be in [0, 1)",
        ),
        (
            "train.adam_beta2=-0.5",
            "[train] adam_beta2 = -0.5: must be in [0, 1)",
        ),
        (
            "train.adam_epsilon=-1e-8",
            "[train] adam_epsilon = -1e-8: must be > 0 and finite",
        ),
        (
            "train.max_grad_norm=-1",
            "[train] max_grad_norm = -1: must be >= 0 and finite (0 = no clipping)",
        ),
        (
            "train.max_grad_norm=nan",
            "[train] max_grad_norm = NaN: must be >= 0 and finite (0 = no clipping)",
        ),
        (
            "train.warmup_ratio=nan",
            "[train] warmup_ratio = NaN: must be in [0, 1]",
        ),
        (
            "train.warmup_ratio=1.5",
            "[train] warmup_ratio = 1.5: must be in [0, 1]",
        ),
        (
            "preference.pairs_per_step=0",
            "[preference] pairs_per_step = 0: must be >= 1",
        ),
        (
            "preference.micro_pairs=0",
            "[preference] micro_pairs = 0: must be >= 1",
        ),
        (
            "preference.sft_weight=-1",
            "[preference] sft_weight = -1: must be >= 0 and finite",
        ),
        (
            "adapter.alpha=0",
            "[adapter] alpha = 0: must be > 0 and finite",
        ),
        (
            "adapter.dropout=1",
            "[adapter] dropout = 1: must be in [0, 1)",
        ),
        (
            "train.learning_rate=inf",
            "[train] learning_rate = inf: must be > 0 and finite",
        ),
    ];
    for (set, msg) in cases {
        let o = tiny(&d.path().join("run"), &["--set", set, "--dry-run"]);
        assert_user_error(&o, &format!("error: {msg}"));
    }
    // A negative number after a flag is a value, not an unknown flag, and then out of range.
    let o = tiny(
        &d.path().join("run"),
        &["--learning-rate", "-1", "--dry-run"],
    );
    assert_user_error(
        &o,
        "error: [train] learning_rate = -1: must be > 0 and finite",
    );
    assert!(
        !d.path().join("run").exists(),
        "a refused config wrote files"
    );
}

fn trainer_state(fingerprint: &str) -> ytrainer_core::checkpoint::TrainerState {
    ytrainer_core::checkpoint::TrainerState {
        step: 1,
        total_steps: 9,
        skipped_steps: 0,
        tokens_trained: 0,
        seed: 1,
        config_fingerprint: fingerprint.to_string(),
    }
}

fn write_state(dir: &Path, json: serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("trainer_state.json"), json.to_string()).unwrap();
}

/// Pruning removes only this run's oldest checkpoints: a Hugging Face Trainer's `checkpoint-N` (it has a
/// `trainer_state.json` too), a ytrainer checkpoint of other settings and one without the writer field stay;
/// `--resume RUN_DIR` picks the newest ytrainer checkpoint, never another tool's.
#[test]
fn pruning_and_resume_see_only_this_runs_checkpoints() {
    use ytrainer_core::checkpoint::{WRITER, prune, resolve_resume};
    let t = TempDir::new("prune");
    let d = t.path();
    write_state(
        &d.join("checkpoint-1"),
        serde_json::json!({"global_step": 1, "log_history": []}),
    );
    write_state(
        &d.join("checkpoint-2"),
        serde_json::json!({"writer": WRITER, "trainer": trainer_state("other"), "optimizer_step": 2}),
    );
    write_state(
        &d.join("checkpoint-3"),
        serde_json::json!({"trainer": trainer_state("mine"), "optimizer_step": 3}),
    );
    for n in [4, 5, 6] {
        write_state(
            &d.join(format!("checkpoint-{n}")),
            serde_json::json!({"writer": WRITER, "trainer": trainer_state("mine"), "optimizer_step": n}),
        );
    }
    write_state(
        &d.join("checkpoint-99"),
        serde_json::json!({"global_step": 99, "log_history": []}),
    );
    let removed = prune(d, 1, "mine");
    assert_eq!(
        removed,
        vec![d.join("checkpoint-4"), d.join("checkpoint-5")]
    );
    for n in [1, 2, 3, 6, 99] {
        assert!(
            d.join(format!("checkpoint-{n}")).is_dir(),
            "checkpoint-{n} removed"
        );
    }
    assert_eq!(resolve_resume(d).unwrap(), d.join("checkpoint-6"));
}
