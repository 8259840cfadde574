//! Sweeps, `ytrainer eval`, `ytrainer plot` and the TensorBoard event files, end to end on the real binary.

mod common;

use std::fs;
use std::path::Path;

use common::*;

/// The tiny quickstart sweep (2 strategies x 2 seeds, 6 steps each), written with an output folder of its own.
fn tiny_sweep(dir: &Path) -> std::path::PathBuf {
    let text = fs::read_to_string(root().join("examples/quickstart/sweep.toml")).unwrap();
    let qs = root().join("examples/quickstart");
    // Same sweep, absolute paths, so the file can live in the temp folder.
    let text = text
        .replace(
            "output = \"../../runs/quickstart-sweep\"",
            &format!("output = \"{}\"", s(&dir.join("out"))),
        )
        .replace(
            "\"eval.jsonl\"",
            &format!("\"{}\"", s(&qs.join("eval.jsonl"))),
        )
        .replace(
            "\"train.jsonl\"",
            &format!("\"{}\"", s(&qs.join("train.jsonl"))),
        )
        .replace(
            "\"../../docs/quickstart.md\"",
            &format!("\"{}\"", s(&root().join("docs/quickstart.md"))),
        );
    let f = dir.join("sweep.toml");
    fs::write(&f, text).unwrap();
    f
}

#[test]
fn tiny_sweep_runs_resumes_and_reports() {
    let tmp = TempDir::new("sweep");
    let f = tiny_sweep(tmp.path());
    let out = tmp.path().join("out");

    let o = ytrainer(&["sweep", &s(&f), "--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let listing = stdout(&o);
    for id in ["ce_seed1", "ce_seed2", "nlirg_seed1", "nlirg_seed2"] {
        assert!(listing.contains(id), "{listing}");
    }

    let o = ytrainer(&["sweep", &s(&f)]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "results.csv",
        "results.md",
        "plots/curves.png",
        "plots/curves.svg",
        "plots/forgetting.png",
        "plots/forgetting.svg",
        "plots/zones.png",
        "plots/zones.svg",
    ] {
        assert!(out.join(f).exists(), "{f} missing; stdout:\n{}", stdout(&o));
    }
    let md = fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("| ce | 2 |") && md.contains("| nlirg | 2 |"),
        "{md}"
    );
    let csv = fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");

    // Each trial is a normal run: metrics, TensorBoard events, exported model, trial.json.
    let trial = out.join("trials/nlirg_seed2");
    let metrics = jsonl(&trial.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 6);
    let t: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(trial.join("trial.json")).unwrap()).unwrap();
    assert_eq!(t["seed"], 2);
    let learn_before = t["evals"]["learn_before"][0]["supervised_loss"]
        .as_f64()
        .unwrap();
    let learn_after = t["evals"]["learn_after"][0]["supervised_loss"]
        .as_f64()
        .unwrap();
    assert!(
        learn_after < learn_before,
        "training lowers the domain loss: {learn_before} -> {learn_after}"
    );
    let cfg = fs::read_to_string(trial.join("config.resolved.toml")).unwrap();
    assert!(
        cfg.contains("name = \"nlirg\"") && cfg.contains("seed = 2"),
        "{cfg}"
    );

    // Resume: a finished sweep reruns nothing; an interrupted trial (no trial.json) restarts from scratch.
    fs::remove_file(out.join("trials/ce_seed2/trial.json")).unwrap();
    fs::remove_dir_all(out.join("trials/ce_seed2/final")).unwrap();
    let before = fs::metadata(out.join("trials/ce_seed1/trial.json"))
        .unwrap()
        .modified()
        .unwrap();
    let o = ytrainer(&["sweep", &s(&f)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("3 of 4 trials already finished"), "{err}");
    assert!(
        err.contains("trial 2/4") && !err.contains("trial 1/4") && !err.contains("trial 3/4"),
        "{err}"
    );
    assert_eq!(
        fs::metadata(out.join("trials/ce_seed1/trial.json"))
            .unwrap()
            .modified()
            .unwrap(),
        before
    );
    assert!(out.join("trials/ce_seed2/trial.json").exists());
    assert!(out.join("trials/ce_seed2/final").exists());
}

/// `--devices A,B`: trials spread over one worker process per device (i mod N), same results folder; the
/// parent then aggregates everything. (Two "devices" here are both the CPU: the mechanism is what is tested.)
#[test]
fn sweep_spreads_trials_over_devices() {
    let tmp = TempDir::new("sweepdev");
    let f = tiny_sweep(tmp.path());
    let out = tmp.path().join("out");
    let o = ytrainer(&["sweep", &s(&f), "--devices", "cpu,cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("shard 0/2 done (2 trials)") && text.contains("shard 1/2 done (2 trials)"),
        "{text}"
    );
    assert!(text.contains("4 trials done"), "{text}");
    let csv = fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    for id in ["ce_seed1", "ce_seed2", "nlirg_seed1", "nlirg_seed2"] {
        let cfg = fs::read_to_string(out.join("trials").join(id).join("config.toml")).unwrap();
        assert!(cfg.contains("device = \"cpu\""), "{id}: {cfg}");
    }
    assert_user_error(
        &ytrainer(&["sweep", &s(&f), "--shard", "2/2"]),
        "--shard `2/2`",
    );
}

#[test]
fn sweep_rejects_a_bad_trial_before_training() {
    let tmp = TempDir::new("sweep-bad");
    let f = tiny_sweep(tmp.path());
    let text = fs::read_to_string(&f)
        .unwrap()
        .replace("loss = [\"ce\", \"nlirg\"]", "loss = [\"ce\", \"nlirgg\"]");
    fs::write(&f, text).unwrap();
    let o = ytrainer(&["sweep", &s(&f)]);
    assert_user_error(&o, "nlirgg");
    assert!(
        !tmp.path()
            .join("out/trials/ce_seed1/metrics.jsonl")
            .exists(),
        "nothing trained"
    );
}

/// One short run of the quickstart; returns its run directory.
fn short_run(dir: &Path) -> std::path::PathBuf {
    let run = dir.join("run");
    let o = ytrainer(&[
        "run",
        "--config",
        "examples/quickstart/sft-nlirg.toml",
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--output-dir",
        &s(&run),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    run
}

#[test]
fn eval_matches_the_trainer_and_tensorboard_matches_metrics_and_plot_draws() {
    let tmp = TempDir::new("eval");
    let run = short_run(tmp.path());
    let evals = jsonl(&run.join("eval.jsonl"));

    // `ytrainer eval` on the run's eval file = the trainer's eval before (base model) and after (final/).
    let eval_file = s(&root().join("examples/quickstart/eval.jsonl"));
    let text = s(&root().join("docs/quickstart.md"));
    for (model, expected) in [
        (run.join("base-model"), &evals[0]),
        (run.join("final"), evals.last().unwrap()),
    ] {
        let o = ytrainer(&[
            "eval",
            "--model",
            &s(&model),
            "--data",
            &eval_file,
            "--data",
            &text,
            "--window",
            "128",
            "--format",
            "json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let d = &v["datasets"][0];
        assert_eq!(d["kind"], "instruction");
        let (got, want) = (
            d["supervised_loss"].as_f64().unwrap(),
            expected["eval_loss"].as_f64().unwrap(),
        );
        assert!((got - want).abs() < 1e-9, "eval {got} vs trainer {want}");
        assert_eq!(d["supervised_tokens"], expected["eval_tokens"]);
        assert!(d["tokens"].as_u64().unwrap() > d["supervised_tokens"].as_u64().unwrap());
        let t = &v["datasets"][1];
        assert_eq!(t["kind"], "text");
        let l = t["loss"].as_f64().unwrap();
        assert!((t["perplexity"].as_f64().unwrap() - l.exp()).abs() < 1e-6 * l.exp());
        assert!(t.get("supervised_loss").is_none());
    }
    // `eval` equals `score`'s means: the supervised loss is the token-weighted mean of score's per-token losses.
    let scores = tmp.path().join("scores.jsonl");
    let o = ytrainer(&[
        "score",
        "--model",
        &s(&run.join("final")),
        "--data",
        &eval_file,
        "--out",
        &s(&scores),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (mut sum, mut count) = (0.0f64, 0u64);
    for rec in jsonl(&scores) {
        let tokens = rec["tokens"].as_array().unwrap();
        let mean = rec["mean_loss"].as_f64().unwrap();
        let per: f64 = tokens.iter().map(|t| t["loss"].as_f64().unwrap()).sum();
        assert!((per / tokens.len() as f64 - mean).abs() < 1e-9);
        sum += per;
        count += tokens.len() as u64;
    }
    let final_eval = evals.last().unwrap();
    assert_eq!(count, final_eval["eval_tokens"].as_u64().unwrap());
    let (from_score, from_eval) = (
        sum / count as f64,
        final_eval["eval_loss"].as_f64().unwrap(),
    );
    assert!(
        (from_score - from_eval).abs() < 1e-5 * from_eval.abs().max(1.0),
        "score's mean {from_score} vs eval {from_eval}"
    );

    // The table form.
    let o = ytrainer(&[
        "eval",
        "--model",
        &s(&run.join("final")),
        "--data",
        &eval_file,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("perplexity") && stdout(&o).contains("eval.jsonl"),
        "{}",
        stdout(&o)
    );

    // TensorBoard: one event file whose scalars are metrics.jsonl's and eval.jsonl's, CRCs checked.
    let files = ytrainer_core::tensorboard::event_files(&run);
    assert_eq!(files.len(), 1, "{files:?}");
    let ev = ytrainer_core::tensorboard::read_scalars(&files[0]).unwrap();
    assert_eq!(ev.file_version.as_deref(), Some("brain.Event:2"));
    let metrics = jsonl(&run.join("metrics.jsonl"));
    for m in &metrics {
        let step = m["step"].as_i64().unwrap();
        for tag in [
            "loss",
            "ce",
            "mean_weight",
            "zone_learning",
            "lr",
            "grad_norm",
        ] {
            let sc = ev
                .scalars
                .iter()
                .find(|s| s.step == step && s.tag == tag)
                .unwrap_or_else(|| panic!("{tag}@{step}"));
            let want = m[tag].as_f64().unwrap() as f32;
            assert_eq!(sc.value, want, "{tag}@{step}");
        }
    }
    for e in &evals {
        let step = e["step"].as_i64().unwrap();
        let sc = ev
            .scalars
            .iter()
            .find(|s| s.step == step && s.tag == "eval_loss")
            .unwrap();
        assert_eq!(sc.value, e["eval_loss"].as_f64().unwrap() as f32);
    }

    // `ytrainer plot`
    let o = ytrainer(&["plot", &s(&run)]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["plots/curves.png", "plots/curves.svg"] {
        assert!(fs::metadata(run.join(f)).unwrap().len() > 1000, "{f}");
    }
    let o = ytrainer(&["plot", &s(tmp.path())]);
    assert_user_error(&o, "metrics.jsonl");
}

/// The eval path reproduces transformers' per-token mean loss on the tiny Qwen2 reference checkpoint.
#[test]
fn evaluate_equals_the_reference_per_token_mean() {
    use ytrainer_data::{BatchOptions, Example};
    let dir = assets().join("tiny-qwen2");
    let r: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let device = ytrainer_core::device::select("cpu", 0).unwrap();
    let (model, _) =
        ytrainer_models::load_pretrained(&dir, &ytrainer_models::AdapterSpec::Full, &device)
            .unwrap();
    let examples: Vec<Example> = r["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let ids: Vec<u32> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let n = ids.len();
            Example::single(ids, vec![true; n], None)
        })
        .collect();
    let per_token: Vec<f64> = r["loss_per_token"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
        .collect();
    let mean = per_token.iter().sum::<f64>() / per_token.len() as f64;
    let m = ytrainer_core::sft::evaluate(
        &model,
        &examples,
        &BatchOptions::default(),
        [0.2, 4.0, 15.0],
        &device,
        0,
    )
    .unwrap();
    assert_eq!(m.eval_tokens, per_token.len());
    assert!(
        (m.eval_loss - mean).abs() < 1e-4,
        "{} vs {mean}",
        m.eval_loss
    );
    assert!((m.eval_loss - r["mean_loss"].as_f64().unwrap()).abs() < 1e-4);
}

/// Every path of a sweep's base config (`[loss] plugins`, `loss.reference_model`, ...) is resolved against the
/// sweep file, as a run config's are against its file, so the trial configs written to `configs/` name the same
/// files; `--dry-run` loads each trial's plugins (a wrong plugin path fails there, not in the first trial), and
/// a `ce` trial does not load the `reference_model` it does not use.
#[test]
fn sweep_resolves_every_path_against_the_sweep_file_and_dry_run_loads_plugins() {
    let tmp = TempDir::new("sweep-paths");
    let sub = tmp.path().join("sub");
    fs::create_dir_all(sub.join("plugins")).unwrap();
    let qs = root().join("examples/quickstart");
    let sweep = |plugins: &str| {
        let f = sub.join("sweep.toml");
        fs::write(
            &f,
            format!(
                "name = \"paths\"\noutput = \"out\"\nlearn = [\"{eval}\"]\neval = {{ window = 64, max_samples = 4 }}\n\
                 [base]\nmodel = {{ preset = \"tiny\" }}\nadapter = {{ type = \"full\" }}\n\
                 data = {{ train = \"{eval}\", max_seq_len = 64 }}\n\
                 loss = {{ plugins = [\"{plugins}\"], reference_model = \"no-such-reference\" }}\n\
                 train = {{ max_steps = 1, tokens_per_step = 256 }}\noutput = {{ save_every_steps = 0 }}\n\
                 [axes]\nloss = [\"ce\"]\n",
                eval = s(&qs.join("eval.jsonl")),
            ),
        )
        .unwrap();
        f
    };
    // A plugin path that does not exist next to the sweep file fails the dry run, naming the resolved path.
    let o = ytrainer(&["sweep", &s(&sweep("missing-plugins")), "--dry-run"]);
    assert_user_error(&o, &s(&sub.join("missing-plugins")));
    assert!(!sub.join("out").exists(), "a dry run writes nothing");
    // An existing (empty) plugin folder: the dry run passes, and the sweep runs its `ce` trial.
    let f = sweep("plugins");
    let o = ytrainer(&["sweep", &s(&f), "--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = ytrainer(&["sweep", &s(&f)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("reference_model") && stderr(&o).contains("is not loaded: loss `ce`"),
        "{}",
        stderr(&o)
    );
    let written: toml::Table = fs::read_to_string(sub.join("out/configs/ce.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        written["loss"]["plugins"].as_array().unwrap()[0].as_str(),
        Some(s(&sub.join("plugins")).as_str())
    );
    assert_eq!(
        written["loss"]["reference_model"].as_str(),
        Some(s(&sub.join("no-such-reference")).as_str())
    );
}

/// A trial killed after a checkpoint continues from it on the next `ytrainer sweep` (a 350-step trial takes an
/// hour on a CPU), and ends where the uninterrupted trial ended.
#[test]
fn an_interrupted_trial_continues_from_its_checkpoint() {
    let tmp = TempDir::new("sweep-continue");
    let f = tiny_sweep(tmp.path());
    let text = fs::read_to_string(&f)
        .unwrap()
        .replace("seeds = [1, 2]", "seeds = [1]")
        .replace("loss = [\"ce\", \"nlirg\"]", "loss = [\"nlirg\"]")
        .replace(
            "output = { save_every_steps = 0 }",
            "output = { save_every_steps = 2, save_total_limit = 3 }",
        );
    fs::write(&f, text).unwrap();
    let trial = tmp.path().join("out/trials/nlirg_seed1");
    let o = ytrainer(&["sweep", &s(&f)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap()
    };
    let whole = read(&trial.join("trial.json"));
    let loss = |t: &serde_json::Value, k: &str| t["evals"][k][0]["loss"].as_f64().unwrap();

    // "Kill" it after step 4: no result, no export, no checkpoint-6; a file of its own shows the folder is kept.
    fs::remove_file(trial.join("trial.json")).unwrap();
    fs::remove_dir_all(trial.join("final")).unwrap();
    fs::remove_dir_all(trial.join("checkpoint-6")).unwrap();
    assert!(trial.join("checkpoint-4").exists());
    fs::write(trial.join("note.txt"), "kept").unwrap();
    let o = ytrainer(&["sweep", &s(&f)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        trial.join("note.txt").exists(),
        "the folder was cleared instead of resumed"
    );
    let again = read(&trial.join("trial.json"));
    assert_eq!(again["evals"]["steps"], 6);
    for k in ["learn_after", "retain_after"] {
        let (a, b) = (loss(&whole, k), loss(&again, k));
        assert!(
            (a - b).abs() < 1e-6,
            "{k}: {a} uninterrupted vs {b} resumed"
        );
    }
    assert_eq!(jsonl(&trial.join("metrics.jsonl")).len(), 6);

    // Interrupted again, but the sweep's settings changed meanwhile: the checkpoint is not this trial's any
    // more, so the folder is cleared and the trial reruns from step 0 with the new settings.
    fs::remove_file(trial.join("trial.json")).unwrap();
    fs::remove_dir_all(trial.join("final")).unwrap();
    let text = fs::read_to_string(&f)
        .unwrap()
        .replace("learning_rate = 3e-3", "learning_rate = 2e-3");
    fs::write(&f, text).unwrap();
    let o = ytrainer(&["sweep", &s(&f)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !trial.join("note.txt").exists(),
        "a stale folder was resumed"
    );
    let rerun = read(&trial.join("trial.json"));
    assert_eq!(rerun["evals"]["steps"], 6);
    assert!(
        (loss(&rerun, "learn_after") - loss(&whole, "learn_after")).abs() > 1e-6,
        "the new learning rate changed nothing?"
    );
}
