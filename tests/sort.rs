//! `ytrainer sort` end to end on the real SmolLM2 model: label-noise detection on a corrupted alpaca subset
//! (precision@10 and ROC AUC per mode), records kept unchanged with their scores attached to the right record,
//! batched scores equal to `ytrainer score`'s unbatched ones, ordering flags, filters, reports and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;
use serde_json::{Value, json};

fn gguf() -> PathBuf {
    assets().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn alpaca() -> Vec<Value> {
    let p = assets().join("corpora/instruct/alpaca_en_demo.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The first `n` alpaca records, each tagged with `"id"`.
fn records(n: usize) -> Vec<Value> {
    alpaca()
        .into_iter()
        .take(n)
        .enumerate()
        .map(|(i, mut r)| {
            r["id"] = json!(i);
            r
        })
        .collect()
}

fn write_json(path: &Path, v: &[Value]) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// Area under the ROC curve of `scores` (higher = positive), ties counting half.
fn auc(scores: &[(f64, bool)]) -> f64 {
    let pos: Vec<f64> = scores.iter().filter(|s| s.1).map(|s| s.0).collect();
    let neg: Vec<f64> = scores.iter().filter(|s| !s.1).map(|s| s.0).collect();
    let mut c = 0.0;
    for p in &pos {
        for n in &neg {
            c += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    c / (pos.len() * neg.len()) as f64
}

fn precision_at(scores: &[(f64, bool)], k: usize) -> f64 {
    let mut s = scores.to_vec();
    s.sort_by(|a, b| b.0.total_cmp(&a.0));
    s.iter().take(k).filter(|x| x.1).count() as f64 / k as f64
}

/// 100 alpaca records, 10 corrupted (5 answers swapped in from unrelated records, 5 replaced by unrelated
/// prose); one `sort --mode ifd` run gives every mode's score (`quality.scores`): one pass with the prompts, one without.
#[test]
fn corrupted_answers_rank_high_on_smollm2() {
    let tmp = TempDir::new("sort-noise");
    let all = alpaca();
    let prose: Vec<String> =
        std::fs::read_to_string(assets().join("corpora/general_en_devils_dictionary.txt"))
            .unwrap()
            .split("\n\n")
            .map(|p| p.trim().to_string())
            .filter(|p| (200..600).contains(&p.chars().count()))
            .collect();
    let mut data = records(100);
    let corrupt: Vec<usize> = (5..100).step_by(10).collect();
    for (k, &i) in corrupt.iter().enumerate() {
        data[i]["output"] = if k % 2 == 0 {
            all[900 + k]["output"].clone()
        } else {
            json!(prose[50 + k * 7])
        };
    }
    let input = tmp.path().join("noisy.json");
    write_json(&input, &data);
    let out = tmp.path().join("ranked.jsonl");
    let t = Instant::now();
    ytrainer_ok(&[
        "sort",
        "--model",
        &s(&gguf()),
        "--data",
        &s(&input),
        "--out",
        &s(&out),
        "--mode",
        "ifd",
        "--max-seq-len",
        "128",
    ]);
    let secs = t.elapsed().as_secs_f64();
    let ranked = jsonl(&out);
    assert_eq!(ranked.len(), 100);
    let mut report = format!("sort of 100 records (max-seq-len 128): {secs:.1}s\n");
    for (mode, p10_floor, auc_floor) in [
        // measured (2 cores, CPU): filtered p@10 0.60, AUC 0.764; similarity 0.10, 0.699; divergence 0.20, 0.688
        ("filtered", 0.4, 0.68),
        ("similarity", 0.0, 0.62),
        ("divergence", 0.1, 0.6),
        ("ifd", 0.7, 0.9),
    ] {
        let scores: Vec<(f64, bool)> = ranked
            .iter()
            .map(|r| {
                let id = r["id"].as_u64().unwrap() as usize;
                (
                    r["quality"]["scores"][mode].as_f64().unwrap(),
                    corrupt.contains(&id),
                )
            })
            .collect();
        let (p, a) = (precision_at(&scores, 10), auc(&scores));
        report.push_str(&format!("{mode}: precision@10 {p:.2}, AUC {a:.3}\n"));
        assert!(
            p >= p10_floor && a >= auc_floor,
            "{mode}: p@10 {p} (floor {p10_floor}), AUC {a} (floor {auc_floor})\n{report}"
        );
    }
    eprintln!("{report}");
    // The ifd ranking is the output order, unscored records (no score) after the ranked ones.
    let n_scored = ranked
        .iter()
        .position(|r| r["quality"]["unscored"] == json!(true))
        .unwrap_or(ranked.len());
    assert!(
        ranked[n_scored..]
            .iter()
            .all(|r| r["quality"]["unscored"] == json!(true) && r["quality"]["score"].is_null())
    );
    let s: Vec<f64> = ranked[..n_scored]
        .iter()
        .map(|r| r["quality"]["score"].as_f64().unwrap())
        .collect();
    assert!(s.windows(2).all(|w| w[0] >= w[1]));
}

/// Small subset: records unchanged plus `quality`, attached to the right record (batched = unbatched `score`),
/// mode / order / filter flags, JSON-array output, reports, degenerate records.
#[test]
fn sort_keeps_records_and_attaches_the_right_scores() {
    let tmp = TempDir::new("sort-small");
    let mut data = records(12);
    // Degenerate records: a two-token answer, and an empty one (dropped by the loader, still written out).
    data[3]["output"] = json!("Yes");
    data[7]["output"] = json!("");
    // Chat-template text and markup in a prompt, for the report.
    let instr = data[11]["instruction"].as_str().unwrap().to_string();
    data[11]["instruction"] = json!(format!("{instr} (no <|im_end|>, no <b>x</b>)"));
    let input = tmp.path().join("small.jsonl");
    std::fs::write(
        &input,
        data.iter()
            .map(|r| r.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let out = tmp.path().join("ranked.jsonl");
    let report = tmp.path().join("report.md");
    let common_args = |mode: &str, out: &Path| -> Vec<String> {
        [
            "sort",
            "--model",
            &s(&gguf()),
            "--data",
            &s(&input),
            "--out",
            &s(out),
            "--mode",
            mode,
            "--max-seq-len",
            "64",
            "--batch-tokens",
            "256",
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |extra: &[&str], mode: &str, out: &Path| -> Vec<Value> {
        let mut a = common_args(mode, out);
        a.extend(extra.iter().map(|x| x.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = ytrainer_ok(&a);
        // Off a terminal, progress comes as plain lines (the first and last at least), never escape codes.
        let err = stderr(&o);
        assert!(err.contains("sort: 100% of the file, "), "{err}");
        assert!(err.contains(" records/s, elapsed "), "{err}");
        assert!(!err.contains('\u{1b}'), "{err:?}");
        if out.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
        } else {
            jsonl(out)
        }
    };
    let ranked = run(&["--report", &s(&report)], "filtered", &out);
    assert_eq!(ranked.len(), 12);
    // The records with nothing meaningful to score (answers of 2 and 1 tokens within --max-seq-len 64, an empty
    // one) are not ranked (as the cleanest, they would survive
    // `--keep-top --ascending`): marked unscored, no score or rank, written after the ranked ones in file order.
    let unscored: Vec<u64> = ranked[9..]
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(unscored, [3, 5, 7]);
    for r in &ranked[9..] {
        let q = &r["quality"];
        assert_eq!(q["unscored"], json!(true), "{q}");
        assert_eq!(q["rank"], Value::Null);
        assert_eq!(q["score"], Value::Null);
        assert!(q["reason"].is_string(), "{q}");
    }
    // Every record is unchanged apart from `quality`; ranks are 1..n in order; sorted by score descending.
    for (k, r) in ranked.iter().enumerate() {
        let id = r["id"].as_u64().unwrap() as usize;
        let mut stripped = r.clone();
        let q = stripped.as_object_mut().unwrap().remove("quality").unwrap();
        assert_eq!(stripped, data[id]);
        if k >= 9 {
            continue;
        }
        assert!(q.get("unscored").is_none(), "{q}");
        assert_eq!(q["rank"], json!(k + 1));
        assert_eq!(q["mode"], "filtered");
        assert_eq!(q["score"], q["scores"]["filtered"]);
        assert!(q["score"].as_f64().unwrap().is_finite());
        if k > 0 {
            assert!(
                ranked[k - 1]["quality"]["score"].as_f64() >= q["score"].as_f64(),
                "not sorted"
            );
        }
    }
    let by_id = |v: &[Value], id: usize| -> Value {
        v.iter().find(|r| r["id"] == json!(id)).unwrap()["quality"].clone()
    };
    let short = by_id(&ranked, 3);
    assert!(
        short["reason"].as_str().unwrap().contains("shorter than 3"),
        "{short}"
    );
    assert_eq!(short["scores"]["similarity"], json!(0.0));
    let empty = by_id(&ranked, 7);
    assert!(
        empty["reason"].as_str().unwrap().contains("dropped"),
        "{empty}"
    );
    assert_eq!(empty["n_tokens"], json!(0));

    // The same per-record loss and entropy as the unbatched `score` path (which is parity-tested against
    // transformers): proves alignment and that each score sits on its own record.
    let scores_out = tmp.path().join("scores.jsonl");
    ytrainer_ok(&[
        "score",
        "--model",
        &s(&gguf()),
        "--data",
        &s(&input),
        "--out",
        &s(&scores_out),
        "--max-seq-len",
        "64",
    ]);
    let per_sample = jsonl(&scores_out);
    // `score` lists the 11 non-empty records in file order.
    let ids: Vec<usize> = (0..12).filter(|&i| i != 7).collect();
    assert_eq!(per_sample.len(), ids.len());
    for (line, &id) in per_sample.iter().zip(&ids) {
        let q = by_id(&ranked, id);
        let toks = line["tokens"].as_array().unwrap();
        let ent: f64 = toks
            .iter()
            .map(|t| t["entropy"].as_f64().unwrap())
            .sum::<f64>()
            / toks.len() as f64;
        assert_eq!(q["n_tokens"].as_u64().unwrap() as usize, toks.len());
        assert!(
            (q["mean_loss"].as_f64().unwrap() - line["mean_loss"].as_f64().unwrap()).abs() < 2e-3,
            "record {id}: {q} vs {}",
            line["mean_loss"]
        );
        assert!(
            (q["mean_entropy"].as_f64().unwrap() - ent).abs() < 2e-3,
            "record {id}"
        );
    }

    // The report lists the most suspicious records first.
    let md = std::fs::read_to_string(&report).unwrap();
    assert!(md.starts_with("# ytrainer sort"));
    // Markdown keeps `<|im_end|>` readable; only what could open an HTML tag is escaped.
    assert!(md.contains("(no <|im_end|>, no &lt;b>x&lt;/b>)"), "{md}");
    assert!(!md.contains("&lt;|im_end|&gt;"), "{md}");
    // Unscored records are listed apart, not ranked.
    let unscored_part = md
        .split("## Unscored records (not ranked)")
        .nth(1)
        .unwrap_or_else(|| panic!("{md}"));
    for id in [3, 5, 7] {
        assert!(unscored_part.contains(&format!("(record {id})")), "{md}");
    }
    assert!(md.contains("## 1. score"));
    assert!(md.contains(&format!(
        "score {:.4}",
        ranked[0]["quality"]["score"].as_f64().unwrap()
    )));

    // Other modes, --ascending, filters, JSON-array output: no model rerun needed to know the expected order.
    for mode in ["similarity", "divergence"] {
        let o = tmp.path().join(format!("{mode}.json"));
        let html = tmp.path().join(format!("{mode}.html"));
        let v = run(&["--ascending", "--report", &s(&html)], mode, &o);
        // A `.json` output is one JSON array (parsed as such by `run`).
        assert_eq!(v.len(), 12);
        let n_scored = v
            .iter()
            .position(|r| r["quality"]["unscored"] == json!(true))
            .unwrap_or(v.len());
        assert!(n_scored >= 8, "{mode}: {n_scored} scored");
        assert!(
            v[n_scored..]
                .iter()
                .all(|r| r["quality"]["unscored"] == json!(true)),
            "unscored records come last"
        );
        let sc: Vec<f64> = v[..n_scored]
            .iter()
            .map(|r| r["quality"]["scores"][mode].as_f64().unwrap())
            .collect();
        assert!(
            sc.windows(2).all(|w| w[0] <= w[1]),
            "{mode} ascending: {sc:?}"
        );
        assert_eq!(v[0]["quality"]["rank"], json!(n_scored));
        for r in &v {
            let id = r["id"].as_u64().unwrap() as usize;
            let q = &r["quality"];
            assert_eq!(q["mode"], mode);
            // Same series, same scores whatever the mode.
            assert_eq!(q["scores"], by_id(&ranked, id)["scores"]);
        }
        assert!(
            std::fs::read_to_string(&html)
                .unwrap()
                .contains("<h2>1. score")
        );
    }
    // ifd: a second pass without the prompts; the one-pass scores are unchanged, and
    // ifd = exp(mean loss with prompt - mean loss without) over the same answer tokens.
    let v = run(&[], "ifd", &tmp.path().join("ifd.jsonl"));
    assert_eq!(v.len(), 12);
    for r in &v {
        let id = r["id"].as_u64().unwrap() as usize;
        let q = &r["quality"];
        let mut one_pass = q["scores"].clone();
        let ifd = one_pass.as_object_mut().unwrap().remove("ifd").unwrap();
        assert_eq!(one_pass, by_id(&ranked, id)["scores"]);
        if q["unscored"] == json!(true) {
            assert_eq!(q["score"], Value::Null);
        } else {
            assert_eq!(q["score"], ifd);
        }
        if id == 7 {
            assert_eq!(ifd, json!(0.0));
            assert_eq!(q["unscored"], json!(true));
            continue;
        }
        let want = (q["mean_loss"].as_f64().unwrap()
            - q["mean_loss_without_prompt"].as_f64().unwrap())
        .exp();
        assert!(
            (ifd.as_f64().unwrap() - want).abs() < 1e-5,
            "record {id}: {q}"
        );
        // The prompt helps predict a matching answer.
        assert!(ifd.as_f64().unwrap() < 1.0, "record {id}: {q}");
    }
    // A text record has no prompt: ifd 0 and a reason.
    let chat = tmp.path().join("text.jsonl");
    std::fs::write(
        &chat,
        "{\"text\": \"Red, yellow and blue are the primary colours of paint.\"}\n",
    )
    .unwrap();
    let out_chat = tmp.path().join("chat-ranked.jsonl");
    ytrainer_ok(&[
        "sort",
        "--model",
        &s(&gguf()),
        "--data",
        &s(&chat),
        "--out",
        &s(&out_chat),
    ]);
    let v = jsonl(&out_chat);
    let q1 = &v[0]["quality"];
    assert_eq!(q1["mode"], "ifd", "the default mode");
    assert!(q1["n_tokens"].as_u64().unwrap() > 5, "{q1}");
    assert_eq!(q1["scores"]["ifd"], json!(0.0));
    assert_eq!(q1["score"], Value::Null);
    assert_eq!(q1["unscored"], json!(true));
    assert!(
        q1["reason"]
            .as_str()
            .unwrap()
            .starts_with("no prompt to condition the answer on"),
        "{q1}"
    );

    let kept = run(
        &["--drop-top", "25"],
        "filtered",
        &tmp.path().join("d.jsonl"),
    );
    // Selections apply to the 9 ranked records; the unscored ones are left out.
    assert_eq!(kept.len(), 7);
    assert_eq!(kept[0]["quality"]["rank"], json!(3));
    assert!(kept.iter().all(|r| r["quality"]["rank"].is_u64()));
    let kept = run(
        &["--keep-top", "25"],
        "filtered",
        &tmp.path().join("k.jsonl"),
    );
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[1]["quality"]["rank"], json!(2));
    let x = ranked[5]["quality"]["score"].as_f64().unwrap();
    let kept = run(
        &["--threshold", &x.to_string()],
        "filtered",
        &tmp.path().join("t.jsonl"),
    );
    assert!(
        kept.iter()
            .all(|r| r["quality"]["score"].as_f64().unwrap() <= x)
    );
    assert_eq!(
        kept.len(),
        ranked[..9]
            .iter()
            .filter(|r| r["quality"]["score"].as_f64().unwrap() <= x)
            .count()
    );
}

#[test]
fn sort_bad_input_is_a_user_error() {
    let tmp = TempDir::new("sort-bad");
    let input = tmp.path().join("d.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"p\", \"completion\": \"c\"}\n{oops\n",
    )
    .unwrap();
    let out = tmp.path().join("o.jsonl");
    let base = [
        "sort",
        "--model",
        &s(&gguf()),
        "--data",
        &s(&input),
        "--out",
        &s(&out),
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        ytrainer(&a)
    };
    assert_user_error(&with(&[]), "d.jsonl:2");
    assert!(!out.exists());
    assert_user_error(&with(&["--keep-top", "150"]), "between 0 and 100");
    assert_user_error(&with(&["--report", "r.pdf"]), ".md or .html");
    let o = with(&["--mode", "bogus"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("filtered, similarity, divergence or ifd"));
    assert_user_error(
        &with(&["--mode", "ifd", "--train-on", "everything"]),
        "--mode ifd compares the answer's loss with and without its prompt, but --train-on everything",
    );
    let o = with(&["--keep-top", "5", "--drop-top", "5"]);
    assert!(!o.status.success() && stderr(&o).contains("cannot be used with"));
    let txt = tmp.path().join("t.txt");
    std::fs::write(&txt, "hello\n").unwrap();
    assert_user_error(
        &ytrainer(&[
            "sort",
            "--model",
            &s(&gguf()),
            "--data",
            &s(&txt),
            "--out",
            &s(&out),
        ]),
        "plain-text",
    );
}

/// A `sort` killed part-way keeps what it scored (`.OUT.scored`, flushed after every chunk) and the same command
/// resumes after those records: the ranked file and the report are byte for byte an uninterrupted sort's. A line
/// cut off by the kill is dropped and rescored; a scored file of other settings is not resumed.
#[test]
fn a_killed_sort_resumes_and_writes_what_an_uninterrupted_one_does() {
    use std::process::{Command, Stdio};
    use std::time::Duration;
    let tmp = TempDir::new("sort-resume");
    let input = tmp.path().join("data.jsonl");
    std::fs::write(
        &input,
        records(24)
            .iter()
            .map(|r| r.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    // One record per forward pass, so that where a resumed run's chunks start cannot change a score.
    let args = |tag: &str| -> Vec<String> {
        let out = tmp.path().join(format!("ranked-{tag}.jsonl"));
        let report = tmp.path().join(format!("report-{tag}.md"));
        [
            "sort",
            "--model",
            &s(&gguf()),
            "--data",
            &s(&input),
            "--out",
            &s(&out),
            "--report",
            &s(&report),
            "--max-seq-len",
            "64",
            "--batch-size",
            "1",
            "--chunk",
            "2",
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |tag: &str| -> String {
        let a = args(tag);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        stderr(&ytrainer_ok(&a))
    };
    let read = |tag: &str| {
        (
            std::fs::read_to_string(tmp.path().join(format!("ranked-{tag}.jsonl"))).unwrap(),
            std::fs::read_to_string(tmp.path().join(format!("report-{tag}.md"))).unwrap(),
        )
    };
    run("a");
    let (ranked_a, report_a) = read("a");
    assert_eq!(ranked_a.lines().count(), 24);
    assert!(
        !tmp.path().join(".ranked-a.jsonl.scored").exists(),
        "a finished sort removes its scored file"
    );

    // B: killed (SIGKILL) once a few chunks are scored.
    let scored = tmp.path().join(".ranked-b.jsonl.scored");
    let mut child = Command::new(bin())
        .args(args("b"))
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let lines = || {
        std::fs::read_to_string(&scored)
            .map(|t| t.matches('\n').count())
            .unwrap_or(0)
    };
    // the header line and at least 6 records
    while lines() < 7 && t0.elapsed() < Duration::from_secs(300) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sort ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = lines() - 1;
    assert!((6..24).contains(&done), "{done} records scored when killed");
    assert!(!tmp.path().join("ranked-b.jsonl").exists());
    // as if the kill had come in the middle of a line
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&scored)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"i\":23,\"s\":0.5,\"n\":3,\"r\":{\"sco").unwrap();
    drop(f);

    let err = run("b");
    assert!(
        err.contains(&format!(
            "resuming an interrupted sort of the same settings: {done} records already scored"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{done} of them by the interrupted run")),
        "{err}"
    );
    let (ranked_b, report_b) = read("b");
    assert_eq!(ranked_b, ranked_a, "the resumed ranking differs");
    assert_eq!(report_b, report_a, "the resumed report differs");
    assert!(!scored.exists());

    // A scored file left by other settings (here: another ytrainer, a bogus record) is started afresh.
    let other = tmp.path().join(".ranked-c.jsonl.scored");
    std::fs::write(
        &other,
        "{\"ytrainer_sort\":\"0.0.0\"}\n{\"i\":0,\"s\":99.0,\"n\":1}\n",
    )
    .unwrap();
    let err = run("c");
    assert!(!err.contains("resuming"), "{err}");
    assert_eq!(read("c").0, ranked_a);
}
