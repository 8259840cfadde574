//! Gradient checkpointing (`Decoder::with_gradient_checkpointing`) gives the plain path's gradients for every
//! parameter: full fine-tuning and LoRA on the tiny Qwen2 checkpoint (whose plain gradients `parity.rs` checks
//! against transformers), the top layer at all rows and at answer rows only, packed rows, and LoRA dropout, whose
//! masks the recomputed layers must draw again exactly.
//!
//! One test function: the dropout case seeds the process-wide device RNG, which parallel tests would disturb.

mod common;

use std::collections::BTreeMap;

use burn::module::{Param, ParamId};
use burn::prelude::*;
use burn::tensor::Gradients;
use burn::tensor::activation::log_softmax;
use common::*;
use ytrainer_core::model::{GradSink, ModelInput};
use ytrainer_models::decoder::AttnContext;
use ytrainer_models::{AdapterSpec, CausalLm, Decoder, LoraConfig, load_pretrained};

type Grads = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn add_into(model: &Decoder, grads: &Gradients, out: &mut Grads) {
    for (path, (shape, g)) in grads_by_path(model, grads) {
        match out.get_mut(&path) {
            Some((_, acc)) => acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b),
            None => {
                out.insert(path, (shape, g));
            }
        }
    }
}

/// Mean next-token CE of the hidden `rows` (flat `b * T + t`) through the tied head.
fn loss(model: &Decoder, rows: Tensor<2>, targets: &Tensor<1, Int>) -> Tensor<1> {
    let n = targets.dims()[0];
    log_softmax(model.lm_head(rows), 1)
        .gather(1, targets.clone().reshape([n, 1]))
        .neg()
        .mean()
}

struct Case {
    input: ModelInput,
    rows: Tensor<1, Int>,
    host_rows: Vec<usize>,
    targets: Tensor<1, Int>,
}

fn case(ids: &[i64], b: usize, t: usize, from: usize, device: &Device) -> Case {
    let host_rows: Vec<usize> = (0..b)
        .flat_map(|r| (from..t - 1).map(move |i| r * t + i))
        .collect();
    let int1 = |v: Vec<i64>| {
        let n = v.len();
        Tensor::<1, Int>::from_data(TensorData::new(v, [n]), device)
    };
    Case {
        input: plain_input(ids, b, t, device),
        rows: int1(host_rows.iter().map(|&r| r as i64).collect()),
        targets: int1(host_rows.iter().map(|&r| ids[r + 1]).collect()),
        host_rows,
    }
}

fn plain(model: &Decoder, c: &Case) -> Grads {
    let rows = model.hidden_states_at(&c.input, &c.rows, &c.host_rows);
    let grads = loss(model, rows, &c.targets).backward();
    let mut out = Grads::new();
    add_into(model, &grads, &mut out);
    out
}

/// The plain path with the per-layer dropout seeds the recomputing path uses (all rows: the full top layer).
fn plain_seeded(model: &Decoder, c: &Case, seed: u64, device: &Device) -> Grads {
    device.seed(seed);
    let seeds = model.dropout_seeds(device).expect("dropout seeds");
    let ctx = AttnContext::new(
        &c.input,
        &model.spec.inv_freq(),
        model.spec.sliding_window,
        true,
    );
    let mut x = model.embed_tokens.forward(c.input.input_ids.clone());
    for (i, layer) in model.layers.iter().enumerate() {
        device.seed(seeds[i]);
        x = layer.forward(x, &ctx);
    }
    let [b, t, h] = x.dims();
    let rows = model
        .norm
        .forward(x)
        .reshape([b * t, h])
        .select(0, c.rows.clone());
    let grads = loss(model, rows, &c.targets).backward();
    let mut out = Grads::new();
    add_into(model, &grads, &mut out);
    out
}

fn recomputed(model: &Decoder, c: &Case) -> Grads {
    let (rows, rc) = model
        .hidden_states_at_recomputed(&c.input, &c.rows, &c.host_rows)
        .expect("gradient checkpointing is on");
    // The head's graph alone first, from the rows as a leaf: its gradient at the rows enters the recomputation.
    let leaf = rows.clone().detach().require_grad();
    let mut head = loss(model, leaf.clone(), &c.targets).backward();
    let dh = leaf.grad_remove(&mut head).expect("gradient at the rows");
    let mut sink = Sink {
        model,
        out: Grads::new(),
    };
    sink.graph(&mut head);
    rc.backward(rows, Tensor::from_inner(dh), &mut sink);
    sink.out
}

struct Sink<'a> {
    model: &'a Decoder,
    out: Grads,
}

impl GradSink for Sink<'_> {
    fn graph(&mut self, grads: &mut Gradients) {
        add_into(self.model, grads, &mut self.out);
    }

    fn rows(&mut self, id: ParamId, ids: Tensor<1, Int>, rows: Tensor<2>, shape: [usize; 2]) {
        assert_eq!(
            id, self.model.embed_tokens.weight.id,
            "only the embedding's gradient comes as rows"
        );
        let dense = Tensor::<2>::zeros(shape, &rows.device()).select_assign(
            0,
            ids,
            rows,
            burn::tensor::IndexingUpdateOp::Add,
        );
        let (_, acc) = self
            .out
            .get_mut("embed_tokens.weight")
            .expect("the tied head's gradient came first");
        acc.iter_mut().zip(to_vec(dense)).for_each(|(a, b)| *a += b);
    }
}

fn assert_same(what: &str, got: &Grads, want: &Grads) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: the same parameters get gradients"
    );
    for (path, (_, w)) in want {
        let g = &got[path].1;
        let scale = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let diff = max_abs_diff(g, w);
        assert!(
            scale > 0.0 && diff <= 1e-4 * scale,
            "{what}: {path} differs by {diff} (max |g| {scale})"
        );
    }
}

fn with_random_b(model: Decoder, device: &Device) -> Decoder {
    model
        .try_map_linears::<()>(|_, mut lin| {
            if let Some(b) = lin.lora_b.take() {
                let [r, o] = b.val().dims();
                let v: Vec<f32> = (0..r * o)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 2500.0)
                    .collect();
                let t = Tensor::<2>::from_data(TensorData::new(v, [r, o]), device).require_grad();
                lin.lora_b = Some(Param::initialized(b.id, t));
            }
            Ok(lin)
        })
        .unwrap()
}

#[test]
fn gradient_checkpointing_gives_the_plain_gradients() {
    let device = Device::flex().autodiff();
    let npz = read_npz(&tiny_qwen2().join("reference.npz"));
    let ids = &npz["input_ids"].i64;
    let (b, t) = (2, 16);
    let every = case(ids, b, t, 0, &device);
    // Answer-like targets (the second half of each row): the top layer runs at those rows only.
    let answers = case(ids, b, t, 8, &device);

    // Packed rows: two documents per row (positions restart, attention stays inside each document).
    let mut packed = case(ids, b, t, 0, &device);
    let pos: Vec<i64> = (0..b * t).map(|i| ((i % t) % 9) as i64).collect();
    let seg: Vec<i64> = (0..b * t).map(|i| if i % t < 9 { 1 } else { 2 }).collect();
    packed.input.position_ids = Tensor::from_data(TensorData::new(pos, [b, t]), &device);
    packed.input.segment_ids = Tensor::from_data(TensorData::new(seg, [b, t]), &device);

    let (full, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &device).unwrap();
    assert!(full.layers.len() >= 3, "at least two recomputed layers");
    assert!(
        full.hidden_states_at_recomputed(&every.input, &every.rows, &every.host_rows)
            .is_none()
    );
    let full = full.with_gradient_checkpointing(true);
    for (name, c) in [
        ("full, every row", &every),
        ("full, answer rows", &answers),
        ("full, packed rows", &packed),
    ] {
        let want = plain(&full, c);
        assert!(
            want.contains_key("embed_tokens.weight")
                && want.contains_key("layers.0.mlp.down_proj.weight")
        );
        assert_same(name, &recomputed(&full, c), &want);
    }

    let lora = |dropout: f64| {
        let spec = AdapterSpec::Lora(LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout,
            ..LoraConfig::default()
        });
        let (m, _) = load_pretrained(&tiny_qwen2(), &spec, &device).unwrap();
        with_random_b(m, &device).with_gradient_checkpointing(true)
    };
    let m = lora(0.0);
    let want = plain(&m, &answers);
    assert_eq!(
        want.len(),
        2 * 7 * m.layers.len(),
        "A and B of every projection, nothing else"
    );
    assert_same("lora, answer rows", &recomputed(&m, &answers), &want);

    // Dropout: the recomputed layers draw the masks of the first pass again (a mismatch would break the match).
    let m = lora(0.3);
    let want = plain_seeded(&m, &every, 11, &device);
    device.seed(11);
    assert_same("lora with dropout", &recomputed(&m, &every), &want);
    // And the seeds matter: other seeds, other masks, other gradients.
    let other = plain_seeded(&m, &every, 12, &device);
    let path = "layers.0.self_attn.q_proj.lora_a";
    assert!(max_abs_diff(&other[path].1, &want[path].1) > 1e-6);
}
