//! PEFT compatibility without PyTorch: adapters that PEFT 0.21.2 itself made and saved on tiny-qwen2 (plain LoRA,
//! rsLoRA, DoRA, modules_to_save, DoRA + modules_to_save, modules_to_save with `ensure_weight_tying`), with
//! non-zero, perturbed A / B / magnitudes / embeddings, and PEFT's per-token CE on fixed token ids for the adapter
//! model and after `merge_and_unload()` (`tests/fixtures/peft/`, written by `scripts/make_peft_oracles.py`). Each
//! is loaded by `ytrainer score --adapter`, merged by `ytrainer merge`, and continued by a one-step run
//! (`adapter.init_from`) whose exported adapter must hold PEFT's tensors unchanged.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use ytrainer_models::st::{PendingTensor, SafetensorsReader, write_f32};

/// Per-token CE agreement with PEFT.
const TOL: f64 = 1e-4;
/// tiny-qwen2's embedding matrix.
const VOCAB: usize = 8192;
const HIDDEN: usize = 256;

fn fixtures() -> PathBuf {
    root().join("tests/fixtures/peft")
}

fn base() -> PathBuf {
    assets().join("tiny-qwen2")
}

fn ids_json() -> PathBuf {
    fixtures().join("ids.json")
}

fn oracle(variant: &str) -> Value {
    let p = fixtures().join(variant).join("oracle.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn rows(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

/// `ytrainer score` of the fixture ids, per row and token.
fn score(model: &Path, adapter: Option<&Path>, out: &Path) -> Vec<Vec<f64>> {
    let (model, ids, out_s) = (s(model), s(&ids_json()), s(out));
    let mut args = vec![
        "score",
        "--model",
        &model,
        "--ids-json",
        &ids,
        "--out",
        &out_s,
    ];
    let adapter = adapter.map(s);
    if let Some(a) = &adapter {
        args.extend(["--adapter", a]);
    }
    ytrainer_ok(&args);
    jsonl(out)
        .iter()
        .map(|l| {
            l["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["loss"].as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f64::max)
}

/// The variant's adapter directory as PEFT saved it: the fixture itself, or, for the modules_to_save variants,
/// PEFT's `adapter_model.safetensors` rebuilt in `tmp` from its LoRA tensors, the base's embedding matrix and
/// the rows the generator changed (the script checked every other row equals the base's bit for bit).
fn adapter(variant: &str, tmp: &Path) -> PathBuf {
    let dir = fixtures().join(variant);
    if dir.join("adapter_model.safetensors").is_file() {
        return dir;
    }
    let out = tmp.join(variant);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(
        dir.join("adapter_config.json"),
        out.join("adapter_config.json"),
    )
    .unwrap();
    let mut lora = SafetensorsReader::open(&dir.join("adapter_model.lora.safetensors")).unwrap();
    let names: Vec<String> = lora.names().map(str::to_string).collect();
    let mut tensors = Vec::new();
    for name in names {
        let shape = lora.shape(&name).unwrap().to_vec();
        let values = lora.read_f32(&name, &shape).unwrap();
        tensors.push(PendingTensor::new(name, shape, move || values));
    }
    let embed = SafetensorsReader::open(&base().join("model.safetensors"))
        .unwrap()
        .read_f32("model.embed_tokens.weight", &[VOCAB, HIDDEN])
        .unwrap();
    let mut changed = SafetensorsReader::open(&dir.join("vocab_rows.safetensors")).unwrap();
    let vocab_rows = oracle(variant)["vocab_rows"].as_object().unwrap().clone();
    assert_eq!(vocab_rows.len(), 2, "{variant}: embed_tokens and lm_head");
    for (name, idx) in vocab_rows {
        let idx: Vec<usize> = idx
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let values = changed.read_f32(&name, &[idx.len(), HIDDEN]).unwrap();
        let mut full = embed.clone();
        for (k, &r) in idx.iter().enumerate() {
            full[r * HIDDEN..(r + 1) * HIDDEN]
                .copy_from_slice(&values[k * HIDDEN..(k + 1) * HIDDEN]);
        }
        tensors.push(PendingTensor::new(name, vec![VOCAB, HIDDEN], move || full));
    }
    write_f32(&out.join("adapter_model.safetensors"), tensors).unwrap();
    out
}

/// Every tensor of an adapter file by name, with its shape and values.
fn tensors(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut r = SafetensorsReader::open(&dir.join("adapter_model.safetensors")).unwrap();
    let mut names: Vec<String> = r.names().map(str::to_string).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let shape = r.shape(&n).unwrap().to_vec();
            let values = r.read_f32(&n, &shape).unwrap();
            (n, shape, values)
        })
        .collect()
}

fn config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
        .unwrap()
}

/// A set-valued config field (PEFT writes `target_modules` in hash order) as a sorted list.
fn sorted(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

/// One variant: `ytrainer score --adapter` against PEFT's CE, `ytrainer merge` + score against PEFT's
/// `merge_and_unload()` CE, and a one-step continued run whose exported adapter is PEFT's, unchanged.
fn check(variant: &str) {
    let tmp = TempDir::new(&format!("peft-{variant}"));
    let o = oracle(variant);
    let (theirs, merged_theirs, base_loss) = (
        rows(&o["loss"]),
        rows(&o["merged_loss"]),
        rows(&o["base_loss"]),
    );
    // The fixture is not trivial: the adapter moves PEFT's losses well beyond the tolerance.
    let moved = max_diff(&theirs, &base_loss);
    assert!(
        moved > 0.1,
        "{variant}: PEFT's adapter moved the loss by only {moved}"
    );
    let dir = adapter(variant, tmp.path());

    let ours = score(&base(), Some(&dir), &tmp.path().join("scores.jsonl"));
    let d = max_diff(&ours, &theirs);
    println!(
        "{variant}: ytrainer score --adapter vs PEFT: max |CE diff| {d:e} (moved from base {moved:.4})"
    );
    assert!(d <= TOL, "{variant}: {d} > {TOL}");

    let merged = tmp.path().join("merged");
    ytrainer_ok(&[
        "merge",
        "--model",
        &s(&base()),
        "--adapter",
        &s(&dir),
        "--out",
        &s(&merged),
    ]);
    let dm = max_diff(
        &score(&merged, None, &tmp.path().join("merged.jsonl")),
        &merged_theirs,
    );
    println!("{variant}: ytrainer merge vs PEFT merge_and_unload: max |CE diff| {dm:e}");
    assert!(dm <= TOL, "{variant}: merged {dm} > {TOL}");

    // Continue training from PEFT's adapter for one step at a learning rate of 1e-30: the exported adapter must be
    // PEFT's, tensor for tensor, with the same configuration. AdamW's first step moves a value by at most the
    // learning rate, below the resolution of every value but exact zeros (tiny-qwen2's padding row).
    let run = tmp.path().join("run");
    ytrainer_ok(&[
        "run",
        "--model",
        &s(&base()),
        "--data",
        &s(&root().join("examples/quickstart/train.jsonl")),
        "--max-steps",
        "1",
        "--max-seq-len",
        "64",
        "--tokens-per-step",
        "128",
        "--learning-rate",
        "1e-30",
        "--set",
        "eval.max_samples=4",
        "--set",
        &format!("adapter.init_from=\"{}\"", s(&dir)),
        "--output-dir",
        &s(&run),
    ]);
    let saved = run.join("final");
    let (want, got) = (tensors(&dir), tensors(&saved));
    assert_eq!(
        got.iter().map(|t| (&t.0, &t.1)).collect::<Vec<_>>(),
        want.iter().map(|t| (&t.0, &t.1)).collect::<Vec<_>>(),
        "{variant}: the exported adapter's tensor names and shapes are PEFT's"
    );
    for (g, w) in got.iter().zip(&want) {
        let d =
            g.2.iter()
                .zip(&w.2)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
        assert!(d <= 1e-29, "{variant}: {} changed by {d}", g.0);
    }
    let (cw, cg) = (config(&dir), config(&saved));
    for key in [
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "use_dora",
    ] {
        assert_eq!(cg[key], cw[key], "{variant}: adapter_config.json `{key}`");
    }
    assert_eq!(sorted(&cg["target_modules"]), sorted(&cw["target_modules"]));
    if cw["modules_to_save"].is_null() {
        assert!(cg["modules_to_save"].is_null(), "{variant}: {cg}");
    } else if cw["ensure_weight_tying"] == true {
        // PEFT lists the tied matrix as ["embed_tokens", "model.embed_tokens"]; ytrainer writes it as both
        // modules (each with the same matrix, which PEFT without `ensure_weight_tying` computes alike).
        assert_eq!(sorted(&cg["modules_to_save"]), ["embed_tokens", "lm_head"]);
    } else {
        assert_eq!(
            sorted(&cg["modules_to_save"]),
            sorted(&cw["modules_to_save"])
        );
    }
    let again = score(&base(), Some(&saved), &tmp.path().join("again.jsonl"));
    let dr = max_diff(&again, &theirs);
    println!("{variant}: exported again by ytrainer, scored: max |CE diff| vs PEFT {dr:e}");
    assert!(dr <= TOL, "{variant}: round trip {dr} > {TOL}");
}

#[test]
fn base_model_scores_like_transformers() {
    let tmp = TempDir::new("peft-base");
    let ours = score(&base(), None, &tmp.path().join("base.jsonl"));
    let d = max_diff(&ours, &rows(&oracle("lora")["base_loss"]));
    println!("base: ytrainer score vs transformers: max |CE diff| {d:e}");
    assert!(d <= TOL, "{d}");
}

#[test]
fn peft_lora() {
    check("lora");
}

#[test]
fn peft_rslora() {
    check("rslora");
}

#[test]
fn peft_dora() {
    check("dora");
}

#[test]
fn peft_modules_to_save() {
    check("modules_to_save");
}

#[test]
fn peft_dora_modules_to_save() {
    check("dora_modules_to_save");
}

/// PEFT's `ensure_weight_tying` on the tied model: one matrix under both names, listed as the embeddings only.
#[test]
fn peft_modules_to_save_tied() {
    check("modules_to_save_tied");
}

/// The rsLoRA fixture read as plain LoRA (`use_rslora` flipped off) is far from PEFT's losses: the comparison
/// above can tell the two scalings apart (here `alpha / r` = 1.5 instead of `alpha / sqrt(r)` = 3).
#[test]
fn rslora_flag_matters() {
    let tmp = TempDir::new("peft-rslora-off");
    let dir = tmp.path().join("plain");
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("rslora");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg = config(&src);
    assert_eq!(cfg["use_rslora"], true);
    cfg["use_rslora"] = false.into();
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let off = score(&base(), Some(&dir), &tmp.path().join("off.jsonl"));
    let d = max_diff(&off, &rows(&oracle("rslora")["loss"]));
    println!("rsLoRA fixture read with use_rslora = false: max |CE diff| vs PEFT {d:e}");
    assert!(d > 100.0 * TOL, "{d}");
}
