//! Data-parallel training under `mpirun` (the CLI's `mpi` feature; `.ci/run` installs Open MPI and runs these):
//! 2 and 3 ranks on loopback against the single-process run of the same config. Per-step loss and gradient norm
//! and the final weights must agree within 1e-5 relative, with gradient accumulation on (several micro-batches
//! per step, spread unevenly over the ranks); mismatched configs stop every rank before step 1; a 2-rank
//! checkpoint resumes on 3 ranks; a killed rank ends the run, and so does a hung one (collective-call timeout).
#![cfg(feature = "mpi")]

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// `mpirun -np N ytrainer ARGS` on this machine (oversubscribed, not bound to cores: CI has two).
fn mpirun(np: usize, args: &[&str]) -> Output {
    mpirun_cmd(np).args(args).output().expect("mpirun")
}

fn mpirun_cmd(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--oversubscribe",
        "--allow-run-as-root",
        "--bind-to",
        "none",
        "-np",
        &np.to_string(),
        bin(),
    ])
    .current_dir(root())
    // Shared memory through copies: containers often forbid the cross-memory-attach default.
    .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    .env("RAYON_NUM_THREADS", "1");
    c
}

/// A tiny model (the `tiny` preset) made once per test in `dir/base`.
fn base_model(dir: &Path) -> PathBuf {
    let base = dir.join("base");
    let o = ytrainer(&[
        "init",
        "--data",
        &s(&root().join("examples/quickstart/train.jsonl")),
        "--out",
        &s(&base),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    base
}

/// A config training `base` with `loss` and `adapter` for `steps` steps of several micro-batches each.
fn config(dir: &Path, base: &Path, adapter: &str, loss: &str, steps: usize) -> PathBuf {
    let data = root().join("examples/quickstart");
    let text = format!(
        r#"[model]
path = "{base}"

[adapter]
type = "{adapter}"
r = 4
alpha = 8.0
dropout = 0.1

[data]
train = "{train}"
eval = "{eval}"
max_seq_len = 64

[loss]
name = "{loss}"

[train]
max_steps = {steps}
learning_rate = 3e-3
warmup_steps = 1
tokens_per_step = 160
micro_batch_tokens = 96
max_micro_batch_size = 4
max_grad_norm = 0.5
seed = 42

[eval]
max_samples = 12
every_steps = 2

[output]
dir = "{out}"
save_every_steps = 2
"#,
        base = base.display(),
        train = data.join("train.jsonl").display(),
        eval = data.join("eval.jsonl").display(),
        out = dir.join("unused").display(),
    );
    let p = dir.join(format!("{adapter}-{loss}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn run_args<'a>(cfg: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["run", "--config", cfg, "--output-dir", out];
    v.extend_from_slice(extra);
    v
}

fn close(a: f64, b: f64, what: &str) {
    let tol = 1e-5 * a.abs().max(b.abs()).max(1e-6);
    assert!((a - b).abs() <= tol, "{what}: {a} vs {b}");
}

/// Per-step loss and grad norm, eval lines and final weights of two run directories agree within 1e-5.
fn assert_same_run(single: &Path, parallel: &Path, loss_key: &str) {
    let (a, b) = (
        jsonl(&single.join("metrics.jsonl")),
        jsonl(&parallel.join("metrics.jsonl")),
    );
    assert_eq!(a.len(), b.len(), "steps");
    for (x, y) in a.iter().zip(&b) {
        let step = &x["step"];
        close(
            x[loss_key].as_f64().unwrap(),
            y[loss_key].as_f64().unwrap(),
            &format!("step {step} {loss_key}"),
        );
        close(
            x["grad_norm"].as_f64().unwrap(),
            y["grad_norm"].as_f64().unwrap(),
            &format!("step {step} grad_norm"),
        );
        for k in ["tokens", "pairs"] {
            assert_eq!(x.get(k), y.get(k), "step {step} {k}");
        }
    }
    let (ea, eb) = (
        jsonl(&single.join("eval.jsonl")),
        jsonl(&parallel.join("eval.jsonl")),
    );
    assert_eq!(ea.len(), eb.len(), "eval lines");
    for (x, y) in ea.iter().zip(&eb) {
        close(
            x["eval_loss"].as_f64().unwrap(),
            y["eval_loss"].as_f64().unwrap(),
            "eval_loss",
        );
    }
    assert_same_weights(&single.join("final"), &parallel.join("final"));
}

fn weights_file(dir: &Path) -> PathBuf {
    ["adapter_model.safetensors", "model.safetensors"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no weights in {}", dir.display()))
}

/// The weights agree within 1e-5 relative, over the whole model and tensor by tensor, with one exception: the
/// key projections' biases get 1e-3. Their gradient is zero in exact arithmetic (softmax ignores a shift shared
/// by every key), so what they receive is rounding noise, which Adam's normalisation turns into real steps and
/// any change of summation order (here: gradients summed over ranks) changes; and their norm is tiny (~0.02 in
/// tiny-qwen2), so a few 1e-6 of absolute difference read as 1e-4 relative. The whole-model bound covers them.
fn assert_same_weights(a: &Path, b: &Path) {
    let wa = ytrainer_core::checkpoint::read_safetensors(&weights_file(a)).unwrap();
    let wb = ytrainer_core::checkpoint::read_safetensors(&weights_file(b)).unwrap();
    assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
    let (mut dall, mut nall) = (0f64, 0f64);
    for (name, (_, x)) in &wa {
        let y = &wb[name].1;
        let (mut d, mut n) = (0f64, 0f64);
        for (p, q) in x.iter().zip(y) {
            d += (f64::from(*p) - f64::from(*q)).powi(2);
            n += f64::from(*p).powi(2);
        }
        dall += d;
        nall += n;
        let rel = (d / n.max(1e-30)).sqrt();
        let tol = if name.ends_with("k_proj.bias") {
            1e-3
        } else {
            1e-5
        };
        assert!(rel <= tol, "{name}: relative difference {rel}");
    }
    let rel = (dall / nall.max(1e-30)).sqrt();
    assert!(rel <= 1e-5, "whole model: relative difference {rel}");
}

/// Trains `adapter` x `loss` in one process and on each of `ranks`, and compares every parallel run with the
/// single-process one.
fn parity(adapter: &str, loss: &str, ranks: &[usize]) {
    let d = TempDir::new(&format!("dp-{adapter}-{loss}"));
    let base = base_model(d.path());
    let cfg = config(d.path(), &base, adapter, loss, 4);
    let single = d.path().join("single");
    let o = ytrainer(&run_args(&s(&cfg), &s(&single), &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    let m = jsonl(&single.join("metrics.jsonl"));
    assert_eq!(m.len(), 4);
    for &np in ranks {
        let out = d.path().join(format!("np{np}"));
        let o = mpirun(np, &run_args(&s(&cfg), &s(&out), &[]));
        let err = stderr(&o);
        assert!(o.status.success(), "{np} ranks:\n{err}");
        assert!(
            err.contains(&format!("data-parallel over {np} ranks")),
            "{err}"
        );
        // One writer: the report is printed once, and every file exists once.
        assert_eq!(stdout(&o).matches("done:").count(), 1, "{}", stdout(&o));
        assert_same_run(&single, &out, "loss");
    }
}

#[test]
fn ce_full_fine_tuning_on_2_and_3_ranks_equals_one_process() {
    parity("full", "ce", &[2, 3]);
}

#[test]
fn nlirg_lora_with_dropout_on_2_and_3_ranks_equals_one_process() {
    parity("lora", "nlirg", &[2, 3]);
}

/// rho1 and truncation rank tokens within each micro-batch; micro-batches are never split across ranks, so their
/// statistics are those of the single process.
#[test]
fn rho1_and_truncation_on_2_ranks_equal_one_process() {
    parity("lora", "rho1", &[2]);
    parity("full", "truncation", &[3]);
}

/// DPO on `ranks` against one process: `adapter` "lora" takes the reference from the base with adapters off at
/// every micro-batch, "full" precomputes it once (every rank for all pairs; rank 0 writes the cache).
fn dpo_parity(adapter: &str, ranks: usize) {
    let d = TempDir::new(&format!("dp-dpo-{adapter}"));
    let data = small_pairs(d.path(), 12);
    let args = |out: &Path| -> Vec<String> {
        [
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
            adapter,
            "--max-steps",
            "3",
            "--learning-rate",
            "0.005",
            "--set",
            "preference.pairs_per_step=5",
            "--set",
            "preference.micro_pairs=1",
            "--set",
            "preference.sft_weight=0.3",
            "--set",
            "train.max_grad_norm=0.5",
            "--output-dir",
            &s(out),
        ]
        .map(String::from)
        .to_vec()
    };
    let single = d.path().join("single");
    let a = args(&single);
    let o = ytrainer(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let par = d.path().join(format!("np{ranks}"));
    let a = args(&par);
    let o = mpirun(ranks, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_run(&single, &par, "loss");
    let (x, y) = (
        jsonl(&single.join("metrics.jsonl")),
        jsonl(&par.join("metrics.jsonl")),
    );
    for (p, q) in x.iter().zip(&y) {
        for k in ["rewards/accuracy", "rewards/margin", "logps/chosen"] {
            close(p[k].as_f64().unwrap(), q[k].as_f64().unwrap(), k);
        }
    }
}

#[test]
fn dpo_lora_on_2_ranks_and_full_on_3_ranks_equal_one_process() {
    dpo_parity("lora", 2);
    dpo_parity("full", 3);
}

/// Each rank given another learning rate: every rank stops before step 1 with a message naming the rank and key.
#[test]
fn ranks_with_different_configs_stop_before_step_one_naming_the_key() {
    let d = TempDir::new("dp-mismatch");
    let base = base_model(d.path());
    let cfg = config(d.path(), &base, "lora", "ce", 2);
    let out = d.path().join("run");
    let o = Command::new("mpirun")
        .args([
            "--oversubscribe",
            "--allow-run-as-root",
            "--bind-to",
            "none",
            "-np",
            "1",
            bin(),
            "run",
            "--config",
            &s(&cfg),
            "--output-dir",
            &s(&out),
            ":",
            "-np",
            "1",
            bin(),
            "run",
            "--config",
            &s(&cfg),
            "--output-dir",
            &s(&out),
            "--learning-rate",
            "0.002",
        ])
        .current_dir(root())
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("rank 1 of 2 runs a different config than rank 0")
            && err.contains("train.learning_rate: 0.003 -> 0.002"),
        "{err}"
    );
    assert!(!out.join("metrics.jsonl").exists(), "no step ran");
}

/// A 2-rank run checkpointed at step 2 resumes on 3 ranks and ends where the uninterrupted single process ends.
#[test]
fn a_two_rank_checkpoint_resumes_on_three_ranks() {
    let d = TempDir::new("dp-resume");
    let base = base_model(d.path());
    let cfg = config(d.path(), &base, "lora", "nlirg", 4);
    let single = d.path().join("single");
    let o = ytrainer(&run_args(&s(&cfg), &s(&single), &[]));
    assert!(o.status.success(), "{}", stderr(&o));

    // The interrupted run: the same plan, stopped after step 2 (its checkpoint-2 is the one to resume).
    let out = d.path().join("np");
    let o = mpirun(2, &run_args(&s(&cfg), &s(&out), &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    for later in ["checkpoint-4", "final", "metrics.jsonl", "eval.jsonl"] {
        let p = out.join(later);
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
    let o = mpirun(3, &run_args(&s(&cfg), &s(&out), &["--resume", &s(&out)]));
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("resumed from") && err.contains("at step 2"),
        "{err}"
    );
    let (a, b) = (
        jsonl(&single.join("metrics.jsonl")),
        jsonl(&out.join("metrics.jsonl")),
    );
    assert_eq!(b.len(), 2, "steps 3 and 4 only");
    for (x, y) in a[2..].iter().zip(&b) {
        assert_eq!(x["step"], y["step"]);
        close(
            x["loss"].as_f64().unwrap(),
            y["loss"].as_f64().unwrap(),
            "loss",
        );
        close(
            x["grad_norm"].as_f64().unwrap(),
            y["grad_norm"].as_f64().unwrap(),
            "grad_norm",
        );
    }
    assert_same_weights(&single.join("final"), &out.join("final"));
}

/// Starts a long 2-rank run, waits until rank 0 has logged a step, and returns the launcher with rank 1's pid.
fn two_ranks_training(
    d: &TempDir,
    extra_env: &[(&str, &str)],
) -> (std::process::Child, String, PathBuf) {
    let base = base_model(d.path());
    let cfg = config(d.path(), &base, "full", "ce", 100_000);
    let out = d.path().join("run");
    let mut cmd = mpirun_cmd(2);
    for (k, v) in extra_env {
        // mpirun passes its own environment to the ranks.
        cmd.env(k, v);
    }
    let child = cmd
        .args(run_args(&s(&cfg), &s(&out), &[]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !out.join("checkpoint-2").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "no checkpoint written"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let pids = String::from_utf8(
        Command::new("pgrep")
            .args(["-P", &child.id().to_string()])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    // The rank process whose environment says OMPI_COMM_WORLD_RANK=1.
    let rank1 = pids
        .split_whitespace()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| {
                    env.split(|&b| b == 0)
                        .any(|kv| kv == b"OMPI_COMM_WORLD_RANK=1")
                })
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("no rank 1 among mpirun's children {pids}"))
        .to_string();
    (child, rank1, out)
}

/// Waits for the launcher to end (at most 60 s after `since`), non-zero, and returns everything it printed.
fn ends_within_60_s(mut child: std::process::Child, since: Instant, what: &str) -> String {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success());
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "the run did not end within 60 s of {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = child.wait_with_output().unwrap();
    format!("{}{}", stdout(&o), stderr(&o))
}

/// One rank killed mid-run: the launcher ends the others and the run fails within 60 s, naming the rank.
#[test]
fn a_killed_rank_ends_the_run_naming_it() {
    let d = TempDir::new("dp-kill");
    let (child, rank1, _) = two_ranks_training(&d, &[]);
    Command::new("kill").args(["-9", &rank1]).status().unwrap();
    let text = ends_within_60_s(child, Instant::now(), "rank 1's death");
    assert!(text.contains("rank 1"), "{text}");
}

/// One rank hung (stopped, alive): MPI never notices, the other rank's collective-call watchdog gives up after
/// `YTRAINER_COLLECTIVE_TIMEOUT` and the launcher ends the group; the last checkpoint resumes.
#[test]
fn a_hung_rank_ends_the_run_after_the_collective_timeout() {
    let d = TempDir::new("dp-hang");
    let (child, rank1, out) = two_ranks_training(&d, &[("YTRAINER_COLLECTIVE_TIMEOUT", "5")]);
    Command::new("kill")
        .args(["-STOP", &rank1])
        .status()
        .unwrap();
    let text = ends_within_60_s(child, Instant::now(), "rank 1's hang");
    assert!(
        text.contains("error: rank 0 of 2 waited ")
            && text.contains("for the other ranks (YTRAINER_COLLECTIVE_TIMEOUT = 5 s)"),
        "{text}"
    );
    // The launcher ended the stopped rank too (no process left behind), and the last checkpoint is whole.
    let gone = Instant::now();
    while std::fs::read_to_string(format!("/proc/{rank1}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    }) {
        assert!(
            gone.elapsed() < Duration::from_secs(30),
            "rank 1 ({rank1}) is still alive"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let last = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("checkpoint-")?.parse::<usize>().ok()
        })
        .max()
        .expect("a checkpoint");
    // One process resumes from it (its tensors' digests are checked on load), then is stopped.
    let log = d.path().join("resume.log");
    let cfg = d.path().join("full-ce.toml");
    let mut resumed = Command::new(bin())
        .args(run_args(&s(&cfg), &s(&out), &["--resume", &s(&out)]))
        .current_dir(root())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(d.path().join("resume.err")).unwrap())
        .spawn()
        .unwrap();
    let want = format!(
        "resumed from {} at step {last}",
        s(&out.join(format!("checkpoint-{last}")))
    );
    let t = Instant::now();
    let found = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default()
            + &std::fs::read_to_string(d.path().join("resume.err")).unwrap_or_default();
        if text.contains(&want)
            || resumed.try_wait().unwrap().is_some()
            || t.elapsed() > Duration::from_secs(120)
        {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = resumed.kill();
    let _ = resumed.wait();
    assert!(found.contains(&want), "{want:?} not in:\n{found}");
}
