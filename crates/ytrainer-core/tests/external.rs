//! External plugins through the C ABI: loading, every failure case, and what the host passes to the plugin.
//! The fixture libraries are built here (cargo for the SDK-based one, plain rustc for the malformed ones).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{
    LossFn, PairStats, PluginError, Registry, TokenStats, tensor_from_slice, tensor_to_vec,
};

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plugin-fixtures")
}

fn dylib(stem: &str) -> String {
    format!(
        "{}{stem}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// Builds the fixture crate `tests/fixtures/<name>` with cargo; returns its library.
fn build_fixture(name: &str) -> PathBuf {
    let manifest =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{name}/Cargo.toml"));
    let st = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir())
        .status()
        .expect("run cargo");
    assert!(st.success(), "building the fixture plugin `{name}` failed");
    target_dir()
        .join("release")
        .join(dylib(&name.replace('-', "_")))
}

/// The `misbehave` fixture plugin (built once per test binary).
fn misbehave() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| build_fixture("misbehave"))
}

/// The `misbehave-pair` fixture (a pairwise plugin).
fn misbehave_pair() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| build_fixture("misbehave-pair"))
}

/// A single-file cdylib compiled with rustc.
fn rustc_lib(src: &str) -> PathBuf {
    rustc_lib_cfg(src, None)
}

/// A single-file cdylib compiled with rustc and `--cfg CFG` (the library is named `SRC_CFG`). Built once per
/// test binary: tests run in parallel, and one must not load a library another is rewriting.
fn rustc_lib_cfg(src: &str, cfg: Option<&str>) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let key = format!("{src} {cfg:?}");
    if let Some(p) = built.get(&key) {
        return p.clone();
    }
    let out = compile_rustc_lib(src, cfg);
    built.insert(key, out.clone());
    out
}

fn compile_rustc_lib(src: &str, cfg: Option<&str>) -> PathBuf {
    let dir = target_dir().join("rustc");
    std::fs::create_dir_all(&dir).unwrap();
    let stem = cfg.map_or(src.to_string(), |c| format!("{src}_{c}"));
    let out = dir.join(dylib(&stem));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.args(["--crate-type", "cdylib", "--edition", "2024", "-o"])
        .arg(&out)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{src}.rs")));
    if let Some(c) = cfg {
        cmd.args(["--cfg", c]);
    }
    let st = cmd.status().expect("run rustc");
    assert!(st.success());
    out
}

/// `load_err` for a library that must fail, as the exact `loss plugin library PATH: REASON` message.
fn expect_load_error(path: &Path, reason: &str) {
    let path = path.canonicalize().unwrap();
    assert_eq!(
        load_err(&path),
        format!("loss plugin library {}: {reason}", path.display())
    );
}

fn load_err(path: &Path) -> String {
    match Registry::discover_with(&[path.to_path_buf()]) {
        Err(e) => e.to_string(),
        Ok(r) => panic!("loaded {}: {r:?}", path.display()),
    }
}

fn build(mode: f64, panic_new: f64) -> Result<LossFn, PluginError> {
    let r = Registry::discover_with(&[misbehave().to_path_buf()]).unwrap();
    let mut p = BTreeMap::new();
    p.insert("mode".to_string(), mode);
    p.insert("panic_new".to_string(), panic_new);
    r.build("misbehave", &p).map(|(f, _)| f)
}

fn stats(device: &Device) -> TokenStats {
    let mut s = TokenStats::from_loss(tensor_from_slice(&[0.5, 1.5, 2.5], device));
    s.position = Some(vec![3, 4, 7]);
    s.sample = Some(vec![0, 0, 2]);
    s.step = 5;
    s
}

#[test]
fn loads_and_passes_statistics() {
    let r = Registry::discover_with(&[misbehave().parent().unwrap().to_path_buf()]).unwrap();
    let src = r.source("misbehave").unwrap().to_string();
    assert!(src.ends_with(&dylib("misbehave")), "{src}");
    let LossFn::Token(p) = build(0.0, 0.0).unwrap() else {
        panic!()
    };
    let n = p.needs();
    assert!(n.position && n.sample && !n.entropy && !n.reference_loss);
    let d = Device::flex();
    let w = tensor_to_vec(p.try_weights(&stats(&d)).unwrap());
    assert_eq!(w, vec![5e6 + 3.0, 5e6 + 4.0, 5e6 + 2007.0]);
}

#[test]
fn weight_function_failures_name_the_plugin() {
    let d = Device::flex();
    for (mode, want) in [
        (1.0, "returned NaN for token 1"),
        (2.0, "returned weight -1 for token 0"),
        (3.0, "panicked: weight function exploded"),
    ] {
        let LossFn::Token(p) = build(mode, 0.0).unwrap() else {
            panic!()
        };
        let e = p.try_weights(&stats(&d)).unwrap_err();
        assert!(
            e.contains("external loss plugin `misbehave`") && e.contains(want),
            "{e}"
        );
    }
}

#[test]
fn constructor_rejects_or_panics() {
    let e = build(7.0, 0.0).unwrap_err().to_string();
    assert!(
        e.contains("`misbehave` rejected its parameters") && e.contains("`mode` = 7"),
        "{e}"
    );
    let e = build(0.0, 1.0).unwrap_err().to_string();
    assert!(
        e.contains("constructor panicked: constructor exploded"),
        "{e}"
    );
    // Host-side validation applies to external plugins too.
    let r = Registry::discover_with(&[misbehave().to_path_buf()]).unwrap();
    let mut p = BTreeMap::new();
    p.insert("mdoe".to_string(), 1.0);
    let e = r.build("misbehave", &p).unwrap_err().to_string();
    assert!(e.contains("did you mean `mode`"), "{e}");
}

#[test]
fn malformed_libraries() {
    let dir = target_dir().join("bogus");
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join(dylib("text"));
    std::fs::write(&text, "not a library").unwrap();
    let e = load_err(&text);
    assert!(
        e.contains("not a loadable shared library") && e.contains(&dylib("text")),
        "{e}"
    );

    let e = load_err(&rustc_lib("no_entry"));
    assert!(
        e.contains("exports no `ytrainer_plugin_entry` symbol"),
        "{e}"
    );

    let e = load_err(&rustc_lib("abi_mismatch"));
    assert!(
        e.contains("plugin ABI version 999") && e.contains("speaks versions 2 to 3"),
        "{e}"
    );

    let e = load_err(&dir.join("missing-dir"));
    assert!(e.contains("no such file or directory"), "{e}");
}

#[test]
fn name_clash_names_both_sources() {
    let dir = target_dir().join("clash");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(dylib("misbehave_copy"));
    std::fs::copy(misbehave(), &copy).unwrap();
    let e = Registry::discover_with(&[misbehave().to_path_buf(), copy.clone()]).unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("two loss plugins are named `misbehave`") && e.contains("misbehave_copy"),
        "{e}"
    );
    // The same file twice is loaded once.
    Registry::discover_with(&[misbehave().to_path_buf(), misbehave().to_path_buf()]).unwrap();
}

fn pair_plugin(mode: f64) -> Box<dyn ytrainer_core::loss::PairwiseObjective> {
    let r = Registry::discover_with(&[misbehave_pair().to_path_buf()]).unwrap();
    let mut p = BTreeMap::new();
    p.insert("mode".to_string(), mode);
    match r.build("misbehave-pair", &p).unwrap().0 {
        LossFn::Pairwise(o) => o,
        LossFn::Token(_) => panic!("a pairwise plugin must build a pairwise objective"),
    }
}

/// What the host passes to a pairwise plugin, and that the plugin's derivatives become the policy's gradients.
#[test]
fn pairwise_plugin_gets_the_statistics_and_its_derivatives_become_gradients() {
    let device = Device::flex().autodiff();
    let obj = pair_plugin(0.0);
    assert!(obj.needs_reference());
    let pc = tensor_from_slice(&[-1.0, -2.0], &device).require_grad();
    let pr = tensor_from_slice(&[-3.0, -4.0], &device).require_grad();
    let stats = PairStats {
        policy_chosen: pc.clone(),
        policy_rejected: pr.clone(),
        reference_chosen: Some(tensor_from_slice(&[-0.5, -0.25], &device)),
        reference_rejected: Some(tensor_from_slice(&[-0.125, 0.0], &device)),
        chosen_len: tensor_from_slice(&[3.0, 4.0], &device),
        rejected_len: tensor_from_slice(&[5.0, 6.0], &device),
        step: 2,
        progress: 0.25,
        desirable: None,
    };
    let (loss, w) = obj.try_loss(&stats).unwrap();
    assert!(w.is_none());
    let v = tensor_to_vec(loss.clone().detach().inner());
    // pc + 10 pr + 100 rc + 1000 rr + 1e4 len_c + 1e5 step
    let want0 = -1.0 - 30.0 - 50.0 - 125.0 + 30_000.0 + 200_000.0;
    let want1 = -2.0 - 40.0 - 25.0 + 0.0 + 40_000.0 + 200_000.0;
    assert_eq!(v, vec![want0 as f32, want1 as f32]);
    let grads = loss.sum().backward();
    assert_eq!(tensor_to_vec(pc.grad(&grads).unwrap()), vec![0.25, 0.25]);
    assert_eq!(tensor_to_vec(pr.grad(&grads).unwrap()), vec![-5.0, -6.0]);
}

#[test]
fn pairwise_plugin_failures_name_the_plugin() {
    let device = Device::flex();
    let stats = PairStats {
        policy_chosen: tensor_from_slice(&[-1.0, -2.0], &device),
        policy_rejected: tensor_from_slice(&[-3.0, -4.0], &device),
        reference_chosen: None,
        reference_rejected: None,
        chosen_len: tensor_from_slice(&[3.0, 4.0], &device),
        rejected_len: tensor_from_slice(&[5.0, 6.0], &device),
        step: 0,
        progress: 0.0,
        desirable: None,
    };
    let e = pair_plugin(1.0).try_loss(&stats).unwrap_err();
    assert!(
        e.contains("external loss plugin `misbehave-pair`")
            && e.contains("returned loss NaN for pair 1")
            && e.contains("must be finite"),
        "{e}"
    );
    let e = pair_plugin(2.0).try_loss(&stats).unwrap_err();
    assert!(
        e.contains("`misbehave-pair`") && e.contains("panicked: pair loss exploded"),
        "{e}"
    );
}

/// The exact messages for a version the host does not speak and for needs a version cannot express.
#[test]
fn unsupported_versions_and_needs_are_refused_with_exact_messages() {
    let v = env!("CARGO_PKG_VERSION");
    let rebuild =
        format!("rebuild the plugin against the ytrainer-plugin crate of this ytrainer ({v})");
    expect_load_error(
        &rustc_lib("abi_mismatch"),
        &format!(
            "plugin ABI version 999 is newer than this ytrainer, which speaks versions 2 to 3; update \
             ytrainer, or {rebuild}"
        ),
    );
    expect_load_error(
        &rustc_lib_cfg("abi_mismatch", Some("old")),
        &format!("plugin ABI version 1, but this ytrainer speaks versions 2 to 3; {rebuild}"),
    );
    expect_load_error(
        &rustc_lib_cfg("handwritten", Some("v2_top_k")),
        &format!(
            "the plugin asks for top-k entropy (needs bits 0x10), which ABI version 2 cannot express (it is \
             new in version 3); {rebuild}"
        ),
    );
    expect_load_error(
        &rustc_lib_cfg("handwritten", Some("v3_unknown_need")),
        &format!(
            "the plugin asks for unknown bits 0x20 (needs bits 0x20), which this ytrainer does not provide \
             (ABI version 3 knows 0x1f: entropy, position, sample, reference loss, top-k entropy); build the \
             plugin against the ytrainer-plugin crate of this ytrainer ({v})"
        ),
    );
    expect_load_error(
        &rustc_lib_cfg("handwritten", Some("v3_k1")),
        "the plugin asks for top-k entropy with k = 1; k must be at least 2 (`Needs { top_k_entropy: K, \
         ..Needs::NONE }` with K >= 2)",
    );
}

/// A plugin built against the version-2 SDK (here its raw vtable, written by hand) still loads and gets what it
/// asked for through the version-2 prefix of the batch.
#[test]
fn abi_v2_plugin_still_loads_and_works() {
    let lib = rustc_lib("handwritten");
    let r = Registry::discover_with(&[lib]).unwrap();
    let LossFn::Token(p) = r.build("handwritten", &BTreeMap::new()).unwrap().0 else {
        panic!("a token plugin")
    };
    let n = p.needs();
    assert!(n.entropy && n.position && !n.sample && !n.reference_loss);
    assert_eq!(n.top_k_entropy, 0);
    assert_eq!(
        p.default_normalize(),
        ytrainer_core::loss::Normalize::Tokens
    );
    let d = Device::flex();
    let mut s = stats(&d);
    s.entropy = Some(tensor_from_slice(&[0.25, 0.5, 0.75], &d));
    // Present in the statistics, but a version-2 plugin neither asks for it nor can read it.
    s.top_k_entropy = Some(tensor_from_slice(&[0.9, 0.9, 0.9], &d));
    let w = tensor_to_vec(p.try_weights(&s).unwrap());
    assert_eq!(w, vec![303.0, 406.5, 710.0]);
}

/// A version-3 plugin that asks for the top-k entropy receives exactly the values of `step::top_k_entropy`.
#[test]
fn abi_v3_plugin_gets_the_top_k_entropy_of_the_step() {
    use ytrainer_core::burn::tensor::activation::log_softmax;
    use ytrainer_core::step::{entropy, top_k_entropy};

    static LIB: OnceLock<PathBuf> = OnceLock::new();
    let lib = LIB.get_or_init(|| build_fixture("top-k-echo"));
    let r = Registry::discover_with(std::slice::from_ref(lib)).unwrap();
    let plugin = |mode: f64| {
        let mut p = BTreeMap::new();
        p.insert("mode".to_string(), mode);
        match r.build("top-k-echo", &p).unwrap().0 {
            LossFn::Token(p) => p,
            LossFn::Pairwise(_) => panic!("a token plugin"),
        }
    };
    let p = plugin(0.0);
    let n = p.needs();
    assert_eq!(n.top_k_entropy, 3);
    assert!(n.entropy && !n.position && !n.sample && !n.reference_loss);
    assert_eq!(n.describe(), "loss, entropy, top-3 entropy, step, progress");

    // Rows: the top 3 equally likely (normalised entropy 1), one token with nearly all the mass (about 0), and
    // something in between.
    let d = Device::flex();
    let logits: Vec<f32> = vec![
        2.0, 2.0, 2.0, -1.0, -3.0, //
        9.0, -9.0, -9.0, -9.0, -9.0, //
        1.0, 0.5, -0.25, 0.0, 0.75,
    ];
    let lp = log_softmax(
        Tensor::<2>::from_data(TensorData::new(logits, [3, 5]), &d),
        1,
    );
    let want = top_k_entropy(lp.clone(), 3);
    let want_v = tensor_to_vec(want.clone());
    assert!(
        (want_v[0] - 1.0).abs() < 1e-6 && want_v[1] < 1e-3 && want_v[2] > 0.5 && want_v[2] < 1.0
    );
    let mut s = TokenStats::from_loss(tensor_from_slice(&[0.5, 1.5, 2.5], &d));
    s.top_k_entropy = Some(want);
    s.entropy = Some(entropy(lp));
    let got = tensor_to_vec(p.try_weights(&s).unwrap());
    assert_eq!(got, want_v);
    // The full entropy travels beside it, unchanged.
    let got = tensor_to_vec(plugin(1.0).try_weights(&s).unwrap());
    assert_eq!(got, tensor_to_vec(s.entropy.clone().unwrap()));
}
