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
    // A loss weight of 1e38 (near f32's largest) makes every step's loss or gradient non-finite from the first
    // step on. (1e30 no longer does: the global gradient norm is summed in f64, and clipping tames the step.)
    let o = tiny(
        &out,
        &[
            "--set",
            "train.max_steps=20",
            "--loss-param",
            "a=1e38",
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
        ..Default::default()
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

/// A GGUF file with `general.alignment = alignment` (when given) and f32 / typed tensors at explicit offsets:
/// `(name, dims fastest-first, type, offset)`; the data section is `data_len` zero bytes.
fn gguf_file(
    path: &Path,
    alignment: Option<u32>,
    tensors: &[(&str, &[u64], u32, u64)], // (name, dims fastest-first, type, offset)
    data_len: usize,
) {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((alignment.is_some() as u64).to_le_bytes());
    if let Some(a) = alignment {
        put_str(&mut out, "general.alignment");
        out.extend(4u32.to_le_bytes()); // u32
        out.extend(a.to_le_bytes());
    }
    for (name, dims, ty, offset) in tensors {
        put_str(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
    }
    let a = alignment.filter(|a| a.is_power_of_two()).unwrap_or(32) as usize;
    while !out.len().is_multiple_of(a) {
        out.push(0);
    }
    out.extend(vec![0u8; data_len]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn corrupt_gguf_containers_are_refused_naming_the_tensor() {
    let d = TempDir::new("gguf");
    let f = d.path().join("bad.gguf");
    let to = d.path().join("hf");
    type Entry<'a> = (&'a str, &'a [u64], u32, u64);
    let cases: Vec<(Option<u32>, Vec<Entry>, &str)> = vec![
        (
            Some(0),
            vec![("a", &[16], 0, 0)],
            "metadata `general.alignment` = 0: must be a power of two (GGUF's default is 32); the file is corrupt",
        ),
        (
            Some(3),
            vec![("a", &[16], 0, 0)],
            "metadata `general.alignment` = 3: must be a power of two (GGUF's default is 32); the file is corrupt",
        ),
        (
            Some(32),
            vec![("a", &[16], 0, 0), ("b", &[16], 0, 80)],
            "tensor `b`: offset 80 is not a multiple of the alignment 32; the file is corrupt",
        ),
        (
            None,
            vec![("a", &[16], 0, 0), ("b", &[16], 0, 32)],
            "tensors `a` (bytes 0..64 of the data section) and `b` (bytes 32..96) overlap; the file is corrupt",
        ),
        (
            None,
            vec![("a", &[16], 0, 0), ("q", &[16, 2], 8, 64)],
            "tensor `q` (Q8_0, shape [2, 16]): 16 values per row is not a multiple of Q8_0's block of 32 values; \
             the file is corrupt",
        ),
        (
            None,
            vec![("a", &[16], 0, 0), ("a", &[16], 0, 64)],
            "tensor `a` appears twice in the directory; the file is corrupt",
        ),
        (
            None,
            vec![("a", &[16], 0, 0), ("b", &[16], 0, 4096)],
            "truncated file: tensor `b` (F32, 64 bytes at offset 4096) ends at byte",
        ),
    ];
    for (alignment, tensors, msg) in cases {
        gguf_file(&f, alignment, &tensors, 256);
        let o = ytrainer(&["convert", "--from", &s(&f), "--to", &s(&to)]);
        assert_user_error(&o, &format!("error: {}: {msg}", f.display()));
        assert_eq!(names(d.path()), vec!["bad.gguf".to_string()], "{msg}");
    }
}

/// tiny-qwen2's weights and tokenizer (linked) under a `config.json` edited by `edit`.
fn tiny_qwen2_with(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = assets().join("tiny-qwen2");
    std::fs::create_dir_all(dir).unwrap();
    for n in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        if src.join(n).exists() {
            std::os::unix::fs::symlink(src.join(n), dir.join(n)).unwrap();
        }
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir.to_path_buf()
}

fn score(model: &Path, adapter: Option<&Path>, d: &Path) -> Output {
    let ids = d.join("ids.json");
    std::fs::write(&ids, "[[1, 50, 300, 7000, 12]]").unwrap();
    let out = d.join("scores.jsonl");
    let mut args = vec![
        "score".to_string(),
        "--model".into(),
        s(model),
        "--ids-json".into(),
        s(&ids),
        "--out".into(),
        s(&out),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter".to_string(), s(a)]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ytrainer(&refs)
}

#[test]
fn weights_that_do_not_match_their_config_are_refused() {
    let d = TempDir::new("mismatch");
    // Fewer layers than the weights hold: the last layer's tensors would be dropped silently.
    let m = tiny_qwen2_with(&d.path().join("three"), |c| {
        c["num_hidden_layers"] = 3.into()
    });
    let o = score(&m, None, d.path());
    assert_user_error(
        &o,
        &format!(
            "error: {}: the weights do not match config.json: 12 tensors are not used by the model it describes: \
             `model.layers.3.input_layernorm.weight`, `model.layers.3.mlp.down_proj.weight`, \
             `model.layers.3.mlp.gate_proj.weight`, `model.layers.3.mlp.up_proj.weight`, \
             `model.layers.3.post_attention_layernorm.weight`, and 7 more (config.json describes 3 layers, hidden \
             size 256, intermediate size 704, 4 heads / 2 KV heads); use the config.json that belongs to these \
             weights",
            m.join("model.safetensors").display()
        ),
    );
    // More layers than the weights hold.
    let m = tiny_qwen2_with(&d.path().join("five"), |c| {
        c["num_hidden_layers"] = 5.into()
    });
    let o = score(&m, None, d.path());
    assert_user_error(
        &o,
        &format!(
            "error: {}: the weights do not match config.json: 12 expected tensors are missing: \
             `model.layers.4.self_attn.q_proj.weight`, `model.layers.4.self_attn.k_proj.weight`, \
             `model.layers.4.self_attn.v_proj.weight`, `model.layers.4.self_attn.o_proj.weight`, \
             `model.layers.4.self_attn.q_proj.bias`, and 7 more (config.json describes 5 layers",
            m.join("model.safetensors").display()
        ),
    );
    // An untied head that is not there must not be tied silently.
    let m = tiny_qwen2_with(&d.path().join("untied"), |c| {
        c["tie_word_embeddings"] = false.into()
    });
    let o = score(&m, None, d.path());
    assert_user_error(
        &o,
        &format!(
            "error: {}: field `tie_word_embeddings`: false, but {} has no `lm_head.weight`; set it to true if the \
             head shares the embeddings, or use the checkpoint that holds the head",
            m.join("config.json").display(),
            m.join("model.safetensors").display()
        ),
    );
}

#[test]
fn an_adapter_with_nan_values_is_refused_by_merge_and_score() {
    let d = TempDir::new("nanadapter");
    let adapter = d.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
            "lora_dropout": 0.0})
        .to_string(),
    )
    .unwrap();
    let mut tensors = Vec::new();
    for l in 0..4 {
        let p = format!("base_model.model.model.layers.{l}.self_attn.q_proj");
        let mut a = vec![0.01f32; 2 * 256];
        if l == 2 {
            a[7] = f32::NAN;
        }
        tensors.push(ytrainer_models::st::PendingTensor::new(
            format!("{p}.lora_A.weight"),
            vec![2, 256],
            move || a,
        ));
        tensors.push(ytrainer_models::st::PendingTensor::new(
            format!("{p}.lora_B.weight"),
            vec![256, 2],
            || vec![0.01f32; 256 * 2],
        ));
    }
    ytrainer_models::st::write_f32(&adapter.join("adapter_model.safetensors"), tensors).unwrap();
    let msg = format!(
        "{}: tensor `base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight` holds 1 NaN or \
         infinite values (of 512); the adapter is corrupt or comes from a diverged run, so it is not applied",
        adapter.join("adapter_model.safetensors").display()
    );
    let base = assets().join("tiny-qwen2");
    let merged = d.path().join("merged");
    let o = ytrainer(&[
        "merge",
        "--model",
        &s(&base),
        "--adapter",
        &s(&adapter),
        "--out",
        &s(&merged),
    ]);
    assert_user_error(&o, &msg);
    assert!(!merged.exists());
    assert_user_error(&score(&base, Some(&adapter), d.path()), &msg);
}

#[test]
fn kto_style_records_are_refused_not_trained_as_sft() {
    let d = TempDir::new("kto");
    let f = d.path().join("kto.jsonl");
    let rec = |answer: &str, label: bool| {
        serde_json::json!({"messages": [{"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": answer}], "label": label})
        .to_string()
    };
    std::fs::write(&f, [rec("Hello!", true), rec("Go away.", false)].join("\n")).unwrap();
    let out = d.path().join("run");
    let mut args = vec!["run", "--preset", "tiny", "--data"];
    let (fs, outs) = (s(&f), s(&out));
    args.extend([
        fs.as_str(),
        "--max-steps",
        "1",
        "--output-dir",
        outs.as_str(),
    ]);
    let o = ytrainer(&args);
    assert_user_error(
        &o,
        &format!(
            "{}:2: field \"label\" = false marks an undesirable completion (KTO-style data), which SFT would \
             train as a good answer: train these records with --loss kto, or drop the records labelled false (and \
             the \"label\" field) to train SFT on the others, or pair answers as \"chosen\" / \"rejected\" for \
             --loss dpo",
            f.display()
        ),
    );
    assert!(!out.join("checkpoint-1").exists());
}

/// Issue 21 item 10: after a kill, a run's logs hold steps past its last checkpoint and possibly a torn line.
/// Resuming cuts `metrics.jsonl` / `eval.jsonl` back to the checkpoint's step, so every step is logged once
/// and every line parses, and the TensorBoard events are rewritten into one file (not one more per start).
#[test]
fn resume_cuts_the_logs_back_to_the_checkpoint() {
    let d = TempDir::new("logs");
    let out = d.path().join("run");
    let run = |extra: &[&str]| {
        let mut a = vec![
            "run",
            "--preset",
            "tiny",
            "--data",
            "examples/quickstart/train.jsonl",
            "--max-steps",
            "4",
            "--tokens-per-step",
            "64",
            "--save-every",
            "2",
            "--eval-every",
            "2",
            "--set",
            "eval.max_samples=4",
            "--output-dir",
        ];
        let o = s(&out);
        a.push(&o);
        a.extend_from_slice(extra);
        ok(&ytrainer(&a));
    };
    run(&[]);
    let full = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let evals = std::fs::read_to_string(out.join("eval.jsonl")).unwrap();
    // As if killed while writing step 4's line after checkpoint-2: checkpoint-4 and final never happened.
    std::fs::remove_dir_all(out.join("checkpoint-4")).unwrap();
    std::fs::remove_dir_all(out.join("final")).unwrap();
    std::fs::write(
        out.join("metrics.jsonl"),
        format!("{full}{{\"step\": 5, \"loss\": 1."),
    )
    .unwrap();
    run(&["--resume", &s(&out.join("checkpoint-2"))]);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line parses"))
        .collect();
    let steps: Vec<u64> = lines.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    // resume is exact, so the re-logged steps 3-4 have the first run's losses
    let first: Vec<f64> = full
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let again: Vec<f64> = lines.iter().map(|v| v["loss"].as_f64().unwrap()).collect();
    assert_eq!(again, first);
    let eval_steps = |t: &str| -> Vec<u64> {
        t.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    let evals_after = std::fs::read_to_string(out.join("eval.jsonl")).unwrap();
    assert_eq!(eval_steps(&evals_after), eval_steps(&evals));
    assert_eq!(eval_steps(&evals), [0, 2, 4]);
    let events = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .count();
    assert_eq!(events, 1);
}

/// Issue 21 item 13: a value of the wrong type names where it came from (file and line, or the `--set`), the
/// key, and what the key takes; before, it said only `invalid value: integer -1, expected usize`.
#[test]
fn type_errors_name_the_file_line_or_set_and_the_key() {
    let d = TempDir::new("types");
    let cfg = d.path().join("sft.toml");
    std::fs::write(
        &cfg,
        "[loss]\nname = \"ce\"\n\n[train]\nseed = 1\nmax_steps = -1\n",
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut a = vec![
            "run",
            "--preset",
            "tiny",
            "--data",
            "examples/quickstart/train.jsonl",
            "--dry-run",
        ];
        a.extend_from_slice(extra);
        ytrainer(&a)
    };
    assert_user_error(
        &run(&["--config", &s(&cfg)]),
        &format!(
            "{}:6: [train] max_steps: invalid value: integer `-1`, expected usize (a whole number >= 0)",
            cfg.display()
        ),
    );
    assert_user_error(
        &run(&["--set", "train.learning_rate=fast"]),
        "--set train.learning_rate=\"fast\": [train] learning_rate: invalid type: string \"fast\", expected f64 (a number)",
    );
    assert_user_error(
        &run(&["--set", "loss.params.a=x"]),
        "--set loss.params.a=\"x\": [loss] params.a: invalid type: string \"x\", expected f64 (a number)",
    );
}

/// Issue 21 item 5: sizes from input are checked before anything is allocated from them. A config.json with
/// 10^9 layers used to abort on a multi-terabyte allocation; `rms_norm_eps = 0` passed.
#[test]
fn absurd_model_sizes_are_errors_naming_the_field() {
    let d = TempDir::new("absurd");
    let m = tiny_qwen2_with(&d.path().join("layers"), |c| {
        c["num_hidden_layers"] = 1_000_000_000.into()
    });
    assert_user_error(
        &score(&m, None, d.path()),
        &format!(
            "error: {}: field `num_hidden_layers`: 1000000000 is beyond any supported model (at most 1024); check \
             that this config belongs to the weights",
            m.join("config.json").display()
        ),
    );
    let m = tiny_qwen2_with(&d.path().join("eps"), |c| c["rms_norm_eps"] = 0.0.into());
    assert_user_error(
        &score(&m, None, d.path()),
        &format!(
            "error: {}: field `rms_norm_eps`: must be a positive number, got 0",
            m.join("config.json").display()
        ),
    );
}

/// Issue 21 item 9: a resume is judged by what the files hold, not how they are named. The same training file
/// by its absolute path resumes; the file edited in place is refused, naming it.
#[test]
fn resume_fingerprints_the_data_by_content_not_by_path() {
    let d = TempDir::new("fingerprint");
    let data = d.path().join("train.jsonl");
    std::fs::copy(root().join("examples/quickstart/train.jsonl"), &data).unwrap();
    let out = d.path().join("run");
    let run = |out: &Path, data: &str, extra: &[&str]| {
        let mut a = vec![
            "run",
            "--preset",
            "tiny",
            "--data",
            data,
            "--max-steps",
            "2",
            "--tokens-per-step",
            "64",
            "--save-every",
            "1",
            "--set",
            "eval.max_samples=4",
            "--output-dir",
        ];
        let o = s(out);
        a.push(&o);
        a.extend_from_slice(extra);
        ytrainer(&a)
    };
    // Edits a file in place: its first line once more at the end.
    let grow = |f: &Path| {
        let mut text = std::fs::read_to_string(f).unwrap();
        text.push_str(text.clone().lines().next().unwrap());
        text.push('\n');
        std::fs::write(f, text).unwrap();
    };
    ok(&run(&out, &s(&data), &[]));
    // the same file through another path (a `..` detour) is the same run
    let detour = d.path().join("run/../train.jsonl");
    ok(&run(&out, &s(&detour), &["--resume", &s(&out)]));
    // edited in place: refused, naming the file's content
    grow(&data);
    let o = run(&out, &s(&data), &["--resume", &s(&out)]);
    assert_user_error(
        &o,
        "holds a ytrainer run with other settings (data_content.train: ",
    );
    // A mixed-in file (`--source`, `[[data.sources]]`) counts the same way.
    let extra = d.path().join("extra.jsonl");
    std::fs::copy(root().join("examples/quickstart/eval.jsonl"), &extra).unwrap();
    let out2 = d.path().join("run2");
    let (data_s, out2_s) = (s(&data), s(&out2));
    ok(&run(&out2, &data_s, &["--source", &s(&extra)]));
    let detour = s(&d.path().join("run/../extra.jsonl"));
    ok(&run(
        &out2,
        &data_s,
        &["--source", &detour, "--resume", &out2_s],
    ));
    grow(&extra);
    assert_user_error(
        &run(
            &out2,
            &data_s,
            &["--source", &s(&extra), "--resume", &out2_s],
        ),
        "holds a ytrainer run with other settings (data_content.sources.0: ",
    );
}

/// Issue 21 item 9: a tampered checkpoint is refused. Its tensor files carry digests in `trainer_state.json`
/// (a changed byte, e.g. swapped weights, is caught), and a step beyond the run's plan is an error.
#[test]
fn a_tampered_checkpoint_is_refused() {
    let d = TempDir::new("tamper");
    let out = d.path().join("run");
    ok(&tiny(&out, &["--save-every", "1"]));
    let ck = out.join("checkpoint-1");
    let t = ck.join("trainable.safetensors");
    let mut bytes = std::fs::read(&t).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&t, &bytes).unwrap();
    assert_user_error(
        &tiny(&out, &["--save-every", "1", "--resume", &s(&ck)]),
        &format!(
            "{}: its contents differ from what this checkpoint wrote (the digest in trainer_state.json): the file \
             was modified or damaged after it was written; resume from another checkpoint",
            t.display()
        ),
    );
    bytes[last] ^= 0x40;
    std::fs::write(&t, &bytes).unwrap();
    let sp = ck.join("trainer_state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sp).unwrap()).unwrap();
    state["trainer"]["step"] = 1000.into();
    std::fs::write(&sp, state.to_string()).unwrap();
    assert_user_error(
        &tiny(&out, &["--save-every", "1", "--resume", &s(&ck)]),
        "the checkpoint is at step 1000 but this run's plan has 2 steps; resume from a checkpoint of this run",
    );
}

/// The best checkpoint survives pruning: it counts towards the limit, the newest stays beside an older best
/// even with a limit of 1, and a best that is the newest needs nothing beside it.
#[test]
fn pruning_never_removes_the_best_checkpoint() {
    use ytrainer_core::checkpoint::{WRITER, prune_keeping};
    let t = TempDir::new("prune-best");
    let d = t.path();
    let make = |n: usize| {
        write_state(
            &d.join(format!("checkpoint-{n}")),
            serde_json::json!({"writer": WRITER, "trainer": trainer_state("mine"), "optimizer_step": n}),
        )
    };
    let names = || {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    for n in [2, 4, 6, 8] {
        make(n);
    }
    let best = d.join("checkpoint-4");
    prune_keeping(d, 1, "mine", Some(&best));
    assert_eq!(names(), ["checkpoint-4", "checkpoint-8"]);
    make(10);
    prune_keeping(d, 2, "mine", Some(&best));
    assert_eq!(names(), ["checkpoint-10", "checkpoint-4"]);
    make(12);
    prune_keeping(d, 1, "mine", Some(&d.join("checkpoint-12")));
    assert_eq!(names(), ["checkpoint-12"]);
}
