//! Command-line behaviour: plugin discovery, help, config handling and every bad-input path, through the real
//! binary (exit codes and the exact one-paragraph errors users see).

mod common;
use common::*;

#[test]
fn plugins_list_json_shows_builtins_with_parameters() {
    let o = ytrainer(&["plugins", "list", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    // Every built-in token reweighter is linked into the binary (other plugins may be listed too).
    for n in ["ce", "dft", "eaft", "focal", "nlirg", "rho1", "truncation"] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "plugins are listed by name");
    let nlirg = v
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "nlirg")
        .unwrap();
    assert_eq!(nlirg["kind"], "token");
    assert_eq!(nlirg["source"]["kind"], "builtin");
    let params: Vec<(&str, f64)> = nlirg["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["default"].as_f64().unwrap()))
        .collect();
    assert_eq!(
        params,
        [
            ("a", 1.0),
            ("x0", 1.2),
            ("k", 1.7),
            ("split", 3.0),
            ("center", 6.2),
            ("slope", 1.0),
            ("cutoff", 15.0),
            ("floor", 5e-8)
        ]
    );
    let text = ytrainer(&["plugins", "list"]);
    assert!(
        stdout(&text).contains("nlirg      token     built-in"),
        "{}",
        stdout(&text)
    );
}

#[test]
fn run_help_documents_the_flags_scripts_rely_on() {
    let o = ytrainer(&["run", "--help"]);
    assert!(o.status.success());
    let h = stdout(&o);
    for flag in [
        "--config",
        "--model",
        "--data",
        "--eval-data",
        "--loss",
        "--output-dir",
        "--max-steps",
        "--device",
        "--seed",
        "--resume",
        "--adapter",
        "--set",
    ] {
        assert!(h.contains(flag), "run --help lacks {flag}:\n{h}");
    }
    assert!(
        h.contains("[train.max_steps]"),
        "flags name the config key they override"
    );
}

#[test]
fn missing_config_file() {
    let o = ytrainer(&["run", "--config", "does/not/exist.toml"]);
    assert_user_error(
        &o,
        "error: cannot read config file does/not/exist.toml: No such file or directory",
    );
}

#[test]
fn unknown_config_key_suggests_the_nearest() {
    let d = TempDir::new("cfg");
    let cfg = d.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[model]\npreset = \"tiny\"\n\n[train]\nlearning_rate = 1e-3\nwarmup_step = 3\n",
    )
    .unwrap();
    let o = ytrainer(&["run", "--config", &s(&cfg)]);
    assert_user_error(
        &o,
        &format!(
            "{}:6: unknown key `warmup_step` in [train] (did you mean `warmup_steps`?)",
            cfg.display()
        ),
    );
}

#[test]
fn invalid_toml_names_the_line() {
    let d = TempDir::new("cfg");
    let cfg = d.path().join("c.toml");
    std::fs::write(&cfg, "[model]\npreset = \"tiny\"\n[train]\nepochs = = 2\n").unwrap();
    let o = ytrainer(&["run", "--config", &s(&cfg)]);
    assert_user_error(&o, &format!("{}:4: invalid TOML", cfg.display()));
}

#[test]
fn no_model_and_no_data() {
    let o = ytrainer(&["run"]);
    assert_user_error(&o, "error: no model given: pass `--model DIR`");
    let o = ytrainer(&["run", "--preset", "tiny"]);
    assert_user_error(&o, "error: no training data given: pass `--data FILE`");
}

#[test]
fn unknown_loss_plugin() {
    let d = TempDir::new("loss");
    let o = ytrainer(&[
        "run",
        "--preset",
        "tiny",
        "--data",
        "examples/quickstart/train.jsonl",
        "--loss",
        "nlrig",
        "--output-dir",
        &s(d.path()),
    ]);
    assert_user_error(
        &o,
        "unknown loss plugin `nlrig` (did you mean `nlirg`?); available: ",
    );
}

#[test]
fn bad_loss_parameter() {
    let d = TempDir::new("lossp");
    let o = ytrainer(&[
        "run",
        "--preset",
        "tiny",
        "--data",
        "examples/quickstart/train.jsonl",
        "--loss-param",
        "cutof=3",
        "--output-dir",
        &s(d.path()),
    ]);
    assert_user_error(
        &o,
        "loss plugin `nlirg` has no parameter `cutof` (did you mean `cutoff`?)",
    );
}

#[test]
fn model_directory_without_config_json() {
    let d = TempDir::new("nomodel");
    let o = ytrainer(&[
        "run",
        "--model",
        &s(d.path()),
        "--data",
        "examples/quickstart/train.jsonl",
        "--output-dir",
        &s(&d.path().join("out")),
    ]);
    assert_user_error(&o, "not a Hugging Face model directory (no config.json)");
}

#[test]
fn cuda_device_without_cuda_build() {
    let d = TempDir::new("cuda");
    let o = ytrainer(&[
        "run",
        "--preset",
        "tiny",
        "--data",
        "examples/quickstart/train.jsonl",
        "--device",
        "cuda:0",
        "--output-dir",
        &s(d.path()),
    ]);
    if cfg!(feature = "cuda") {
        return;
    }
    assert_user_error(&o, "this ytrainer binary was built without CUDA support");
    let o = ytrainer(&[
        "run",
        "--preset",
        "tiny",
        "--data",
        "examples/quickstart/train.jsonl",
        "--device",
        "tpu",
        "--output-dir",
        &s(d.path()),
    ]);
    assert_user_error(
        &o,
        "invalid device `tpu`: expected `cpu`, `cuda` or `cuda:N`",
    );
}

/// Runs the tiny preset on a data file written by the test and returns the output.
fn run_on_data(name: &str, content: &[u8]) -> (TempDir, std::process::Output, std::path::PathBuf) {
    let d = TempDir::new("data");
    let f = d.path().join(name);
    std::fs::write(&f, content).unwrap();
    // the tokenizer of the tiny preset is trained on the data itself, so use a fixed good base model
    let base = d.path().join("base");
    let o = ytrainer(&[
        "init",
        "--data",
        "examples/quickstart/train.jsonl",
        "--out",
        &s(&base),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = ytrainer(&[
        "run",
        "--model",
        &s(&base),
        "--data",
        &s(&f),
        "--max-steps",
        "1",
        "--output-dir",
        &s(&d.path().join("out")),
    ]);
    (d, o, f)
}

#[test]
fn malformed_json_line() {
    let (_d, o, f) = run_on_data(
        "bad.jsonl",
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n{\"messages\": [\n",
    );
    assert_user_error(
        &o,
        &format!(
            "error: {}:2: malformed JSON: EOF while parsing a list; each line of a JSON Lines file must be one complete JSON object (fix or delete the line)",
            f.display()
        ),
    );
}

#[test]
fn missing_field() {
    let (_d, o, f) = run_on_data(
        "bad.json",
        b"[{\"instruction\": \"a\", \"output\": \"b\"}, {\"instruction\": \"c\"}]",
    );
    assert_user_error(
        &o,
        &format!(
            "error: {}:1: field \"output\" is missing; every alpaca record needs \"output\" (the file's first record was detected as alpaca)",
            f.display()
        ),
    );
}

#[test]
fn non_utf8_file() {
    let (_d, o, f) = run_on_data("bad.jsonl", b"{\"text\": \"caf\xe9\"}\n");
    assert_user_error(
        &o,
        &format!(
            "error: {}:1: the file is not valid UTF-8 (first bad byte at byte offset 13); re-encode it as UTF-8",
            f.display()
        ),
    );
}

#[test]
fn empty_dataset() {
    let (_d, o, f) = run_on_data("empty.jsonl", b"\n\n");
    assert_user_error(
        &o,
        &format!(
            "error: {}: the file holds no records; add at least one record (or remove the file from the data list)",
            f.display()
        ),
    );
}

#[test]
fn empty_answers_are_counted_warnings_not_silent() {
    let mut data = String::new();
    for i in 0..5 {
        data.push_str(&format!(
            "{{\"instruction\": \"say {i}\", \"output\": \"{i} {i} {i}\"}}\n"
        ));
    }
    data.push_str("{\"instruction\": \"say nothing\", \"output\": \"\"}\n");
    let (d, o, _f) = run_on_data("warn.jsonl", data.as_bytes());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("warnings 1"), "{}", stdout(&o));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("out/summary.json")).unwrap())
            .unwrap();
    let w = summary["data"]["warnings"][0].as_str().unwrap();
    assert!(w.contains("warn.jsonl:6"), "{w}");
}

#[test]
fn overlong_samples_are_truncated_or_skipped_and_counted() {
    let long = "word ".repeat(400);
    let data = format!(
        "{{\"instruction\": \"short\", \"output\": \"ok\"}}\n{{\"instruction\": \"long\", \"output\": \"{long}\"}}\n"
    );
    let d = TempDir::new("overlong");
    let f = d.path().join("d.jsonl");
    std::fs::write(&f, &data).unwrap();
    let base = d.path().join("base");
    assert!(
        ytrainer(&[
            "init",
            "--data",
            "examples/quickstart/train.jsonl",
            "--out",
            &s(&base)
        ])
        .status
        .success()
    );
    let o = ytrainer(&[
        "run",
        "--model",
        &s(&base),
        "--data",
        &s(&f),
        "--max-steps",
        "1",
        "--max-seq-len",
        "64",
        "--output-dir",
        &s(&d.path().join("a")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("truncated 1, skipped (overlong) 0"),
        "{}",
        stdout(&o)
    );
    let o = ytrainer(&[
        "run",
        "--model",
        &s(&base),
        "--data",
        &s(&f),
        "--max-steps",
        "1",
        "--max-seq-len",
        "64",
        "--set",
        "data.overlong=\"skip\"",
        "--output-dir",
        &s(&d.path().join("b")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("truncated 0, skipped (overlong) 1"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn dry_run_prints_resolved_config_with_overrides() {
    let o = ytrainer(&[
        "run",
        "--config",
        "examples/quickstart/sft-nlirg.toml",
        "--loss",
        "ce",
        "--max-steps",
        "7",
        "--seed",
        "3",
        "--dry-run",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: toml::Table = stdout(&o).parse().unwrap();
    assert_eq!(cfg["loss"]["name"].as_str(), Some("ce"));
    assert_eq!(cfg["train"]["max_steps"].as_integer(), Some(7));
    assert_eq!(cfg["train"]["seed"].as_integer(), Some(3));
    assert_eq!(
        cfg["train"]["epochs"].as_integer(),
        Some(4),
        "untouched keys keep the file's value"
    );
    assert_eq!(cfg["adapter"]["type"].as_str(), Some("full"));
}

/// A build without the `mpi` feature started by an MPI launcher with several processes refuses to train (each
/// process would train alone into the same run directory) and says how to build it.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_run_under_an_mpi_launcher() {
    let o = std::process::Command::new(bin())
        .args([
            "run",
            "--config",
            "examples/quickstart/sft-nlirg.toml",
            "--dry-run",
        ])
        .current_dir(root())
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert_user_error(&o, "started by an MPI launcher with 2 processes");
    assert!(stderr(&o).contains("--features mpi"), "{}", stderr(&o));
}
