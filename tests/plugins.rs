//! External plugins end to end (build the example cdylib, load it three ways, describe, curve, train two steps),
//! a misbehaving plugin stopping a run cleanly, `ytrainer curve` output, and the reference-based built-ins.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;

fn dylib(stem: &str) -> String {
    format!(
        "{}{stem}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// `cargo build --release --manifest-path <manifest>` into a target dir of its own; returns `release/`.
fn cargo_build(manifest: &Path) -> PathBuf {
    let target = root().join("target/plugin-examples");
    let st = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(manifest)
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("run cargo");
    assert!(st.success(), "building {} failed", manifest.display());
    target.join("release")
}

/// The example plugin's library (built once per test binary).
fn example_lib() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        cargo_build(&root().join("examples/plugins/clipped-linear/Cargo.toml"))
            .join(dylib("clipped_linear"))
    })
}

/// The example pairwise plugin's library.
fn pairwise_lib() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        cargo_build(&root().join("examples/plugins/margin-dpo/Cargo.toml"))
            .join(dylib("margin_dpo"))
    })
}

fn misbehave_lib() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        cargo_build(&root().join("crates/ytrainer-core/tests/fixtures/misbehave/Cargo.toml"))
            .join(dylib("misbehave"))
    })
}

/// A plugin directory holding just `lib` (the shared target dir holds other libraries too).
fn plugin_dir(d: &TempDir, lib: &Path) -> PathBuf {
    let dir = d.path().join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(lib, dir.join(lib.file_name().unwrap())).unwrap();
    dir
}

fn tiny_run(out: &Path, extra: &[&str]) -> std::process::Output {
    let tiny = assets().join("tiny-qwen2");
    let data = assets().join("corpora/instruct/alpaca_en_demo.json");
    let mut args: Vec<String> = [
        "run",
        "--model",
        &s(&tiny),
        "--data",
        &s(&data),
        "--max-steps",
        "2",
        "--max-seq-len",
        "96",
        "--tokens-per-step",
        "128",
        "--set",
        "eval.max_samples=4",
        "--output-dir",
        &s(out),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    args.extend(extra.iter().map(|x| x.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ytrainer(&refs)
}

#[test]
fn external_plugin_is_discovered_described_curved_and_trains_two_steps() {
    let d = TempDir::new("ext");
    let dir = plugin_dir(&d, example_lib());

    // --plugin-dir
    let o = ytrainer(&["--plugin-dir", &s(&dir), "plugins", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("clipped-linear token     external"), "{out}");
    assert!(
        out.contains(&dylib("clipped_linear")) && out.contains("nlirg      token     built-in"),
        "{out}"
    );

    // YTRAINER_PLUGIN_PATH, JSON
    let o = Command::new(bin())
        .args(["plugins", "list", "--format", "json"])
        .env("YTRAINER_PLUGIN_PATH", &dir)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cl = v
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "clipped-linear")
        .unwrap();
    assert_eq!(cl["source"]["kind"], "external");
    assert!(
        cl["source"]["path"]
            .as_str()
            .unwrap()
            .ends_with(&dylib("clipped_linear"))
    );

    let o = ytrainer(&[
        "--plugin-dir",
        &s(&dir),
        "plugins",
        "describe",
        "clipped-linear",
    ]);
    let out = stdout(&o);
    assert!(
        out.contains("formula:    w = clamp(slope * ce + bias, min, max)") && out.contains("slope"),
        "{out}"
    );

    // curve of an external plugin: clamp(0.5 * l + 0.1, 0, 1)
    let o = ytrainer(&[
        "--plugin-dir",
        &s(&dir),
        "curve",
        "clipped-linear",
        "--param",
        "slope=0.5",
        "--at",
        "0,1,4",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let w: Vec<f64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["weight"].as_f64().unwrap())
        .collect();
    assert!(
        (w[0] - 0.1).abs() < 1e-6 && (w[1] - 0.6).abs() < 1e-6 && w[2] == 1.0,
        "{w:?}"
    );

    // Training, with the plugin listed in the run config (`[loss] plugins`, relative to the config file).
    let cfg = d.path().join("run.toml");
    std::fs::write(
        &cfg,
        "[loss]\nname = \"clipped-linear\"\nplugins = [\"plugins\"]\n[loss.params]\nslope = 0.5\n",
    )
    .unwrap();
    let run = d.path().join("run");
    let o = tiny_run(&run, &["--config", &s(&cfg)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("with loss `clipped-linear`"),
        "{}",
        stderr(&o)
    );
    let m = jsonl(&run.join("metrics.jsonl"));
    assert_eq!(m.len(), 2);
    assert!(m.iter().all(|r| r["loss"].as_f64().unwrap().is_finite()));
    assert!(run.join("final/adapter_model.safetensors").exists());
}

#[test]
fn misbehaving_external_plugins_stop_the_run_with_the_plugin_named() {
    let d = TempDir::new("misbehave");
    let dir = plugin_dir(&d, misbehave_lib());
    for (mode, needle) in [
        ("1", "returned NaN for token 1"),
        ("2", "returned weight -1"),
        ("3", "panicked: weight function exploded"),
    ] {
        let run = d.path().join(format!("run{mode}"));
        let o = tiny_run(
            &run,
            &[
                "--plugin-dir",
                &s(&dir),
                "--loss",
                "misbehave",
                "--loss-param",
                &format!("mode={mode}"),
            ],
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("external loss plugin `misbehave`") && err.contains(needle),
            "{err}"
        );
        assert!(
            !err.contains("internal error") && !err.contains("RUST_BACKTRACE"),
            "{err}"
        );
        // Nothing half-written: no checkpoint, no export.
        assert!(!run.join("final").exists());
        let ckpts = std::fs::read_dir(&run).unwrap().filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("checkpoint")
        });
        assert_eq!(ckpts.count(), 0);
    }
    let o = ytrainer(&[
        "--plugin-dir",
        &s(&dir),
        "curve",
        "misbehave",
        "--param",
        "mode=9",
    ]);
    assert_user_error(&o, "`misbehave` rejected its parameters: `mode` = 9");

    // A plugin path that is not a library, and a clash with a loaded plugin.
    let bogus = d.path().join(dylib("bogus"));
    std::fs::write(&bogus, "text").unwrap();
    let o = ytrainer(&["--plugin-dir", &s(&bogus), "plugins", "list"]);
    assert_user_error(&o, "not a loadable shared library");
    let copy = d.path().join(dylib("misbehave2"));
    std::fs::copy(misbehave_lib(), &copy).unwrap();
    let o = ytrainer(&[
        "--plugin-dir",
        &s(&dir),
        "--plugin-dir",
        &s(&copy),
        "plugins",
        "list",
    ]);
    assert_user_error(&o, "two loss plugins are named `misbehave`");
}

#[test]
fn curve_prints_the_nlirg_golden_points_and_draws() {
    // NLIRG golden values (docs/losses.md, `nlirg`: 6 significant digits; the curve runs in f32).
    let golden = [
        (0.0, 0.115067),
        (0.5, 0.233259),
        (1.0, 0.415810),
        (1.2, 0.5),
        (2.0, 0.795760),
        (3.0, 0.955212),
        (5.0, 0.768525),
        (6.6, 0.401313),
        (8.0, 0.141851),
        (10.0, 0.0218814),
        (15.0, 0.0),
        (20.0, 0.0),
    ];
    let at: Vec<String> = golden.iter().map(|(l, _)| l.to_string()).collect();
    let o = ytrainer(&["curve", "nlirg", "--at", &at.join(","), "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    for ((l, w), p) in golden.iter().zip(v.as_array().unwrap()) {
        assert_eq!(p["loss"].as_f64().unwrap(), *l);
        let got = p["weight"].as_f64().unwrap();
        assert!(
            (got - w).abs() <= 2e-6 * w.max(1.0),
            "w({l}) = {got}, want {w}"
        );
    }
    let o = ytrainer(&["curve", "nlirg", "--at", "1.2", "--format", "table"]);
    assert!(stdout(&o).contains("1.2000     0.500000"), "{}", stdout(&o));

    let d = TempDir::new("curve");
    let svg = d.path().join("c.svg");
    let png = d.path().join("c.png");
    let o = ytrainer(&[
        "curve",
        "--compare",
        "nlirg,dft,focal",
        "--from",
        "0",
        "--to",
        "10",
        "--points",
        "3",
        "--format",
        "csv",
        "--out",
        &s(&svg),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().next().unwrap(), "loss,nlirg,dft,focal");
    assert_eq!(
        stdout(&o)
            .lines()
            .nth(1)
            .unwrap()
            .split(',')
            .nth(2)
            .unwrap(),
        "1"
    ); // dft at 0
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    let o = ytrainer(&[
        "curve",
        "eaft",
        "--vs",
        "entropy",
        "--from",
        "0",
        "--to",
        "1",
        "--points",
        "3",
        "--out",
        &s(&png),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    assert_user_error(
        &ytrainer(&["curve", "nlirg", "--out", &s(&d.path().join("x.gif"))]),
        "use a file name ending in .svg or .png",
    );
    assert_user_error(&ytrainer(&["curve", "nlirgg"]), "did you mean `nlirg`");
}

#[test]
fn reference_and_entropy_builtins_train() {
    let d = TempDir::new("builtins");
    for (loss, extra) in [
        ("rho1", "ratio=0.5"),
        ("eaft", "k=8"),
        ("truncation", "per_sample=1"),
        ("iwsft", "clip=4"),
        ("asft", "alpha=0.2"),
        ("chord", ""),
        ("bll", "k=10"),
        ("profit", "tau=0.05"),
    ] {
        let run = d.path().join(loss);
        let mut args = vec!["--loss", loss];
        if !extra.is_empty() {
            args.extend(["--loss-param", extra]);
        }
        let o = tiny_run(&run, &args);
        assert!(o.status.success(), "{loss}: {}", stderr(&o));
        assert_eq!(jsonl(&run.join("metrics.jsonl")).len(), 2, "{loss}");
    }
    // rho1 needs the base model as reference: full fine-tuning has none. (dft and focal: unit tests.)
    let o = tiny_run(
        &d.path().join("rho1-full"),
        &["--loss", "rho1", "--adapter", "full"],
    );
    assert_user_error(&o, "needs reference-model losses");
    // So does asft's KL anchor.
    let o = tiny_run(
        &d.path().join("asft-full"),
        &["--loss", "asft", "--adapter", "full"],
    );
    assert_user_error(&o, "needs reference-model losses");
    // ... unless a separate reference model is named: then full fine-tuning trains with it.
    let run = d.path().join("rho1-full-ref");
    let o = tiny_run(
        &run,
        &[
            "--loss",
            "rho1",
            "--adapter",
            "full",
            "--set",
            &format!("loss.reference_model={}", s(&assets().join("tiny-qwen2"))),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let m = jsonl(&run.join("metrics.jsonl"));
    assert_eq!(m.len(), 2);
    let resolved = std::fs::read_to_string(run.join("config.resolved.toml")).unwrap();
    assert!(resolved.contains("reference_model"), "{resolved}");
    let o = tiny_run(
        &d.path().join("rho1-bad-ref"),
        &[
            "--loss",
            "rho1",
            "--set",
            "loss.reference_model=/nonexistent/model",
        ],
    );
    assert_user_error(&o, "/nonexistent/model");
}

/// An external pairwise plugin (`examples/plugins/margin-dpo`, DPO when gamma = 0) trains exactly like the
/// built-in `dpo`: same loss, rewards and gradient norm at every step; a bad parameter stops the run cleanly.
#[test]
fn external_pairwise_plugin_trains_like_the_builtin_dpo() {
    let d = TempDir::new("pairext");
    let dir = plugin_dir(&d, pairwise_lib());
    let data = small_pairs(d.path(), 8);
    let o = ytrainer(&["--plugin-dir", &s(&dir), "plugins", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("margin-dpo pairwise  external"),
        "{}",
        stdout(&o)
    );
    let run = |loss: &str, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--plugin-dir".to_string(),
            s(&dir),
            "run".into(),
            "--model".into(),
            s(&assets().join("tiny-qwen2")),
            "--data".into(),
            s(&data),
            "--loss".into(),
            loss.into(),
            "--max-steps".into(),
            "3".into(),
            "--epochs".into(),
            "5".into(),
            "--learning-rate".into(),
            "0.005".into(),
            "--set".into(),
            "preference.pairs_per_step=4".into(),
            "--output-dir".into(),
            s(out),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ytrainer(&refs)
    };
    let (ext, builtin) = (d.path().join("ext"), d.path().join("builtin"));
    let o = run("margin-dpo", &ext, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run("dpo", &builtin, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (
        jsonl(&ext.join("metrics.jsonl")),
        jsonl(&builtin.join("metrics.jsonl")),
    );
    assert_eq!(a.len(), 3);
    assert!(
        (a[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        a[0]
    );
    for (x, y) in a.iter().zip(&b) {
        for key in ["loss", "rewards/margin", "rewards/accuracy", "grad_norm"] {
            let (u, v) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(
                (u - v).abs() <= 1e-5 * v.abs().max(1.0),
                "{key}: external {u} vs built-in {v}"
            );
        }
    }
    // Its constructor's error reaches the user with the plugin's name.
    let o = run(
        "margin-dpo",
        &d.path().join("bad"),
        &["--loss-param", "beta=-1"],
    );
    assert_user_error(&o, "`beta` = -1: must be a positive number");
}
