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
    for n in [
        "ce",
        "dft",
        "eaft",
        "focal",
        "nlirg",
        "rho1",
        "truncation",
        "chord",
        "bll",
        "profit",
        "iwsft",
        "asft",
    ] {
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
    assert!(
        stderr(&o).contains(
            "An external plugin is loaded from `--plugin-dir DIR`, the YTRAINER_PLUGIN_PATH environment \
             variable (paths separated by `:`) or `[loss] plugins = [\"path\"]` of the run config; \
             `ytrainer plugins list` shows what was found"
        ),
        "{}",
        stderr(&o)
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
        "invalid device `tpu`: expected `cpu`, `cuda`, `cuda:N`, `wgpu` or `wgpu:N`",
    );
}

#[test]
fn wgpu_device_without_wgpu_build() {
    if cfg!(feature = "wgpu") {
        return;
    }
    let d = TempDir::new("wgpu");
    for args in [
        &[
            "run",
            "--preset",
            "tiny",
            "--data",
            "examples/quickstart/train.jsonl",
            "--device",
            "wgpu",
        ][..],
        &[
            "score",
            "--model",
            "examples",
            "--ids-json",
            "x.json",
            "--device",
            "wgpu:1",
        ][..],
    ] {
        let mut args = args.to_vec();
        let out = s(&d.path().join("out"));
        if args[0] == "run" {
            args.extend(["--output-dir", &out]);
        }
        let o = ytrainer(&args);
        assert_user_error(
            &o,
            "this ytrainer binary was built without wgpu support; rebuild it with",
        );
    }
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

/// `--dry-run` plans the data as the loop will and says what it cannot honour: a default micro-batch (4,096
/// padded tokens) already holds more than a 1,024-token step budget, and 200 steps need more than two epochs.
#[test]
fn dry_run_prints_the_plan_and_warns_about_sizes_it_cannot_honour() {
    let o = ytrainer(&[
        "run",
        "--model",
        &s(&assets().join("tiny-qwen2")),
        "--data",
        &s(&assets().join("corpora/instruct/alpaca_en_demo.json")),
        "--tokens-per-step",
        "1024",
        "--epochs",
        "2",
        "--max-steps",
        "200",
        "--dry-run",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: toml::Table = stdout(&o).parse().unwrap();
    assert_eq!(cfg["train"]["max_steps"].as_integer(), Some(200));
    let err = stderr(&o);
    assert!(
        err.contains("plan: 122 optimizer steps (max_steps 200): 2 epoch(s) of 61 steps\n"),
        "{err}"
    );
    assert!(err.contains("  per step: "), "{err}");
    assert!(
        err.contains(
            "warning: max_steps = 200 cannot be reached: the data makes only 122 steps in 2 epoch(s) (61 per \
             epoch); the run stops after 122."
        ),
        "{err}"
    );
    assert!(
        err.contains(
            "warning: tokens_per_step = 1024 cannot be honoured: one micro-batch (up to micro_batch_tokens = \
             4096 padded tokens, max_micro_batch_size = 16 rows) already holds "
        ),
        "{err}"
    );
    // With micro-batches below the budget the steps come close to it and nothing is said.
    let o = ytrainer(&[
        "run",
        "--model",
        &s(&assets().join("tiny-qwen2")),
        "--data",
        &s(&assets().join("corpora/instruct/alpaca_en_demo.json")),
        "--tokens-per-step",
        "1024",
        "--set",
        "train.micro_batch_tokens=512",
        "--dry-run",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
}

/// With stderr redirected, a run prints plain `step i/N` lines with loss, tokens/s and ETA (and the plan), no
/// escape codes even with `-v`; the summary says when the data ran out before `max_steps`.
#[test]
fn off_a_terminal_training_prints_plain_progress_lines_without_colour() {
    let d = TempDir::new("plain");
    let o = std::process::Command::new(bin())
        .args([
            "-v",
            "run",
            "--preset",
            "tiny",
            "--data",
            "examples/quickstart/eval.jsonl",
            "--max-steps",
            "50",
            "--max-seq-len",
            "64",
            "--tokens-per-step",
            "256",
            "--output-dir",
            &s(d.path()),
        ])
        .current_dir(root())
        .env("YTRAINER_PROGRESS_SECS", "0")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        !err.contains('\u{1b}'),
        "escape codes off a terminal:\n{err:?}"
    );
    assert!(
        err.contains("plan: 2 optimizer steps (max_steps 50): 1 epoch(s) of 2 steps"),
        "{err}"
    );
    for step in ["step 1/2 loss ", "step 2/2 loss "] {
        let line = err
            .lines()
            .find(|l| l.starts_with(step))
            .unwrap_or_else(|| panic!("{err}"));
        assert!(
            line.contains(" tok/s elapsed ") && line.contains(" eta "),
            "{line}"
        );
    }
    assert!(
        stdout(&o).contains(
            "  note: max_steps 50 not reached: the data ran out after 2 steps (1 epoch(s)); raise --epochs for more"
        ),
        "{}",
        stdout(&o)
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["plan"]["total_steps"], 2);
}

/// Every key the config schema has (optional ones set, so that they serialise) is accepted by the key check:
/// `[model] dequantize_base` in a file was refused as unknown while `--dequantize-base` worked.
#[test]
fn every_schema_key_is_a_valid_key() {
    let mut cfg = ytrainer_core::config::RunConfig::default();
    cfg.model.path = Some("m".into());
    cfg.model.preset = Some("tiny".into());
    cfg.model.dequantize_base = true;
    cfg.model.quantize_base = Some("nf4".into());
    cfg.model.base_model_id = Some("org/name".into());
    cfg.adapter.init_from = Some("a".into());
    cfg.data.train = Some("t".into());
    cfg.data.eval = Some("e".into());
    cfg.loss.normalize = Some(ytrainer_core::loss::Normalize::Tokens);
    cfg.loss.reference_model = Some("r".into());
    cfg.preference.reference = Some("r".into());
    let doc: toml::Table = toml::to_string(&cfg).unwrap().parse().unwrap();
    for (section, value) in &doc {
        let keys = ytrainer_recipes::config::KEYS
            .iter()
            .find(|(s, _)| s == section)
            .unwrap_or_else(|| panic!("section [{section}] missing from KEYS"))
            .1;
        for key in value.as_table().unwrap().keys() {
            assert!(
                keys.contains(&key.as_str()),
                "[{section}] {key} missing from KEYS"
            );
        }
    }
    let text = toml::to_string(&cfg).unwrap();
    let d = TempDir::new("keys");
    let f = d.path().join("all.toml");
    std::fs::write(&f, text).unwrap();
    ytrainer_recipes::config::resolve(Some(&f), &[]).unwrap();
}

/// The fenced blocks of README.md and docs/*.md, as `(file, line, info string, text)`.
fn doc_blocks() -> Vec<(String, usize, String, String)> {
    // The SDK's README is its page on a registry: its snippets are checked like the docs'.
    let mut files = vec![
        root().join("README.md"),
        root().join("crates/ytrainer-plugin/README.md"),
    ];
    let mut docs: Vec<_> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f.strip_prefix(root()).unwrap().display().to_string();
        let mut open: Option<(usize, String, String)> = None;
        for (i, line) in text.lines().enumerate() {
            let fence = line.trim_start().strip_prefix("```");
            match (&mut open, fence) {
                (None, Some(info)) => open = Some((i + 1, info.trim().to_string(), String::new())),
                (Some(_), Some(_)) => {
                    let (at, info, body) = open.take().unwrap();
                    out.push((name.clone(), at, info, body));
                }
                (Some((_, _, body)), None) => {
                    body.push_str(line);
                    body.push('\n');
                }
                (None, None) => {}
            }
        }
    }
    out
}

/// Every ```toml block of the docs is what it claims to be, so the docs cannot drift from the config schema:
/// a plain `toml` block is a run config (`ytrainer run --config` resolves it: keys, types, values), `toml sweep`
/// a sweep file (every trial's config resolves), `toml cargo` / `toml fragment` at least valid TOML.
#[test]
fn every_toml_block_in_the_docs_is_a_valid_config() {
    let d = TempDir::new("doc-toml");
    let mut counts = std::collections::BTreeMap::new();
    for (file, line, info, body) in doc_blocks() {
        let mut words = info.split_whitespace();
        if words.next() != Some("toml") {
            continue;
        }
        let kind = words.next().unwrap_or("config").to_string();
        let at = format!("{file}:{line} (```{info})");
        let table: toml::Table = body
            .parse()
            .unwrap_or_else(|e| panic!("{at}: not valid TOML: {e}"));
        match kind.as_str() {
            "config" => {
                let f = d.path().join("doc.toml");
                std::fs::write(&f, &body).unwrap();
                ytrainer_recipes::config::resolve(Some(&f), &[])
                    .unwrap_or_else(|e| panic!("{at}: not a valid run config: {e}"));
            }
            "sweep" => {
                // A named base file is given an empty stand-in; the axes must make valid trial configs.
                if let Some(toml::Value::String(base)) = table.get("base") {
                    std::fs::write(
                        d.path().join(base),
                        "[model]\npreset = \"tiny\"\n[data]\ntrain = \"train.jsonl\"\n",
                    )
                    .unwrap();
                }
                let sw = ytrainer_sweep::Sweep::parse(&body, d.path(), "doc")
                    .unwrap_or_else(|e| panic!("{at}: not a valid sweep file: {e:#}"));
                let trials = sw.trials();
                assert!(!trials.is_empty(), "{at}: no trials");
                for t in &trials {
                    let cfg = sw.trial_config(t, &d.path().join("trial")).unwrap();
                    let f = d.path().join("trial.toml");
                    std::fs::write(&f, toml::to_string(&cfg).unwrap()).unwrap();
                    ytrainer_recipes::config::resolve(Some(&f), &[])
                        .unwrap_or_else(|e| panic!("{at}: trial {}: {e}", t.id));
                }
            }
            "cargo" | "fragment" => {}
            other => {
                panic!("{at}: unknown toml block kind `{other}` (config, sweep, cargo, fragment)")
            }
        }
        *counts.entry(kind).or_insert(0) += 1;
    }
    assert!(counts.get("config").is_some_and(|&n| n >= 1), "{counts:?}");
    assert!(counts.get("sweep").is_some_and(|&n| n >= 1), "{counts:?}");
}

/// Every `ytrainer ...` command line in a ```sh block of the docs names a real subcommand, and every `--flag` on
/// it exists in that subcommand's `--help`: renamed or removed flags cannot linger in the docs.
#[test]
fn every_shell_command_in_the_docs_uses_real_flags() {
    let mut help = std::collections::HashMap::new();
    let mut help_of = |sub: &str| -> String {
        help.entry(sub.to_string())
            .or_insert_with(|| {
                let mut args: Vec<&str> = sub.split(' ').filter(|s| !s.is_empty()).collect();
                args.push("--help");
                let o = ytrainer(&args);
                assert!(o.status.success(), "ytrainer {sub} --help: {}", stderr(&o));
                stdout(&o)
            })
            .clone()
    };
    let mut checked = 0;
    for (file, line, info, body) in doc_blocks() {
        if info != "sh" {
            continue;
        }
        // Continuation lines join their command.
        let joined = body.replace("\\\n", " ");
        // A line may chain commands (`&&`, `;`, a ` | ` pipe); `a|b` without spaces is an alternation.
        let commands = joined
            .lines()
            .flat_map(|l| l.split('#').next().unwrap().split("&&"))
            .flat_map(|c| c.split(';'))
            .flat_map(|c| c.split(" | "))
            .map(str::to_string)
            .collect::<Vec<_>>();
        for cmd in &commands {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            let Some(start) = words
                .iter()
                .position(|w| *w == "ytrainer" || w.ends_with("/ytrainer"))
            else {
                continue;
            };
            let mut rest = words[start + 1..].iter().peekable();
            // Global flags before the subcommand.
            while let Some(w) = rest.peek() {
                match **w {
                    "-v" | "--verbose" => {
                        rest.next();
                    }
                    "--plugin-dir" => {
                        rest.next();
                        rest.next();
                    }
                    _ => break,
                }
            }
            let Some(sub) = rest.next() else { continue };
            let sub = if *sub == "plugins" {
                format!("plugins {}", rest.next().unwrap_or(&"list"))
            } else {
                sub.to_string()
            };
            // `score|eval|...` stands for each of them: a flag must exist in all.
            let rest: Vec<&&str> = rest.collect();
            for sub in sub.split('|') {
                let h = help_of(sub);
                for w in &rest {
                    for flag in w
                        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                        .filter(|t| t.starts_with("--") && t.len() > 2)
                    {
                        let global = ["--verbose", "--help"].contains(&flag);
                        assert!(
                            global
                                || h.contains(&format!("{flag} "))
                                || h.contains(&format!("{flag}\n")),
                            "{file}:{line}: `ytrainer {sub}` has no flag `{flag}`:\n{cmd}"
                        );
                    }
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} commands checked");
}

/// `--plugin-dir` is in the help of the commands that load loss plugins, after their name as before it, and
/// nowhere else: a flag in every command's help suggested that `sort` or `merge` could use a plugin.
#[test]
fn plugin_dir_is_listed_only_by_the_commands_that_load_plugins() {
    let help = |sub: &[&str]| {
        let mut args = sub.to_vec();
        args.push("--help");
        let o = ytrainer(&args);
        assert!(o.status.success(), "{sub:?}: {}", stderr(&o));
        stdout(&o)
    };
    let top = help(&[]);
    assert!(top.contains("--plugin-dir"), "{top}");
    assert!(
        top.contains("run, sweep, bench, curve, plugins, board, score"),
        "{top}"
    );
    for sub in [
        &["run"][..],
        &["sweep"],
        &["bench"],
        &["curve"],
        &["plugins"],
        &["plugins", "list"],
        &["plugins", "describe"],
        &["board"],
        &["score"],
    ] {
        assert!(help(sub).contains("--plugin-dir <DIR>"), "{sub:?} lacks it");
    }
    for sub in [
        "sort", "eval", "convert", "merge", "export", "generate", "chat", "render", "init", "plot",
    ] {
        let h = help(&[sub]);
        assert!(!h.contains("--plugin-dir"), "`{sub} --help` lists it:\n{h}");
    }
    // After the command name it loads the plugins as before it does; a command without plugins refuses it there
    // and ignores it (with a warning) before its name.
    let bogus = TempDir::new("plugin-dir-bogus");
    let lib = bogus.path().join("libnot-a-plugin.so");
    std::fs::write(&lib, b"not a shared library").unwrap();
    for args in [
        vec!["plugins", "list", "--plugin-dir", lib.to_str().unwrap()],
        vec!["--plugin-dir", lib.to_str().unwrap(), "plugins", "list"],
    ] {
        let o = ytrainer(&args);
        assert!(!o.status.success(), "{args:?} loaded nothing");
        assert!(stderr(&o).contains("libnot-a-plugin.so"), "{}", stderr(&o));
    }
    let o = ytrainer(&["sort", "--plugin-dir", "x", "--help"]);
    assert!(!o.status.success());
    let o = ytrainer(&["--plugin-dir", "x", "render", "--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `--batch-size` (examples per micro-batch) and `--grad-accum` (micro-batches per step) plan steps the way a
/// transformers user counts them; for preference training they set pairs per micro-batch and per step.
#[test]
fn batch_size_and_grad_accum_make_steps_of_examples() {
    let o = ytrainer(&[
        "run",
        "--model",
        &s(&assets().join("tiny-qwen2")),
        "--data",
        &s(&assets().join("corpora/instruct/alpaca_en_demo.json")),
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--max-seq-len",
        "512",
        "--dry-run",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: toml::Table = stdout(&o).parse().unwrap();
    assert_eq!(cfg["train"]["batch_size"].as_integer(), Some(4));
    assert_eq!(cfg["train"]["grad_accum"].as_integer(), Some(2));
    let err = stderr(&o);
    // 999 records: 250 micro-batches of 4 (the last of 3), 125 steps of 2.
    assert!(
        err.contains("plan: 125 optimizer steps: 1 epoch(s) of 125 steps\n"),
        "{err}"
    );
    assert!(
        err.contains(" supervised tokens in 2 micro-batch(es); 3-4 (mean 4) rows per micro-batch"),
        "{err}"
    );
    let o = ytrainer(&[
        "run",
        "--model",
        &s(&assets().join("tiny-qwen2")),
        "--data",
        &s(&assets().join("corpora/preference/dpo_en_demo.json")),
        "--loss",
        "dpo",
        "--batch-size",
        "3",
        "--grad-accum",
        "2",
        "--dry-run",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: toml::Table = stdout(&o).parse().unwrap();
    assert_eq!(cfg["preference"]["micro_pairs"].as_integer(), Some(3));
    assert_eq!(cfg["preference"]["pairs_per_step"].as_integer(), Some(6));
}

/// The memory plan: a budget too small for one sequence is refused before training with what one sequence
/// needs; a bad size names the key; a budget that fits prints the plan and trains.
#[test]
fn memory_budget_plans_or_refuses() {
    let d = TempDir::new("budget");
    let run = |budget: &str, out: &str| {
        tiny_step(&d.path().join(out))
            .args(["--memory-budget", budget])
            .output()
            .unwrap()
    };
    let o = run("1MB", "a");
    assert_user_error(
        &o,
        "the memory budget 1 MB (--memory-budget) is too small: one sequence of ",
    );
    assert_user_error(&o, "even with gradient checkpointing");
    assert_user_error(
        &run("lots", "b"),
        "[train] memory_budget = \"lots\": expected a size such as \"700MB\", \"8GB\" or \"2GiB\", or \"auto\"",
    );
    let o = run("4GB", "c");
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("memory plan: micro-batches of up to 4096 padded tokens, gradient checkpointing off, estimated peak")
            && err.contains("of a 4.00 GB budget (--memory-budget)"),
        "{err}"
    );
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

/// `render` shows the data weights: `[weight W]` after each weighted supervised run in text, a `weight` per token
/// in JSON (the record's `weight` times the message's); a weight-0 turn is shown unsupervised.
#[test]
fn render_shows_record_and_message_weights() {
    let d = TempDir::new("render-weights");
    let data = d.path().join("w.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"weight": 2.0, "messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "let me think", "weight": 0.25}, "#,
            r#"{"role": "user", "content": "q2"}, {"role": "assistant", "content": "the answer"}, {"role": "user", "content": "q3"}, "#,
            r#"{"role": "assistant", "content": "ignored", "weight": 0}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let tiny = s(&assets().join("tiny-qwen2"));
    let o = ytrainer(&["render", "--model", &tiny, "--data", &s(&data)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("\u{ab}let me think<|im_end|>\u{bb}[weight 0.5]"),
        "{out}"
    );
    assert!(
        out.contains("\u{ab}the answer<|im_end|>\u{bb}[weight 2]"),
        "{out}"
    );
    assert!(!out.contains("\u{ab}ignored"), "{out}");
    let o = ytrainer(&[
        "render",
        "--model",
        &tiny,
        "--data",
        &s(&data),
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let sup: Vec<(String, f64)> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["supervised"] == true)
        .map(|t| {
            (
                t["piece"].as_str().unwrap().to_string(),
                t["weight"].as_f64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, f64)> = [
        ("let", 0.5),
        (" me", 0.5),
        (" think", 0.5),
        ("<|im_end|>", 0.5),
        ("the", 2.0),
        (" answer", 2.0),
        ("<|im_end|>", 2.0),
    ]
    .iter()
    .map(|(p, w)| (p.to_string(), *w))
    .collect();
    assert_eq!(sup, want);
}

/// `score --loss STRATEGY` gives each token the weight the strategy's curve gives its loss (what training would
/// hand the plugin), the summary states their mean, and a strategy that cannot weigh tokens is refused with
/// what to do.
#[test]
fn score_weighs_tokens_by_a_strategy() {
    let d = TempDir::new("score-weights");
    let model = s(&assets().join("tiny-qwen2"));
    let data = s(&root().join("examples/quickstart/eval.jsonl"));
    let out = d.path().join("scores.jsonl");
    let o = ytrainer(&[
        "score",
        "--model",
        &model,
        "--data",
        &data,
        "--loss",
        "nlirg",
        "--out",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = jsonl(&out);
    let tokens: Vec<&serde_json::Value> = lines
        .iter()
        .flat_map(|l| l["tokens"].as_array().unwrap())
        .collect();
    assert!(tokens.len() > 100);
    let losses: Vec<String> = tokens
        .iter()
        .map(|t| t["loss"].as_f64().unwrap().to_string())
        .collect();
    let c = ytrainer(&[
        "curve",
        "nlirg",
        "--at",
        &losses.join(","),
        "--format",
        "json",
    ]);
    assert!(c.status.success(), "{}", stderr(&c));
    let curve: Vec<serde_json::Value> = serde_json::from_str(&stdout(&c)).unwrap();
    let mut sum = 0.0;
    for (t, p) in tokens.iter().zip(&curve) {
        let (w, want) = (t["weight"].as_f64().unwrap(), p["weight"].as_f64().unwrap());
        assert!((w - want).abs() < 1e-6, "{t} vs curve {p}");
        sum += w;
    }
    let mean = sum / tokens.len() as f64;
    assert!(
        stderr(&o).contains(&format!(
            "nlirg: mean token weight {mean:.5} over {} tokens",
            tokens.len()
        )),
        "{}",
        stderr(&o)
    );
    // Without --loss there is no weight; a pairwise objective and a reference-reading strategy without an
    // adapter are refused.
    let o = ytrainer(&["score", "--model", &model, "--data", &data]);
    assert!(!stdout(&o).contains("\"weight\""));
    assert_user_error(
        &ytrainer(&["score", "--model", &model, "--data", &data, "--loss", "dpo"]),
        "--loss dpo: a pairwise (preference) objective scores pairs of answers, not tokens",
    );
    assert_user_error(
        &ytrainer(&[
            "score", "--model", &model, "--data", &data, "--loss", "rho1",
        ]),
        "--loss rho1 weighs tokens by a reference model's loss: give the trained model as --model plus --adapter",
    );
}

/// `YTRAINER_TRANSPORT` (how data-parallel sums travel) is checked before training: a typo, and NCCL asked of a
/// build without it; `mpi` in one process trains as usual.
#[test]
fn the_transport_variable_is_checked_before_training() {
    let d = TempDir::new("transport");
    let run = |value: &str, out: &str| {
        tiny_step(&d.path().join(out))
            .env("YTRAINER_TRANSPORT", value)
            .output()
            .unwrap()
    };
    assert_user_error(
        &run("nvlink", "a"),
        "error: environment variable YTRAINER_TRANSPORT = \"nvlink\": expected `auto`, `mpi` or `nccl`",
    );
    assert_user_error(
        &run("nccl", "b"),
        "error: environment variable YTRAINER_TRANSPORT = \"nccl\": this ytrainer was built without NCCL; build \
         it with `--features nccl` (with `mpi` for several processes), or unset it",
    );
    let o = run("mpi", "c");
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The commit a binary was built from is in `--version` and in every run's `summary.json`, so numbers that span
/// sessions stay traceable to code (a checkout builds it from `git rev-parse HEAD`).
#[test]
fn the_build_commit_is_in_version_and_summary() {
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let version = stdout(&ytrainer_ok(&["--version"]));
    let commit = version
        .trim()
        .strip_suffix(')')
        .and_then(|v| v.split_once(" (commit "))
        .map(|(_, c)| c.to_string())
        .unwrap_or_else(|| panic!("{version:?}"));
    if let Some(head) = head {
        assert_eq!(
            commit, head,
            "the binary was built from another commit than HEAD"
        );
    }
    let d = TempDir::new("commit");
    let out = d.path().join("run");
    let o = tiny_step(&out).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["ytrainer"]["commit"], commit.as_str(), "{summary}");
}
