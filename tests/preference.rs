//! Preference (DPO-family) training end to end on the tiny Qwen2 checkpoint: the step-0 identity (fresh LoRA =>
//! policy == reference => loss ln 2, accuracy 0), sequence log-probs equal to summed per-token log-probs, and a
//! short run that raises reward accuracy and margin on its training pairs.

mod common;
use common::*;

use ytrainer_core::burn::prelude::*;
use ytrainer_core::preference::{pair_batch, sequence_log_probs};
use ytrainer_core::step::eval_micro_batch;
use ytrainer_data::{ChatTemplate, TokenizerWrapper, load_pairs, tokenize_pair};
use ytrainer_models::{AdapterSpec, LoraConfig, load_pretrained};

/// The first `n` pairs of the demo file with short prompts, as a jsonl file for the CLI.
#[test]
fn dpo_step_zero_is_ln2_and_a_short_run_learns_the_pairs() {
    let d = TempDir::new("dpo");
    let data = small_pairs(d.path(), 8);
    let out = d.path().join("run");
    let o = ytrainer(&[
        "run",
        "--model",
        &s(&assets().join("tiny-qwen2")),
        "--data",
        &s(&data),
        "--eval-data",
        &s(&data),
        "--loss",
        "dpo",
        "--max-steps",
        "12",
        "--epochs",
        "10",
        "--learning-rate",
        "0.005",
        "--set",
        "preference.pairs_per_step=4",
        "--set",
        "train.warmup_steps=1",
        "--output-dir",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = jsonl(&out.join("metrics.jsonl"));
    // fresh LoRA (B = 0): policy == reference, so every pair's sigmoid DPO loss is ln 2 and no pair is "won"
    assert!(
        (m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        m[0]
    );
    assert_eq!(m[0]["rewards/accuracy"], 0.0);
    assert_eq!(m[0]["rewards/margin"], 0.0);
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
        "pair_weight",
        "grad_norm",
    ] {
        assert!(m[0][key].is_number(), "metrics lack {key}");
    }
    let sm: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let (b, a) = (&sm["summary"]["eval_before"], &sm["summary"]["eval_after"]);
    assert_eq!(b["eval_rewards/accuracy"], 0.0);
    assert!(a["eval_rewards/accuracy"].as_f64().unwrap() >= 0.75, "{a}");
    assert!(a["eval_rewards/margin"].as_f64().unwrap() > 0.1, "{a}");
    assert!(a["eval_loss"].as_f64().unwrap() < 0.6, "{a}");
    assert!(out.join("final/adapter_config.json").exists());
    // the same metrics reach TensorBoard under TRL's names
    let ev = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents")
        })
        .expect("TensorBoard event file");
    let file = ytrainer_core::tensorboard::read_scalars(&ev.path()).unwrap();
    let acc: Vec<_> = file
        .scalars
        .iter()
        .filter(|s| s.tag == "rewards/accuracy")
        .collect();
    assert_eq!(acc.len(), 12);
    assert_eq!(acc[0].step, 1);
    assert_eq!(acc[0].value, 0.0);
}

#[test]
fn every_pairwise_objective_trains_a_step() {
    let d = TempDir::new("dpo-all");
    let data = small_pairs(d.path(), 4);
    for loss in ["cdpo", "ipo", "hinge", "simpo", "dpo-nlirg", "orpo"] {
        let out = d.path().join(loss);
        let o = ytrainer(&[
            "run",
            "--model",
            &s(&assets().join("tiny-qwen2")),
            "--data",
            &s(&data),
            "--loss",
            loss,
            "--max-steps",
            "1",
            "--set",
            "preference.pairs_per_step=4",
            "--set",
            "preference.sft_weight=0.1",
            "--output-dir",
            &s(&out),
        ]);
        assert!(o.status.success(), "{loss}: {}", stderr(&o));
        let m = jsonl(&out.join("metrics.jsonl"));
        assert!(
            m[0]["loss"].as_f64().unwrap().is_finite(),
            "{loss}: {}",
            m[0]
        );
    }
}

#[test]
fn full_fine_tuning_uses_precomputed_reference() {
    let d = TempDir::new("dpo-full");
    let data = small_pairs(d.path(), 4);
    let out = d.path().join("run");
    let o = ytrainer(&[
        "run",
        "--model",
        &s(&assets().join("tiny-qwen2")),
        "--data",
        &s(&data),
        "--loss",
        "dpo",
        "--adapter",
        "full",
        "--max-steps",
        "1",
        "--set",
        "preference.pairs_per_step=4",
        "--output-dir",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("reference_logps.json").exists());
    let m = jsonl(&out.join("metrics.jsonl"));
    assert!(
        (m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        m[0]
    );
}

/// Issue 21: preference training's memory grew with the number of pairs (the reference precompute and every
/// evaluation ran on the autodiff model and kept each micro-batch's graph: 16 GB for 64 pairs of full fine-tuning
/// on the tiny model). With the same pair repeated 4 and 24 times (so the longest sequence is the same), the
/// peak resident memory `summary.json` reports must not grow by more than the data itself (generous: 150 MB;
/// before the fix it grew by ~4 GB).
#[test]
fn preference_memory_does_not_grow_with_the_number_of_pairs() {
    let d = TempDir::new("dpo-mem");
    let one = std::fs::read_to_string(small_pairs(d.path(), 1)).unwrap();
    let peak = |n: usize| {
        let data = d.path().join(format!("pairs{n}.jsonl"));
        std::fs::write(&data, vec![one.trim(); n].join("\n")).unwrap();
        let out = d.path().join(format!("run{n}"));
        let o = ytrainer(&[
            "run",
            "--model",
            &s(&assets().join("tiny-qwen2")),
            "--data",
            &s(&data),
            "--eval-data",
            &s(&data),
            "--loss",
            "dpo",
            "--adapter",
            "full",
            "--max-steps",
            "1",
            "--set",
            "preference.pairs_per_step=4",
            "--output-dir",
            &s(&out),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
                .unwrap();
        v["peak_rss_mb"]
            .as_f64()
            .expect("peak_rss_mb in summary.json")
    };
    let (small, large) = (peak(4), peak(24));
    assert!(
        large < small + 150.0,
        "peak RSS {large:.0} MB with 24 pairs vs {small:.0} MB with 4"
    );
}

/// The DPO path's sequence log-prob of a completion equals the sum of the per-token log-probs the trainer's
/// eval/score path computes for the same tokens.
#[test]
fn sequence_log_probs_equal_summed_token_log_probs() {
    let dir = assets().join("tiny-qwen2");
    let device = Device::flex().autodiff();
    let (model, _) = load_pretrained(
        &dir,
        &AdapterSpec::Lora(LoraConfig {
            r: 4,
            alpha: 8.0,
            ..LoraConfig::default()
        }),
        &device,
    )
    .unwrap();
    let tok = TokenizerWrapper::from_file(&dir.join("tokenizer.json")).unwrap();
    let t = ChatTemplate::from_model_dir(&dir).unwrap();
    let d = TempDir::new("seq");
    let data = small_pairs(d.path(), 2);
    let pairs: Vec<_> = load_pairs(&data)
        .unwrap()
        .pairs
        .iter()
        .map(|p| tokenize_pair(&tok, &t, p, &Default::default()).unwrap())
        .collect();
    let refs: Vec<_> = pairs.iter().collect();
    let mb = pair_batch(&refs, 8189);
    let (sums, counts) = sequence_log_probs(&model, &mb, &device);
    for (row, ex) in [
        &pairs[0].chosen,
        &pairs[1].chosen,
        &pairs[0].rejected,
        &pairs[1].rejected,
    ]
    .iter()
    .enumerate()
    {
        let single = pair_batch(
            &[&ytrainer_data::PairExample {
                chosen: (*ex).clone(),
                rejected: (*ex).clone(),
                weight: 1.0,
                label: None,
            }],
            8189,
        );
        let c = eval_micro_batch(&model, &single, [1.45, 6.6, 15.0], &device);
        let per_token_sum = -c.ce_sum / 2.0; // the single batch holds the example twice
        assert_eq!(counts[row] * 2, c.tokens);
        assert!(
            ((sums[row] as f64 - per_token_sum) / per_token_sum).abs() < 1e-5,
            "row {row}: {} vs {per_token_sum}",
            sums[row]
        );
    }
}

/// Gradient checkpointing changes memory, not training: DPO with LoRA gives the same metrics step by step.
#[test]
fn dpo_with_gradient_checkpointing_trains_like_the_plain_run() {
    let d = TempDir::new("dpo-ckpt");
    let data = small_pairs(d.path(), 4);
    let run = |name: &str, extra: &[&str]| {
        let out = d.path().join(name);
        let mut args = vec![
            "run".to_string(),
            "--model".into(),
            s(&assets().join("tiny-qwen2")),
            "--data".into(),
            s(&data),
            "--loss".into(),
            "dpo".into(),
            "--max-steps".into(),
            "3".into(),
            "--epochs".into(),
            "3".into(),
            "--learning-rate".into(),
            "0.005".into(),
            "--set".into(),
            "preference.pairs_per_step=4".into(),
            "--set".into(),
            "preference.sft_weight=0.1".into(),
            "--output-dir".into(),
            s(&out),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ytrainer(&refs);
        assert!(o.status.success(), "{}", stderr(&o));
        jsonl(&out.join("metrics.jsonl"))
    };
    let (plain, ckpt) = (
        run("plain", &[]),
        run("ckpt", &["--gradient-checkpointing"]),
    );
    assert_eq!(plain.len(), 3);
    assert_eq!(plain.len(), ckpt.len());
    for (a, b) in plain.iter().zip(&ckpt) {
        for key in ["loss", "grad_norm", "rewards/margin", "logps/chosen"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                "step {}: {key} {x} plain vs {y} with gradient checkpointing",
                a["step"]
            );
        }
    }
    // The updates are not zero: the third step's rewards moved away from the step-0 identity.
    assert!(plain[2]["rewards/margin"].as_f64().unwrap().abs() > 0.0);
}

/// Preference runs go through the same loop as SFT: checkpoints are pruned to `save_total_limit`, and periodic
/// evaluations reach `eval.jsonl` and the console.
#[test]
fn preference_runs_share_the_loops_checkpoint_pruning_and_eval_cadence() {
    let d = TempDir::new("dpo-loop");
    let data = small_pairs(d.path(), 4);
    let out = d.path().join("run");
    let o = ytrainer(&[
        "run",
        "--model",
        &s(&assets().join("tiny-qwen2")),
        "--data",
        &s(&data),
        "--loss",
        "dpo",
        "--max-steps",
        "4",
        "--epochs",
        "4",
        "--save-every",
        "1",
        "--eval-every",
        "2",
        "--set",
        "preference.pairs_per_step=2",
        "--set",
        "output.save_total_limit=2",
        "--output-dir",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut kept: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    kept.sort();
    assert_eq!(kept, ["checkpoint-3", "checkpoint-4"]);
    let evals: Vec<u64> = jsonl(&out.join("eval.jsonl"))
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, [0, 2, 4]);
    let err = stderr(&o);
    assert!(err.contains("eval @ step 2: loss "), "{err}");
    assert!(
        err.contains(&format!(
            "checkpoint written: {}",
            out.join("checkpoint-4").display()
        )),
        "{err}"
    );
    // The summary names the final eval and the resumable checkpoint, as an SFT run's does.
    let summary = stdout(&o);
    assert!(
        summary.contains("  eval: loss ") && summary.contains("reward accuracy"),
        "{summary}"
    );
    assert!(
        summary.contains(&format!(
            "  checkpoint (resumable): {}",
            out.join("checkpoint-4").display()
        )),
        "{summary}"
    );
}

/// KTO on LLaMA-Factory's `kto_en_demo.json` (its 3 shortest desirable and 3 shortest undesirable records): with a
/// fresh LoRA (B = 0) the policy is the reference, so every log-ratio and the KL estimate are 0, and TRL's KTO loss
/// is `lambda_d (1 - sigmoid(0)) = lambda_d / 2` per desirable completion and `lambda_u / 2` per undesirable one:
/// 0.5 with the default weights, `(3 * 2 * 0.5 + 3 * 0.5) / 6 = 0.75` with `desirable_weight = 2`. Records without
/// a label are an error naming the record.
#[test]
fn kto_step_zero_matches_trl_on_the_demo_file() {
    let d = TempDir::new("kto");
    let all: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(assets().join("corpora/preference/kto_en_demo.json")).unwrap(),
    )
    .unwrap();
    let pick = |label: bool| {
        let mut v: Vec<&serde_json::Value> = all.iter().filter(|r| r["label"] == label).collect();
        v.sort_by_key(|r| r["messages"].to_string().len());
        v.into_iter()
            .take(3)
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
    };
    let mut lines = pick(true);
    lines.extend(pick(false));
    let data = d.path().join("kto.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = d.path().join(name);
        let mut args = vec![
            "run".to_string(),
            "--model".into(),
            s(&assets().join("tiny-qwen2")),
            "--data".into(),
            s(&data),
            "--loss".into(),
            "kto".into(),
            "--max-steps".into(),
            "1".into(),
            "--set".into(),
            "preference.pairs_per_step=6".into(),
            "--output-dir".into(),
            s(&out),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ytrainer(&refs);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        jsonl(&out.join("metrics.jsonl"))
    };
    let m = run("plain", &[]);
    assert!(
        (m[0]["loss"].as_f64().unwrap() - 0.5).abs() < 1e-6,
        "{}",
        m[0]
    );
    assert_eq!(m[0]["pairs"], 6);
    let m = run("weighted", &["--loss-param", "desirable_weight=2"]);
    assert!(
        (m[0]["loss"].as_f64().unwrap() - 0.75).abs() < 1e-6,
        "{}",
        m[0]
    );

    let bad = d.path().join("bad.jsonl");
    std::fs::write(&bad, lines[0].replace("\"label\":true", "\"tag\":true")).unwrap();
    let o = ytrainer(&[
        "run",
        "--model",
        &s(&assets().join("tiny-qwen2")),
        "--data",
        &s(&bad),
        "--loss",
        "kto",
        "--output-dir",
        &s(&d.path().join("bad")),
    ]);
    assert_user_error(
        &o,
        &format!(
            "{}:1: field \"label\" is missing; every KTO record needs",
            bad.display()
        ),
    );
}

/// The logged `loss` holds the SFT term the gradient has (ORPO's NLL, `[preference] sft_weight`): at step 0 of a
/// fresh LoRA the DPO term is ln 2, so with `sft_weight = s` the loss is `ln 2 + s * NLL` (NLL = mean over the
/// chosen tokens, > 0) and doubling `s` doubles the excess; `orpo` includes its NLL term with weight 1.
#[test]
fn the_logged_loss_includes_the_sft_term() {
    let d = TempDir::new("sft-term");
    let data = small_pairs(d.path(), 4);
    let run = |name: &str, loss: &str, sft: &str| {
        let out = d.path().join(name);
        let o = ytrainer(&[
            "run",
            "--model",
            &s(&assets().join("tiny-qwen2")),
            "--data",
            &s(&data),
            "--loss",
            loss,
            "--max-steps",
            "1",
            "--set",
            "preference.pairs_per_step=4",
            "--set",
            &format!("preference.sft_weight={sft}"),
            "--output-dir",
            &s(&out),
        ]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        jsonl(&out.join("metrics.jsonl"))[0]["loss"]
            .as_f64()
            .unwrap()
    };
    let ln2 = std::f64::consts::LN_2;
    let (a, b) = (
        run("half", "dpo", "0.5") - ln2,
        run("one", "dpo", "1.0") - ln2,
    );
    assert!(a > 0.1, "{a}");
    assert!((b - 2.0 * a).abs() < 1e-5 * b, "{a} {b}");
    // ORPO's own NLL term is that of sft_weight = 1: orpo with sft_weight 0 minus its odds-ratio part (< 0.1 ln 2
    // + margin at step 0) is about the NLL, i.e. b.
    let orpo = run("orpo", "orpo", "0.0");
    assert!(orpo > b && orpo < b + 0.2, "{orpo} vs NLL {b}");
}

/// The preference step runs the policy through SFT's fused, chunked LM head (no `[tokens, vocab]` log-softmax)
/// and feeds the objective's per-token gradient back as signed token weights. Its first step must equal the
/// textbook form, autodiff through the whole log-softmax (the implementation before the change, whose step-1
/// values on the first 8 pairs of the DPO demo file and 16 records of the KTO demo file are pinned here), for
/// each objective family: sigmoid DPO with LoRA and full (precomputed reference), IPO, ORPO (its NLL term) and
/// KTO.
#[test]
fn the_chunked_preference_head_gives_the_log_softmax_gradient() {
    let d = TempDir::new("pref-head");
    let cut = |name: &str, n: usize| {
        let src = assets().join("corpora/preference").join(name);
        let v: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
        let f = d.path().join(name);
        std::fs::write(&f, serde_json::to_string(&v[..n]).unwrap()).unwrap();
        s(&f)
    };
    let (dpo, kto) = (cut("dpo_en_demo.json", 8), cut("kto_en_demo.json", 16));
    // (name, extra args, data, step-1 loss, step-1 gradient norm)
    let cases: [(&str, &[&str], &str, f64, f64); 5] = [
        (
            "dpo-lora",
            &["--loss", "dpo"],
            &dpo,
            std::f64::consts::LN_2,
            11.3791465,
        ),
        (
            "dpo-full",
            &["--loss", "dpo", "--adapter", "full"],
            &dpo,
            0.6931487,
            46.2579844,
        ),
        ("ipo", &["--loss", "ipo"], &dpo, 25.0, 9.3577063),
        ("orpo", &["--loss", "orpo"], &dpo, 9.1320151, 0.9191299),
        ("kto", &["--loss", "kto"], &kto, 0.5, 4.2046134),
    ];
    for (name, extra, data, loss, norm) in cases {
        let out = d.path().join(name);
        let mut args = vec![
            "run",
            "--model",
            Box::leak(s(&assets().join("tiny-qwen2")).into_boxed_str()),
            "--data",
            data,
            "--max-steps",
            "1",
            "--max-seq-len",
            "256",
            "--set",
            "preference.pairs_per_step=4",
            "--output-dir",
            Box::leak(s(&out).into_boxed_str()),
        ];
        args.extend_from_slice(extra);
        let o = ytrainer(&args);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let m = &jsonl(&out.join("metrics.jsonl"))[0];
        let (l, g) = (
            m["loss"].as_f64().unwrap(),
            m["grad_norm"].as_f64().unwrap(),
        );
        assert!(
            (l - loss).abs() < 5e-6 * loss.max(1.0),
            "{name}: loss {l} vs {loss}"
        );
        assert!(
            (g - norm).abs() < 1e-5 * norm,
            "{name}: grad norm {g} vs {norm}"
        );
    }
}

/// Preference runs are planned like SFT runs: a pair (both completions, padded alike) is the unit, the
/// configured pairs per micro-batch are lowered and recomputation switched on when the budget needs it, and a
/// budget too small for one pair is refused with what to do.
#[test]
fn preference_runs_follow_the_memory_plan() {
    let d = TempDir::new("pref-plan");
    let data = small_pairs(d.path(), 8);
    let run = |budget: &str, out: &str| {
        ytrainer(&[
            "run",
            "--model",
            &s(&assets().join("tiny-qwen2")),
            "--data",
            &s(&data),
            "--loss",
            "dpo",
            "--max-steps",
            "1",
            "--memory-budget",
            budget,
            "--output-dir",
            &s(&d.path().join(out)),
        ])
    };
    let o = run("4GB", "roomy");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("memory plan: 4 pairs per micro-batch, gradient checkpointing off"),
        "{}",
        stderr(&o)
    );
    let o = run("1MB", "tiny");
    assert_user_error(
        &o,
        "the memory budget 1 MB (--memory-budget) is too small: one pair (both completions, padded alike) of ",
    );
    // Between the two: the largest budget that cannot hold 4 pairs without recomputation (the estimate at
    // 4 pairs with it off is the upper end), found from the roomy plan's own estimate.
    let err = stderr(&run("4GB", "again"));
    let peak_mb: f64 = err
        .split("estimated peak ")
        .nth(1)
        .and_then(|t| t.split(" MB").next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    let o = run(&format!("{}MB", (peak_mb * 0.6) as u64), "tight");
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("gradient checkpointing on")
            && err.contains("gradient checkpointing switched on: the activations of a micro-batch would not fit the budget"),
        "{err}"
    );
    let m = jsonl(&d.path().join("tight/metrics.jsonl"));
    assert!((m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6);
}

/// Several files of pairs mix like SFT's sources: a cap on the first file (`--max-samples`), a weight on the
/// second (`--source FILE,weight=2`: each pair twice); the plan names each file's share. Column maps stay SFT's.
#[test]
fn preference_files_mix_with_caps_and_weights() {
    let d = TempDir::new("dpo-mix");
    let a = small_pairs(d.path(), 8);
    let b_dir = d.path().join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    let b = small_pairs(&b_dir, 4);
    let out = d.path().join("run");
    let source = format!("{},weight=2", s(&b));
    let run = |extra: &[&str], out: &std::path::Path| {
        let mut args = vec![
            "run".to_string(),
            "--model".into(),
            s(&assets().join("tiny-qwen2")),
            "--data".into(),
            s(&a),
            "--loss".into(),
            "dpo".into(),
            "--max-steps".into(),
            "1".into(),
            "--set".into(),
            "preference.pairs_per_step=2".into(),
            "--output-dir".into(),
            s(out),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ytrainer(&args)
    };
    let o = run(&["--max-samples", "6", "--source", &source], &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    for line in [
        format!(
            "data: {} (pairs): 8 records, first 6 (max_samples) -> 6 training records",
            s(&a)
        ),
        format!(
            "data: {} (pairs): 4 records, weight 2 -> 8 training records",
            s(&b)
        ),
    ] {
        assert!(err.contains(&line), "{line:?} not in:\n{err}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["data"]["pairs"], 14, "{summary}");
    assert_user_error(
        &run(&["--columns", "prompt=question"], &d.path().join("cols")),
        "[data] columns apply to SFT and continued pretraining; preference training (`--loss dpo`) reads pairs by \
         their own field names",
    );
}
