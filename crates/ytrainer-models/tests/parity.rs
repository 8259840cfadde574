//! Parity with transformers on the tiny Qwen2 checkpoint: logits, per-token losses, every gradient, and one
//! LoRA + AdamW step (reference values in shared/assets/tiny-qwen2).

mod common;

use std::collections::BTreeMap;

use burn::prelude::*;
use common::*;
use ytrainer_models::{AdapterSpec, CausalLm, LoraConfig, load_pretrained};

#[test]
fn logits_losses_and_gradients_match_transformers() {
    let device = Device::flex().autodiff();
    let (model, config) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &device).unwrap();
    assert_eq!(config.model_type, "qwen2");
    assert_eq!(ytrainer_models::total_param_count(&model), 5_050_624);
    assert_eq!(ytrainer_models::trainable_param_count(&model), 5_050_624);
    let npz = read_npz(&tiny_qwen2().join("reference.npz"));
    let reference = reference_json();
    let ids = &npz["input_ids"];
    assert_eq!(ids.shape, [2, 16]);
    let input = plain_input(&ids.i64, 2, 16, &device);

    // 1. logits at every position.
    let logits = model.forward(&input);
    assert_eq!(logits.dims(), [2, 16, 8192]);
    let diff = max_abs_diff(&to_vec(logits.clone()), &npz["logits"].f32);
    println!("logits max abs diff: {diff:e}");
    assert!(diff <= 1e-4, "logits differ by {diff}");

    // 2. per-token CE and its mean.
    let ce = per_token_ce(logits, &input.input_ids);
    let ce_values = to_vec(ce.clone());
    let mut worst = 0.0f32;
    for (ours, theirs) in ce_values.iter().zip(&npz["loss_per_token"].f32) {
        worst = worst.max((ours - theirs).abs() / theirs.abs());
    }
    println!("per-token CE max rel diff: {worst:e}");
    assert!(worst <= 1e-5, "per-token CE differs by {worst} (relative)");
    let loss = ce.mean();
    let mean = to_vec(loss.clone())[0] as f64;
    let expected = reference["mean_loss"].as_f64().unwrap();
    println!("mean loss {mean} vs {expected}");
    assert!(((mean - expected) / expected).abs() <= 1e-5);

    // 3. gradient norms of every parameter (HF names = "model." + module path, except lm_head).
    let grads = loss.backward();
    let ours = grads_by_path(&model, &grads);
    let norms = reference_grad_norms();
    assert_eq!(
        ours.len(),
        norms.len(),
        "one gradient per HF parameter (tied head has none of its own)"
    );
    let mut worst = 0.0f64;
    for (name, &expected) in &norms {
        let path = name.strip_prefix("model.").unwrap();
        let (_, g) = ours
            .get(path)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let rel = (l2(g) - expected).abs() / expected;
        worst = worst.max(rel);
        assert!(rel <= 1e-4, "{name}: grad norm {} vs {expected}", l2(g));
    }
    println!("grad norm max rel diff: {worst:e}");

    // Full gradients (npz holds PyTorch layout: linear weights [out, in]).
    for (key, npy) in npz.iter().filter(|(k, _)| k.starts_with("grad/")) {
        let name = key.strip_prefix("grad/").unwrap();
        let path = name.strip_prefix("model.").unwrap();
        let (shape, g) = &ours[path];
        let is_linear = name.ends_with("proj.weight");
        let g = if is_linear {
            transpose(g, shape[0], shape[1])
        } else {
            g.clone()
        };
        let scale = npy.f32.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let diff = max_abs_diff(&g, &npy.f32);
        println!("grad {name}: max abs diff {diff:e} (max |g| {scale:e})");
        assert!(
            diff <= 1e-3 * scale.max(1e-3),
            "{name}: gradient differs by {diff}"
        );
    }
}

/// PyTorch's AdamW on host values. Kept in the test so that the check does not depend on the trainer's
/// optimizer; TODO: switch to `ytrainer_core::optim` once it exists and is tested itself.
#[derive(Clone, Copy)]
struct AdamW {
    lr: f64,
    weight_decay: f64,
    betas: (f64, f64),
    eps: f64,
}

#[derive(Clone, Default)]
struct Moments {
    m: Vec<f64>,
    v: Vec<f64>,
    step: i32,
}

impl AdamW {
    fn step(&self, p: &mut [f32], g: &[f32], state: &mut Moments) {
        if state.m.is_empty() {
            state.m = vec![0.0; p.len()];
            state.v = vec![0.0; p.len()];
        }
        state.step += 1;
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(state.step);
        let bc2 = 1.0 - b2.powi(state.step);
        for i in 0..p.len() {
            let g = g[i] as f64;
            state.m[i] = b1 * state.m[i] + (1.0 - b1) * g;
            state.v[i] = b2 * state.v[i] + (1.0 - b2) * g * g;
            let decayed = p[i] as f64 * (1.0 - self.lr * self.weight_decay);
            let update = self.lr * (state.m[i] / bc1) / ((state.v[i] / bc2).sqrt() + self.eps);
            p[i] = (decayed - update) as f32;
        }
    }
}

/// LoRA values per projection, Burn layout: name -> (A [in, r], B [r, out]).
type LoraValues = BTreeMap<String, (Vec<f32>, Vec<f32>)>;

/// The LoRA reference (reference.json `lora`): r=8, alpha=16 on all 7 projections, B initialised to
/// `linspace(-0.02, 0.02)`, A from torch's RNG (seed 42), AdamW lr 2e-4.
///
/// `lora_after_1_step.npz` turns out to hold the adapter after TWO AdamW steps (every entry of B moved by about
/// 2·lr from its known init, and the loss at that state is ~8.822, not `loss_after_1_step` = 8.87046), the second
/// with the gradient at the state after the first step. So A's init is recovered by a fixed point over two
/// simulated steps, and the test checks: the loss before (8.92226), the loss after one step (8.87046), and B
/// after two steps against the npz (B's init is known exactly, so this checks the AdamW math, including the
/// second step's moment updates).
#[test]
fn lora_adamw_steps_match_peft() {
    let device = Device::flex().autodiff();
    let reference = reference_json();
    let lora_ref = &reference["lora"];
    let (r, alpha) = (
        lora_ref["r"].as_u64().unwrap() as usize,
        lora_ref["alpha"].as_f64().unwrap(),
    );
    let h = &lora_ref["adamw"];
    let adamw = AdamW {
        lr: h["lr"].as_f64().unwrap(),
        weight_decay: h["weight_decay"].as_f64().unwrap(),
        betas: (
            h["betas"][0].as_f64().unwrap(),
            h["betas"][1].as_f64().unwrap(),
        ),
        eps: h["eps"].as_f64().unwrap(),
    };
    let cfg = LoraConfig {
        r,
        alpha,
        ..LoraConfig::default()
    };
    let (base, _) =
        load_pretrained(&tiny_qwen2(), &AdapterSpec::Lora(cfg.clone()), &device).unwrap();
    // LoRA freezes everything but A and B: 4 layers x 7 projections x r x (in + out).
    let per_layer =
        r * ((256 + 256) + 2 * (256 + 128) + (256 + 256) + 2 * (256 + 704) + (704 + 256));
    assert_eq!(ytrainer_models::trainable_param_count(&base), 4 * per_layer);

    let npz = read_npz(&tiny_qwen2().join("lora_after_1_step.npz"));
    let ids = read_npz(&tiny_qwen2().join("reference.npz"))["input_ids"]
        .i64
        .clone();
    let input = plain_input(&ids, 2, 16, &device);
    let dims: Vec<(String, usize, usize)> = base
        .named_linears()
        .iter()
        .map(|(name, lin)| (name.clone(), lin.d_in(), lin.d_out()))
        .collect();
    let npz_value = |name: &str, part: &str, rows: usize, cols: usize| {
        let key = format!("base_model.model.{name}.{part}.default.weight");
        transpose(&npz[&key].f32, rows, cols)
    };
    // The npz state, Burn layout.
    let stored: LoraValues = dims
        .iter()
        .map(|(n, d_in, d_out)| {
            (
                n.clone(),
                (
                    npz_value(n, "lora_A", r, *d_in),
                    npz_value(n, "lora_B", *d_out, r),
                ),
            )
        })
        .collect();
    // B's init is known exactly: torch.linspace(-0.02, 0.02, out*r).view(out, r); Burn holds its transpose.
    let b_init = |d_out: usize| -> Vec<f32> {
        let n = d_out * r;
        let torch: Vec<f32> = (0..n)
            .map(|i| (-0.02 + 0.04 * i as f64 / (n - 1) as f64) as f32)
            .collect();
        transpose(&torch, d_out, r)
    };

    // Loss and LoRA gradients at given LoRA values.
    let evaluate = |values: &LoraValues| -> (f64, LoraValues) {
        let model = base
            .clone()
            .try_map_linears(|name, lin| {
                let (a, b) = &values[name];
                let a = Tensor::from_data(TensorData::new(a.clone(), [lin.d_in(), r]), &device);
                let b = Tensor::from_data(TensorData::new(b.clone(), [r, lin.d_out()]), &device);
                Ok::<_, ()>(lin.with_lora(a, b, cfg.scaling(), 0.0))
            })
            .unwrap();
        let loss = per_token_ce(model.forward(&input), &input.input_ids).mean();
        let value = to_vec(loss.clone())[0] as f64;
        let grads = grads_by_path(&model, &loss.backward());
        let g = values
            .keys()
            .map(|name| {
                let path = name.strip_prefix("model.").unwrap();
                let ga = grads[&format!("{path}.lora_a")].1.clone();
                let gb = grads[&format!("{path}.lora_b")].1.clone();
                (name.clone(), (ga, gb))
            })
            .collect();
        (value, g)
    };
    // Two AdamW steps from an init; returns (loss before, loss after step 1, values after step 2).
    let simulate = |init: &LoraValues| -> (f64, f64, LoraValues) {
        let mut values = init.clone();
        let mut state: BTreeMap<String, (Moments, Moments)> = BTreeMap::new();
        let mut losses = Vec::new();
        for _ in 0..2 {
            let (loss, grads) = evaluate(&values);
            losses.push(loss);
            for (name, (a, b)) in values.iter_mut() {
                let (sa, sb) = state.entry(name.clone()).or_default();
                adamw.step(a, &grads[name].0, sa);
                adamw.step(b, &grads[name].1, sb);
            }
        }
        (losses[0], losses[1], values)
    };

    // Fixed point on A_init: shift it by the difference between the simulated and the stored A after two steps.
    let mut init: LoraValues = stored
        .iter()
        .map(|(n, (a, _))| {
            (
                n.clone(),
                (
                    a.clone(),
                    b_init(dims.iter().find(|d| &d.0 == n).unwrap().2),
                ),
            )
        })
        .collect();
    let shrink = (1.0 - adamw.lr * adamw.weight_decay).powi(2) as f32;
    let (mut loss_before, mut loss_after) = (0.0, 0.0);
    let mut b_diff = f32::INFINITY;
    let mut b_close_fraction = 0.0;
    for iteration in 0..8 {
        let (l0, l1, simulated) = simulate(&init);
        (loss_before, loss_after) = (l0, l1);
        let mut a_diff = 0.0f32;
        b_diff = 0.0;
        let (mut b_close, mut b_total) = (0usize, 0usize);
        for (name, (a, _)) in init.iter_mut() {
            let (sim_a, sim_b) = &simulated[name];
            let (ref_a, ref_b) = &stored[name];
            a_diff = a_diff.max(max_abs_diff(sim_a, ref_a));
            b_diff = b_diff.max(max_abs_diff(sim_b, ref_b));
            b_total += ref_b.len();
            b_close += sim_b
                .iter()
                .zip(ref_b)
                .filter(|(x, y)| (*x - *y).abs() <= 1e-6)
                .count();
            for i in 0..a.len() {
                a[i] += (ref_a[i] - sim_a[i]) / shrink;
            }
        }
        b_close_fraction = b_close as f64 / b_total as f64;
        println!(
            "iteration {iteration}: loss before {l0:.6}, after 1 step {l1:.6}; after 2 steps max |dA| {a_diff:e}, max |dB| {b_diff:e}, B within 1e-6: {b_close}/{b_total}"
        );
    }
    let expected_before = lora_ref["loss_before_step"].as_f64().unwrap();
    let expected_after = lora_ref["loss_after_1_step"].as_f64().unwrap();
    println!(
        "loss before: {loss_before} vs {expected_before}; after one step: {loss_after} vs {expected_after}"
    );
    assert!((loss_before - expected_before).abs() <= 1e-4);
    assert!((loss_after - expected_after).abs() <= 1e-4);
    // Adam's first step moves each entry by lr·sign(g): an entry whose gradient is within float noise of 0 can
    // take the other sign than in PyTorch (~0.1% of B here), which shows as a 2·lr difference; any error in the
    // AdamW math would move most entries.
    println!(
        "B after two steps: {:.3}% within 1e-6, max diff {b_diff:e}",
        100.0 * b_close_fraction
    );
    assert!(
        b_close_fraction >= 0.998,
        "only {b_close_fraction} of B within 1e-6 of the npz"
    );
    assert!(
        b_diff <= 2.0 * adamw.lr as f32 + 1e-6,
        "B after two AdamW steps differs from the npz by {b_diff}"
    );
}

#[test]
fn packed_segments_and_padding_match_separate_rows() {
    let device = Device::flex();
    let (model, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &device).unwrap();
    let ids: Vec<i64> = (0..16).map(|i| (i * 397 + 11) % 8192).collect();
    // Row 0: two documents of 8 tokens packed; row 1: the first document then 8 padding tokens.
    let packed_ids: Vec<i64> = ids
        .iter()
        .copied()
        .chain(ids[..8].iter().copied())
        .chain([0; 8])
        .collect();
    let positions: Vec<i64> = (0..8).chain(0..8).chain(0..8).chain(0..8).collect();
    let segments: Vec<i64> = [1; 8]
        .into_iter()
        .chain([2; 8])
        .chain([1; 8])
        .chain([0; 8])
        .collect();
    let input = ytrainer_core::model::ModelInput {
        input_ids: Tensor::from_data(TensorData::new(packed_ids, [2, 16]), &device),
        position_ids: Tensor::from_data(TensorData::new(positions, [2, 16]), &device),
        segment_ids: Tensor::from_data(TensorData::new(segments, [2, 16]), &device),
    };
    let packed = to_vec(model.forward(&input));
    assert!(
        packed.iter().all(|x| x.is_finite()),
        "padding must not produce NaN/inf"
    );
    let v = 8192;
    let doc1 = to_vec(model.forward(&plain_input(&ids[..8], 1, 8, &device)));
    let doc2 = to_vec(model.forward(&plain_input(&ids[8..], 1, 8, &device)));
    let d1 = max_abs_diff(&packed[..8 * v], &doc1);
    let d2 = max_abs_diff(&packed[8 * v..16 * v], &doc2);
    let d3 = max_abs_diff(&packed[16 * v..24 * v], &doc1);
    println!("packed vs separate: {d1:e} {d2:e} {d3:e}");
    assert!(d1.max(d2).max(d3) <= 1e-5);
    // The head is also usable on a few rows only.
    let hidden = model.hidden_states(&input);
    assert_eq!(
        model
            .lm_head(hidden.reshape([32, 256]).narrow(0, 3, 2))
            .dims(),
        [2, v]
    );
}
