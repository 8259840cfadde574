//! Helpers shared by the end-to-end tests: run the real `ytrainer` binary, locate assets, temp dirs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// `../shared/assets` next to the repository (present on the project's machines and CI).
pub fn assets() -> PathBuf {
    let p = root().join("../shared/assets");
    assert!(
        p.exists(),
        "shared test assets not found at {}: these tests need ../shared/assets (see README)",
        p.display()
    );
    p
}

/// A fresh temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "ytrainer-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ytrainer")
}

/// Runs ytrainer from the repository root.
pub fn ytrainer(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(root())
        .output()
        .expect("failed to start ytrainer")
}

/// `ytrainer run` of one optimizer step of the tiny preset on the quick-start data into `out`, from the
/// repository root: the cheapest real run (more flags with `.args`, variables with `.env`).
pub fn tiny_step(out: &Path) -> Command {
    let mut c = Command::new(bin());
    c.args([
        "run",
        "--preset",
        "tiny",
        "--data",
        "examples/quickstart/train.jsonl",
        "--max-steps",
        "1",
        "--output-dir",
    ])
    .arg(out)
    .current_dir(root());
    c
}

/// Runs ytrainer from the repository root and asserts that it succeeded (its stderr in the failure message).
pub fn ytrainer_ok(args: &[&str]) -> Output {
    let o = ytrainer(args);
    assert!(
        o.status.success(),
        "ytrainer {args:?} failed:\n{}",
        stderr(&o)
    );
    o
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Asserts a failed run with a one-paragraph error that contains `needle`, and no panic or backtrace.
pub fn assert_user_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr:\n{err}"
    );
    assert_eq!(o.status.code(), Some(1), "stderr:\n{err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    assert!(
        !err.contains("panicked")
            && !err.contains("RUST_BACKTRACE")
            && !err.contains("internal error"),
        "{err}"
    );
    let last = err.lines().filter(|l| l.starts_with("error:")).count();
    assert_eq!(last, 1, "expected exactly one error paragraph:\n{err}");
}

/// Parses a JSONL file.
pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn s(p: &Path) -> String {
    p.to_string_lossy().to_string()
}

/// `n` short preference pairs from the bundled DPO demo file, written to `dir/pairs.jsonl`.
#[allow(dead_code)]
pub fn small_pairs(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    let all: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(assets().join("corpora/preference/dpo_en_demo.json")).unwrap(),
    )
    .unwrap();
    let short: Vec<String> = all
        .iter()
        .filter(|r| {
            r["conversations"].to_string().len() < 300
                && r["chosen"]["value"].as_str().unwrap().len() < 600
                && r["rejected"]["value"].as_str().unwrap().len() < 600
        })
        .take(n)
        .map(|r| r.to_string())
        .collect();
    assert_eq!(short.len(), n);
    let p = dir.join("pairs.jsonl");
    std::fs::write(&p, short.join("\n")).unwrap();
    p
}
