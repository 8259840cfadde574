//! GGUF import: dequantisation, the q/k un-permutation (round trip through a synthetic GGUF), bad input, and
//! parity of the real SmolLM2 Q4_1 file with transformers (per-token losses, top-5, greedy with KV cache).

mod common;

use std::path::{Path, PathBuf};

use burn::prelude::*;
use common::gguf_writer::*;
use common::*;
use ytrainer_models::generate::{Generator, Sampler, SamplingOptions, generate};
use ytrainer_models::gguf::{GgmlType, GgufFile, dequantize, hf_config};
use ytrainer_models::{AdapterSpec, HfConfig, ModelError, init_random, load_gguf, load_pretrained};

fn smollm() -> PathBuf {
    Path::new(ASSETS).join("smollm2-135m-instruct")
}

fn smollm_gguf() -> PathBuf {
    smollm().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// llama.cpp's permutation (the inverse of what the loader undoes): HF row `c*d/2 + j` -> GGUF row `2j + c`.
fn permute(values: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = values.len() / cols;
    let hd = rows / n_head;
    let mut out = vec![0.0; values.len()];
    for h in 0..n_head {
        for j in 0..hd / 2 {
            for c in 0..2 {
                let hf = h * hd + c * hd / 2 + j;
                let g = h * hd + 2 * j + c;
                out[g * cols..(g + 1) * cols].copy_from_slice(&values[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    out
}

fn tiny_llama_config() -> HfConfig {
    HfConfig::from_json_str(
        r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": false}"#,
    )
    .unwrap()
}

fn tiny_meta() -> Vec<(&'static str, Meta)> {
    vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.embedding_length", Meta::U32(32)),
        ("llama.feed_forward_length", Meta::U32(48)),
        ("llama.block_count", Meta::U32(2)),
        ("llama.attention.head_count", Meta::U32(4)),
        ("llama.attention.head_count_kv", Meta::U32(2)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("llama.rope.freq_base", Meta::F32(10000.0)),
        ("llama.vocab_size", Meta::U32(64)),
    ]
}

/// A random tiny Llama saved as HF, and the same weights as an F32 GGUF written the way llama.cpp does.
fn tiny_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let device = Device::flex();
    let config = tiny_llama_config();
    let model = init_random(&config, 7, &AdapterSpec::Full, &device).unwrap();
    let hf_dir = dir.join("hf");
    ytrainer_models::save_hf_checkpoint(&model, &config, &hf_dir).unwrap();
    let mut reader =
        ytrainer_models::st::SafetensorsReader::open(&hf_dir.join("model.safetensors")).unwrap();
    let names: Vec<String> = reader.names().map(str::to_string).collect();
    let mut tensors = Vec::new();
    for name in names {
        let shape = reader.shape(&name).unwrap().to_vec();
        let mut values = reader.read_f32(&name, &shape).unwrap();
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        if name.ends_with("q_proj.weight") {
            values = permute(&values, 4, cols);
        } else if name.ends_with("k_proj.weight") {
            values = permute(&values, 2, cols);
        }
        let g = ytrainer_models::gguf::gguf_name(&name).unwrap();
        tensors.push(f32_tensor(&g, shape, &values));
    }
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, gguf_bytes(&tiny_meta(), &tensors)).unwrap();
    (hf_dir, path)
}

fn logits(model: &ytrainer_models::Decoder, ids: &[i64]) -> Vec<f32> {
    let device = Device::flex();
    let input = plain_input(ids, 1, ids.len(), &device);
    to_vec(model.forward(&input))
}

#[test]
fn synthetic_gguf_round_trips_with_unpermuted_qk() {
    let dir = temp_dir("gguf-roundtrip");
    let (hf_dir, gguf) = tiny_pair(&dir);
    let device = Device::flex();
    let (a, _) = load_pretrained(&hf_dir, &AdapterSpec::Full, &device).unwrap();
    let (b, cfg) = load_gguf(&gguf, &AdapterSpec::Full, &device).unwrap();
    assert_eq!(cfg.model_type, "llama");
    assert!(!cfg.tie_word_embeddings());
    let ids = [1, 5, 9, 33, 2, 60, 7];
    let diff = max_abs_diff(&logits(&a, &ids), &logits(&b, &ids));
    assert!(diff < 1e-5, "GGUF-loaded logits differ by {diff}");
    // convert -> HF dir -> reload: equal.
    let out = dir.join("converted");
    let report = ytrainer_models::convert_gguf(&gguf, &out).unwrap();
    assert!(out.join("config.json").is_file() && out.join("model.safetensors").is_file());
    assert!(report.warnings.iter().any(|w| w.contains("tokenizer")));
    let (c, _) = load_pretrained(&out, &AdapterSpec::Full, &device).unwrap();
    assert_eq!(logits(&b, &ids), logits(&c, &ids));
    let _ = std::fs::remove_dir_all(&dir);
}

fn expect_gguf_err(r: Result<impl std::fmt::Debug, ModelError>, needles: &[&str]) {
    let e = r.expect_err("expected an error").to_string();
    for n in needles {
        assert!(e.contains(n), "error {e:?} lacks {n:?}");
    }
}

#[test]
fn bad_gguf_files_give_clear_errors() {
    let dir = temp_dir("gguf-bad");
    let (_, good) = tiny_pair(&dir);
    let bytes = std::fs::read(&good).unwrap();
    let device = Device::flex();

    let p = dir.join("magic.gguf");
    std::fs::write(&p, b"GGML\x03\0\0\0rest of a file").unwrap();
    expect_gguf_err(GgufFile::open(&p), &["not a GGUF file"]);

    let p = dir.join("empty.gguf");
    std::fs::write(&p, b"GG").unwrap();
    expect_gguf_err(GgufFile::open(&p), &["truncated"]);

    for cut in [40, bytes.len() / 3, bytes.len() - 100] {
        let p = dir.join(format!("trunc{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        expect_gguf_err(load_gguf(&p, &AdapterSpec::Full, &device), &["truncated"]);
    }

    // Unknown quant type: IQ2_XS (17) on one tensor.
    let mut meta = tiny_meta();
    meta.push(("general.name", Meta::Str("x".into())));
    let tensors = vec![Tensor_ {
        name: "token_embd.weight".into(),
        shape: vec![64, 32],
        ty: 17,
        data: vec![0; 64],
    }];
    let p = dir.join("quant.gguf");
    std::fs::write(&p, gguf_bytes(&meta, &tensors)).unwrap();
    expect_gguf_err(
        load_gguf(&p, &AdapterSpec::Full, &device),
        &["token_embd.weight", "IQ2_XS"],
    );
    expect_gguf_err(
        ytrainer_models::convert_gguf(&p, &dir.join("out-quant")),
        &["token_embd.weight", "IQ2_XS"],
    );

    // Shape mismatch between metadata and weights: hidden size 32 in the tensors, 16 in the metadata.
    let mut meta = tiny_meta();
    meta[1] = ("llama.embedding_length", Meta::U32(16));
    let tensors = vec![f32_tensor(
        "token_embd.weight",
        vec![64, 32],
        &vec![0.0; 64 * 32],
    )];
    let p = dir.join("shape.gguf");
    std::fs::write(&p, gguf_bytes(&meta, &tensors)).unwrap();
    expect_gguf_err(
        load_gguf(&p, &AdapterSpec::Full, &device),
        &["token_embd.weight", "expected shape [64, 16]", "[64, 32]"],
    );

    // Unsupported architecture.
    let mut meta = tiny_meta();
    meta[0] = ("general.architecture", Meta::Str("gemma2".into()));
    let p = dir.join("arch.gguf");
    std::fs::write(&p, gguf_bytes(&meta, &[])).unwrap();
    expect_gguf_err(
        load_gguf(&p, &AdapterSpec::Full, &device),
        &["gemma2", "not supported"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dequantisation_of_block_formats() {
    let d = half::f16::from_f32(0.5).to_le_bytes();
    let m = half::f16::from_f32(-1.0).to_le_bytes();
    // Q8_0: x = d * q.
    let mut b = d.to_vec();
    b.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let want: Vec<f32> = (0..32).map(|i| 0.5 * (i as f32 - 16.0)).collect();
    assert_eq!(dequantize(GgmlType::Q8_0, &b, 32), want);
    // Q4_0: low nibbles first, then high, minus 8.
    let mut b = d.to_vec();
    b.extend((0..16).map(|j| (j as u8) | (((15 - j) as u8) << 4)));
    let mut want: Vec<f32> = (0..16).map(|j| 0.5 * (j as f32 - 8.0)).collect();
    want.extend((0..16).map(|j| 0.5 * ((15 - j) as f32 - 8.0)));
    assert_eq!(dequantize(GgmlType::Q4_0, &b, 32), want);
    // Q4_1: d * q + m.
    let mut b = d.to_vec();
    b.extend(m);
    b.extend((0..16).map(|j| (j as u8) | (((15 - j) as u8) << 4)));
    let mut want: Vec<f32> = (0..16).map(|j| 0.5 * j as f32 - 1.0).collect();
    want.extend((0..16).map(|j| 0.5 * (15 - j) as f32 - 1.0));
    assert_eq!(dequantize(GgmlType::Q4_1, &b, 32), want);
    // F16 / BF16.
    let b: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    assert_eq!(dequantize(GgmlType::F16, &b, 2), [1.5, -2.0]);
    let b: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    assert_eq!(dequantize(GgmlType::BF16, &b, 2), [1.5, -2.0]);
    // Q5_0: the fifth bit comes from qh; minus 16.
    let mut b = d.to_vec();
    b.extend(0xFFFF_0000u32.to_le_bytes()); // high bit set for values 16..32
    b.extend([0x21u8; 16]); // low nibble 1, high nibble 2
    let mut want = vec![0.5 * (1.0 - 16.0); 16];
    want.extend(vec![0.5 * (2.0 + 16.0 - 16.0); 16]);
    assert_eq!(dequantize(GgmlType::Q5_0, &b, 32), want);
}

/// Every block format against llama.cpp's own reference: `quants.gguf` was written by the `gguf` Python package
/// (random blocks, one tensor per type) and `quants.expected.json` holds that package's dequantisation
/// (`scripts/make_quant_fixture.py`).
#[test]
fn block_formats_match_gguf_py_reference_on_a_file_it_wrote() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let gguf = GgufFile::open(&dir.join("quants.gguf")).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("quants.expected.json")).unwrap())
            .unwrap();
    let expected = expected.as_object().unwrap();
    let mut seen = Vec::new();
    for (name, want) in expected {
        let t = gguf
            .tensor(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(t.ty.name(), want["type"].as_str().unwrap(), "{name}");
        let shape: Vec<usize> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape(), shape, "{name}");
        let got = gguf.read_f32(t).unwrap();
        let want: Vec<f32> = want["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "{name}[{i}]: {g} vs gguf-py {w}"
            );
        }
        seen.push(t.ty.name());
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"
        ]
    );
}

#[test]
fn smollm2_gguf_metadata_matches_transformers_config() {
    let gguf = GgufFile::open(&smollm_gguf()).unwrap();
    let ours = hf_config(&gguf).unwrap();
    let theirs = HfConfig::from_file(&smollm().join("config.json")).unwrap();
    assert_eq!(ours.model_type, theirs.model_type);
    assert_eq!(ours.vocab_size, theirs.vocab_size);
    assert_eq!(ours.hidden_size, theirs.hidden_size);
    assert_eq!(ours.intermediate_size, theirs.intermediate_size);
    assert_eq!(ours.num_hidden_layers, theirs.num_hidden_layers);
    assert_eq!(ours.num_attention_heads, theirs.num_attention_heads);
    assert_eq!(ours.num_kv_heads(), theirs.num_kv_heads());
    assert_eq!(ours.head_dim, theirs.head_dim);
    assert_eq!(ours.rms_norm_eps, theirs.rms_norm_eps);
    assert_eq!(ours.rope().unwrap(), theirs.rope().unwrap());
    assert_eq!(ours.tie_word_embeddings(), theirs.tie_word_embeddings());
    assert_eq!(ours.max_position_embeddings, theirs.max_position_embeddings);
    assert_eq!(ours.bos_token_id, theirs.bos_token_id);
    assert_eq!(ours.eos_token_ids(), theirs.eos_token_ids());
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(smollm().join("reference.json")).unwrap())
        .unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn smollm2_gguf_matches_transformers_losses_top5_and_greedy() {
    let device = Device::flex();
    let t0 = std::time::Instant::now();
    let (model, _) = load_gguf(&smollm_gguf(), &AdapterSpec::Full, &device).unwrap();
    println!("import: {:.2}s", t0.elapsed().as_secs_f64());
    let r = reference();
    let mut max_diff = 0f32;
    let mut sum = 0f64;
    let mut n = 0usize;
    for (b, ids) in r["input_ids"].as_array().unwrap().iter().enumerate() {
        let ids: Vec<i64> = ids_of(ids).iter().map(|&x| x as i64).collect();
        let t = ids.len();
        let lg = logits(&model, &ids); // [t, V]
        let v = lg.len() / t;
        for p in 0..t - 1 {
            let row = &lg[p * v..(p + 1) * v];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
            let loss = lse - row[ids[p + 1] as usize];
            let want = r["loss_per_token"][b][p].as_f64().unwrap() as f32;
            max_diff = max_diff.max((loss - want).abs());
            sum += loss as f64;
            n += 1;
            let mut order: Vec<usize> = (0..v).collect();
            order.sort_by(|&i, &j| row[j].total_cmp(&row[i]));
            let top5: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
            assert_eq!(top5, ids_of(&r["top5_ids"][b][p]), "top-5 at [{b}, {p}]");
        }
    }
    let mean = sum / n as f64;
    println!(
        "per-token loss max abs diff {max_diff:e}; mean loss {mean} (transformers {})",
        r["mean_loss"]
    );
    assert!(max_diff <= 2e-3, "per-token losses differ by {max_diff}");
    assert!((mean - r["mean_loss"].as_f64().unwrap()).abs() <= 1e-3);

    // KV-cached step logits equal the full forward's.
    let ids = ids_of(&r["input_ids"][0]);
    let full = logits(&model, &ids.iter().map(|&x| x as i64).collect::<Vec<_>>());
    let v = full.len() / ids.len();
    let mut g = Generator::new(&model);
    let mut cached = g.prefill(&ids[..5]);
    let mut worst = max_abs_diff(&cached, &full[4 * v..5 * v]);
    for (p, &id) in ids.iter().enumerate().skip(5) {
        cached = g.step(id);
        worst = worst.max(max_abs_diff(&cached, &full[p * v..(p + 1) * v]));
    }
    println!("KV cache vs full forward: max abs logit diff {worst:e}");
    assert!(worst < 1e-3, "KV-cached logits differ by {worst}");

    // Greedy generation reproduces transformers token for token (the shortest recorded case keeps this fast).
    let case = &r["greedy"]["chat:What is the capital of France?"];
    let prompt = ids_of(&case["prompt_ids"]);
    let want = ids_of(&case["output_ids"]);
    let mut sampler = Sampler::new(SamplingOptions::default());
    let out = generate(
        &model,
        &prompt,
        want.len() - prompt.len(),
        &[2],
        &mut sampler,
        |_| {},
    );
    assert_eq!(out, want[prompt.len()..].to_vec());
}
