//! Training LoRA on a base kept quantised (QLoRA): the quantised-base forward pass and every LoRA gradient equal
//! the dequantised-f32 path (the same weights, only the summation order may differ), on a generated GGUF with
//! every supported block type and on the real SmolLM2 Q4_1 file; quantise-on-load; and the errors.

mod common;

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::prelude::*;
use common::gguf_writer::*;
use common::*;
use ytrainer_kernels::quant::QuantKind;
use ytrainer_models::{
    AdapterSpec, BaseWeights, Decoder, LoraConfig, init_random, load_gguf_with,
    load_pretrained_with,
};

fn smollm_gguf() -> PathBuf {
    Path::new(ASSETS).join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A deterministic stream in [0, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
    fn byte(&mut self) -> u8 {
        (self.next() * 256.0) as u8
    }
}

/// `n` values of `kind` as random blocks whose f16 scales are set to magnitudes that give weights of ~0.05.
fn random_blocks(kind: QuantKind, n: usize, rng: &mut Rng) -> Vec<u8> {
    let (bs, bb) = kind.block();
    let f16 = |scale: f32, rng: &mut Rng| {
        half::f16::from_f32(scale * (0.5 + rng.next()))
            .to_le_bytes()
            .to_vec()
    };
    let mut out = Vec::with_capacity(n / bs * bb);
    for _ in 0..n / bs {
        let mut b: Vec<u8> = (0..bb).map(|_| rng.byte()).collect();
        // (offset of an f16 field, its scale)
        let fields: &[(usize, f32)] = match kind {
            QuantKind::F16 => &[(0, 0.05)],
            QuantKind::Bf16 => &[],
            QuantKind::Q4_0 | QuantKind::Q5_0 => &[(0, 0.008)],
            QuantKind::Q4_1 | QuantKind::Q5_1 => &[(0, 0.008), (2, -0.06)],
            QuantKind::Q8_0 => &[(0, 0.0005)],
            QuantKind::Q4K | QuantKind::Q5K => &[(0, 0.0002), (2, 0.0002)],
            QuantKind::Q6K => &[(208, 0.00003)],
            QuantKind::Nf4 => unreachable!("not a GGUF type"),
        };
        for &(at, scale) in fields {
            b[at..at + 2].copy_from_slice(&f16(scale, rng));
        }
        if kind == QuantKind::Bf16 {
            b = half::bf16::from_f32(0.1 * (rng.next() - 0.5))
                .to_le_bytes()
                .to_vec();
        }
        if kind == QuantKind::F16 {
            b = half::f16::from_f32(0.1 * (rng.next() - 0.5))
                .to_le_bytes()
                .to_vec();
        }
        out.extend(b);
    }
    out
}

const KINDS: [[QuantKind; 7]; 2] = [
    [
        QuantKind::F16,
        QuantKind::Bf16,
        QuantKind::Q4_0,
        QuantKind::Q4_1,
        QuantKind::Q5_0,
        QuantKind::Q5_1,
        QuantKind::Q8_0,
    ],
    [
        QuantKind::Q4K,
        QuantKind::Q5K,
        QuantKind::Q6K,
        QuantKind::Q4_0,
        QuantKind::Q4K,
        QuantKind::Q6K,
        QuantKind::Q5K,
    ],
];

/// A two-layer Llama (hidden 256, so every block size divides a row) whose 14 projections use every block type
/// ytrainer supports; embeddings, head and norms are F32. `odd` replaces one projection's type with `odd`.
fn every_type_gguf(dir: &Path, odd: Option<u32>) -> PathBuf {
    let (h, i, v, hd) = (256usize, 512usize, 64usize, 64usize);
    let (q, kv) = (4 * hd, 2 * hd);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let f32s = |n: usize, scale: f32, rng: &mut Rng| -> Vec<f32> {
        (0..n).map(|_| scale * (rng.next() - 0.5)).collect()
    };
    let mut tensors = vec![
        f32_tensor("token_embd.weight", vec![v, h], &f32s(v * h, 0.2, &mut rng)),
        f32_tensor("output.weight", vec![v, h], &f32s(v * h, 0.2, &mut rng)),
        f32_tensor("output_norm.weight", vec![h], &vec![1.0; h]),
    ];
    for (l, kinds) in KINDS.iter().enumerate() {
        let shapes = [
            ("attn_q", q, h),
            ("attn_k", kv, h),
            ("attn_v", kv, h),
            ("attn_output", h, q),
            ("ffn_gate", i, h),
            ("ffn_up", i, h),
            ("ffn_down", h, i),
        ];
        for (j, ((name, rows, cols), kind)) in shapes.iter().zip(kinds).enumerate() {
            let (ty, data) = match odd.filter(|_| l == 0 && j == 2) {
                Some(ty) => (ty, vec![0u8; rows * cols]),
                None => (
                    kind.ggml().unwrap(),
                    random_blocks(*kind, rows * cols, &mut rng),
                ),
            };
            tensors.push(Tensor_ {
                name: format!("blk.{l}.{name}.weight"),
                shape: vec![*rows, *cols],
                ty,
                data,
            });
        }
        for norm in ["attn_norm", "ffn_norm"] {
            let w: Vec<f32> = (0..h).map(|_| 0.8 + 0.4 * rng.next()).collect();
            tensors.push(f32_tensor(&format!("blk.{l}.{norm}.weight"), vec![h], &w));
        }
    }
    let meta = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.embedding_length", Meta::U32(h as u32)),
        ("llama.feed_forward_length", Meta::U32(i as u32)),
        ("llama.block_count", Meta::U32(2)),
        ("llama.attention.head_count", Meta::U32(4)),
        ("llama.attention.head_count_kv", Meta::U32(2)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("llama.rope.freq_base", Meta::F32(10000.0)),
        ("llama.vocab_size", Meta::U32(v as u32)),
    ];
    let path = dir.join(format!("every-type-{}.gguf", odd.unwrap_or(0)));
    std::fs::write(&path, gguf_bytes(&meta, &tensors)).unwrap();
    path
}

fn lora() -> AdapterSpec {
    AdapterSpec::Lora(LoraConfig {
        r: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    })
}

/// Gives every LoRA `B` deterministic non-zero values (a fresh adapter has `B = 0`, which would leave `dA = 0`
/// and the base's input gradient untested through the adapter).
fn with_random_b(model: Decoder, device: &Device) -> Decoder {
    model
        .try_map_linears(|name, mut lin| {
            if let Some(b) = &lin.lora_b {
                let [r, out] = b.val().dims();
                let mut rng = Rng(name.bytes().fold(7u64, |h, c| h * 31 + c as u64) | 1);
                let vals: Vec<f32> = (0..r * out).map(|_| 0.2 * (rng.next() - 0.5)).collect();
                lin.lora_b = Some(Param::from_tensor(Tensor::from_data(
                    TensorData::new(vals, [r, out]),
                    device,
                )));
            }
            Ok::<_, ()>(lin)
        })
        .unwrap()
}

/// Mean next-token CE, the logits and every LoRA gradient (by path).
fn run(model: &Decoder, ids: &[i64], t: usize) -> (f32, Vec<f32>, Grads) {
    let device = Device::flex().autodiff();
    let b = ids.len() / t;
    let input = plain_input(ids, b, t, &device);
    let logits = model.forward(&input);
    let ce = per_token_ce(logits.clone(), &input.input_ids).mean();
    let loss = to_vec(ce.clone())[0];
    let grads = ce.backward();
    (loss, to_vec(logits), grads_by_path(model, &grads))
}

type Grads = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Relative difference: max |a - b| over max |b|.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    max_abs_diff(a, b) / scale
}

fn assert_same(f32_base: (f32, Vec<f32>, Grads), quant: (f32, Vec<f32>, Grads), what: &str) {
    let (loss_f, logits_f, grads_f) = f32_base;
    let (loss_q, logits_q, grads_q) = quant;
    assert!(
        ((loss_q - loss_f) / loss_f).abs() <= 1e-5,
        "{what}: loss {loss_q} vs {loss_f}"
    );
    assert!(
        rel(&logits_q, &logits_f) <= 1e-5,
        "{what}: logits differ by {}",
        rel(&logits_q, &logits_f)
    );
    assert_eq!(
        grads_f.keys().collect::<Vec<_>>(),
        grads_q.keys().collect::<Vec<_>>(),
        "{what}: the same parameters get gradients"
    );
    assert!(
        grads_f.keys().all(|k| k.contains("lora_")),
        "{what}: only LoRA is trained"
    );
    let mut worst = 0f32;
    for (k, (_, gf)) in &grads_f {
        let d = rel(&grads_q[k].1, gf);
        assert!(
            d <= 1e-5,
            "{what}: gradient of {k} differs by {d} (relative)"
        );
        worst = worst.max(d);
    }
    println!(
        "{what}: loss {loss_q} vs {loss_f}, {} LoRA gradients, worst relative difference {worst:e}",
        grads_f.len()
    );
}

#[test]
fn every_block_type_gives_the_f32_base_forward_and_lora_gradients() {
    let dir = temp_dir("qlora-every-type");
    let path = every_type_gguf(&dir, None);
    let device = Device::flex().autodiff();
    let (f32_model, _) = load_gguf_with(&path, &lora(), &device, BaseWeights::F32).unwrap();
    let (q_model, _) = load_gguf_with(&path, &lora(), &device, BaseWeights::Stored).unwrap();
    let kinds: Vec<QuantKind> = q_model
        .named_linears()
        .iter()
        .map(|(n, l)| l.quant.as_ref().unwrap_or_else(|| panic!("{n} dense")).kind)
        .collect();
    assert_eq!(kinds, KINDS.concat());
    assert!(
        f32_model
            .named_linears()
            .iter()
            .all(|(_, l)| l.quant.is_none())
    );
    // The CPU backend takes the fused tile-by-tile operation (not the per-layer dequantised fallback).
    let x = Tensor::<2>::ones([3, 256], &device).require_grad();
    let (_, l0) = &q_model.named_linears()[0];
    let fused =
        ytrainer_kernels::quant_linear::quant_linear(&x, l0.quant.as_ref().unwrap(), None, None);
    assert!(fused.is_some());
    let (f32_model, q_model) = (
        with_random_b(f32_model, &device),
        with_random_b(q_model, &device),
    );
    let ids: Vec<i64> = (0..48).map(|i| (i * 37 + 11) % 64).collect();
    assert_same(
        run(&f32_model, &ids, 24),
        run(&q_model, &ids, 24),
        "every type",
    );

    // The merged export dequantises the same weights.
    for ((n, lf), (_, lq)) in f32_model
        .named_linears()
        .iter()
        .zip(q_model.named_linears())
    {
        let (a, b) = (to_vec(lf.merged_weight()), to_vec(lq.merged_weight()));
        assert!(rel(&b, &a) <= 1e-6, "{n}: merged weights differ");
    }
}

#[test]
fn smollm2_q4_1_quantised_base_equals_its_f32_import() {
    let device = Device::flex().autodiff();
    let (f32_model, _) =
        load_gguf_with(&smollm_gguf(), &lora(), &device, BaseWeights::F32).unwrap();
    let (q_model, _) =
        load_gguf_with(&smollm_gguf(), &lora(), &device, BaseWeights::Stored).unwrap();
    let held: usize = q_model
        .named_linears()
        .iter()
        .map(|(_, l)| l.quant.as_ref().map_or(0, |q| q.encoded_len()))
        .sum();
    // Exactly the projections' bytes in the file: nothing was dequantised or copied beyond the q/k row order.
    let gguf = ytrainer_models::gguf::GgufFile::open(&smollm_gguf()).unwrap();
    let in_file: usize = gguf
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("blk.") && t.dims.len() == 2)
        .map(|t| {
            QuantKind::from_ggml(t.ty.0)
                .unwrap()
                .bytes_for(t.num_elements() as usize)
        })
        .sum();
    assert_eq!(held, in_file);
    let f32_bytes: usize = f32_model
        .named_linears()
        .iter()
        .map(|(_, l)| l.d_in() * l.d_out() * 4)
        .sum();
    println!(
        "SmolLM2 projections: {:.1} MB quantised vs {:.1} MB f32",
        held as f64 / 1e6,
        f32_bytes as f64 / 1e6
    );
    assert!(held * 6 < f32_bytes);
    let (f32_model, q_model) = (
        with_random_b(f32_model, &device),
        with_random_b(q_model, &device),
    );
    let ids: Vec<i64> = vec![
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
        407, 19712, 8182, 2, 198, 1, 4093, 198,
    ];
    assert_same(
        run(&f32_model, &ids, 24),
        run(&q_model, &ids, 24),
        "SmolLM2 Q4_1",
    );
}

#[test]
fn quantise_on_load_stores_the_reference_encodings() {
    let dir = temp_dir("qlora-on-load");
    let device = Device::flex().autodiff();
    let config = ytrainer_models::HfConfig::from_json_str(
        r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 128, "intermediate_size": 192,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let model = init_random(&config, 3, &AdapterSpec::Full, &device).unwrap();
    let hf = dir.join("hf");
    ytrainer_models::save_hf_checkpoint(&model, &config, &hf).unwrap();
    for (flag, kind) in [
        ("q8_0", QuantKind::Q8_0),
        ("q4_0", QuantKind::Q4_0),
        ("nf4", QuantKind::Nf4),
    ] {
        let base = BaseWeights::parse_quantize(flag).unwrap();
        let (q, _) = load_pretrained_with(&hf, &lora(), &device, base).unwrap();
        for ((name, dense), (_, ql)) in model.named_linears().iter().zip(q.named_linears()) {
            let qw = ql
                .quant
                .as_ref()
                .unwrap_or_else(|| panic!("{name} not quantised"));
            assert_eq!(qw.kind, kind);
            // Row by row, the stored bytes are the reference encoder's output for the f32 row.
            let w = transpose(&to_vec(dense.weight.val()), qw.cols, qw.rows);
            let rows: Vec<u8> = w
                .chunks(qw.cols)
                .flat_map(|r| ytrainer_kernels::quant::encode(kind, r).unwrap())
                .collect();
            assert_eq!(qw.raw_rows(0, qw.rows), &rows[..], "{flag} {name}");
            // And what the layer multiplies by is within the format's error of the f32 weight.
            let back = qw.dequantize();
            let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let tol = match kind {
                QuantKind::Q8_0 => amax / 127.0,
                _ => amax / 4.0,
            };
            assert!(max_abs_diff(&back, &w) <= tol, "{flag} {name}");
        }
    }
    assert!(BaseWeights::parse_quantize("q3_k").is_none());
}

#[test]
fn unsupported_type_and_full_fine_tuning_are_clear_errors() {
    let dir = temp_dir("qlora-errors");
    let device = Device::flex().autodiff();
    // IQ2_XXS (type 16) is not supported: the error names the tensor and the type.
    let path = every_type_gguf(&dir, Some(16));
    let e = load_gguf_with(&path, &lora(), &device, BaseWeights::Stored)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blk.0.attn_v.weight") && e.contains("IQ2_XXS"),
        "{e}"
    );
    let path = every_type_gguf(&dir, None);
    let e = load_gguf_with(&path, &AdapterSpec::Full, &device, BaseWeights::Stored)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("full fine-tuning needs an f32 base")
            && e.contains("model.layers.0.self_attn.q_proj")
            && e.contains("--dequantize-base"),
        "{e}"
    );
}
