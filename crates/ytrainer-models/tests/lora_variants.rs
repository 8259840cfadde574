//! The LoRA variants that change the model beyond `A` and `B`: DoRA (a magnitude vector per adapted projection)
//! and `modules_to_save` (the embeddings / head trained fully beside LoRA). Each test checks numbers against a
//! hand computation or an independent path (the base model, full fine-tuning, the merged checkpoint), and the
//! PEFT file format they are saved in.

mod common;

use burn::prelude::*;
use common::*;
use safetensors::SafeTensors;
use ytrainer_models::{
    AdapterSpec, BaseWeights, Decoder, HfConfig, LoraConfig, LoraLinear, init_random,
    load_peft_adapter, load_pretrained, load_pretrained_with, save_hf_checkpoint,
    save_peft_adapter,
};

const IDS: usize = 24;

fn ids(model: &Decoder) -> Vec<i64> {
    (0..IDS)
        .map(|i| ((i * 733 + 5) % model.spec.vocab_size) as i64)
        .collect()
}

fn logits(model: &Decoder, device: &Device) -> Vec<f32> {
    to_vec(model.forward(&plain_input(&ids(model), 2, IDS / 2, device)))
}

/// Mean next-token CE of the fixed ids.
fn loss(model: &Decoder, device: &Device) -> f32 {
    let input = plain_input(&ids(model), 2, IDS / 2, device);
    to_vec(per_token_ce(model.forward(&input), &input.input_ids).mean())[0]
}

fn dora(r: usize) -> LoraConfig {
    LoraConfig {
        r,
        alpha: 2.0 * r as f64,
        use_dora: true,
        ..LoraConfig::default()
    }
}

/// Moves every adapted projection away from its initialisation: deterministic non-zero `B`, and DoRA
/// magnitudes scaled per feature by `1 + 0.1 sin(k)`, so that neither the direction nor the magnitude is the
/// base's.
fn perturbed(model: Decoder, device: &Device) -> Decoder {
    let mut k = 0.0f32;
    model
        .try_map_linears(|_, lin| {
            let Some(a) = lin.lora_a.as_ref().map(|p| p.val()) else {
                return Ok(lin);
            };
            let [r, d_out] = lin.lora_b.as_ref().unwrap().val().dims();
            let b: Vec<f32> = (0..r * d_out)
                .map(|i| ((i as f32 * 0.37 + k).sin()) * 0.05)
                .collect();
            let b = Tensor::from_data(TensorData::new(b, [r, d_out]), device);
            let m = lin.lora_magnitude.as_ref().map(|m| {
                let v: Vec<f32> = to_vec(m.val())
                    .iter()
                    .enumerate()
                    .map(|(i, x)| x * (1.0 + 0.1 * (i as f32 + k).sin()))
                    .collect();
                Tensor::<1>::from_data(TensorData::new(v, [d_out]), device)
            });
            k += 1.0;
            let scaling = lin.scaling;
            let lin = lin.with_lora(a, b, scaling, 0.0);
            Ok::<_, ()>(match m {
                Some(m) => lin.with_dora(m),
                None => lin,
            })
        })
        .unwrap()
}

/// DoRA at initialisation is the base model to the last bit (m = ||W||, so m / norm is exactly 1 and B = 0), and
/// every magnitude is the column norm of its base weight (computed here in f64 from the weights).
#[test]
fn dora_at_init_is_the_base_model_exactly() {
    let device = Device::flex();
    let (base, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &device).unwrap();
    let (model, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Lora(dora(4)), &device).unwrap();
    let diff = max_abs_diff(&logits(&base, &device), &logits(&model, &device));
    println!("DoRA at init vs base: max |logit diff| = {diff:e}");
    assert_eq!(diff, 0.0);
    let mut worst = 0f64;
    for (name, lin) in model.named_linears() {
        let m = to_vec(lin.lora_magnitude.as_ref().expect("magnitude").val());
        let (d_in, d_out) = (lin.d_in(), lin.d_out());
        let w = to_vec(lin.weight.val());
        for (o, &mo) in m.iter().enumerate() {
            let n = (0..d_in)
                .map(|i| (w[i * d_out + o] as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            worst = worst.max((mo as f64 - n).abs() / n);
        }
        assert_eq!(m.len(), d_out, "{name}");
    }
    println!("DoRA magnitudes vs f64 column norms: worst relative difference {worst:e}");
    assert!(worst < 1e-6);
}

/// One DoRA linear layer (in 3, out 2, r 2, with bias, a magnitude that is not the norm) against the formula
/// computed by hand in f64: the output, and the gradients of `m`, `A` and `B` for the loss `sum(y * C)` with the
/// norm treated as a constant (PEFT's detach). The magnitude's gradient is also checked by central differences
/// (the loss is linear in `m`, so they are exact up to rounding).
#[test]
fn dora_linear_matches_the_hand_computed_forward_and_gradients() {
    let device = Device::flex().autodiff();
    let (d_in, d_out, r, n) = (3usize, 2usize, 2usize, 4usize);
    let s = 1.5f64;
    let w: Vec<f64> = vec![0.3, -0.2, 0.5, 0.1, -0.4, 0.25]; // [in, out]
    let bias: Vec<f64> = vec![0.05, -0.1];
    let a: Vec<f64> = vec![0.2, -0.1, 0.4, 0.3, -0.2, 0.15]; // [in, r]
    let b: Vec<f64> = vec![0.1, -0.3, 0.2, 0.05]; // [r, out]
    let m: Vec<f64> = vec![0.9, 0.35];
    let x: Vec<f64> = (0..n * d_in).map(|i| ((i as f64) * 0.7).sin()).collect();
    let c: Vec<f64> = (0..n * d_out)
        .map(|i| ((i as f64) * 1.3 + 0.2).cos())
        .collect();
    let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let t2 = |v: &[f64], shape: [usize; 2]| {
        Tensor::<2>::from_data(TensorData::new(f(v), shape), &device)
    };
    let t1 = |v: &[f64]| Tensor::<1>::from_data(TensorData::new(f(v), [v.len()]), &device);
    let lin = LoraLinear::new(t2(&w, [d_in, d_out]), Some(t1(&bias)))
        .with_lora(t2(&a, [d_in, r]), t2(&b, [r, d_out]), s, 0.0)
        .with_dora(t1(&m));
    let xt = Tensor::<3>::from_data(TensorData::new(f(&x), [1, n, d_in]), &device);
    let y = lin.forward(xt);
    let ct = Tensor::<3>::from_data(TensorData::new(f(&c), [1, n, d_out]), &device);
    let grads = y.clone().mul(ct).sum().backward();
    let got_y = to_vec(y);
    let grad = |p: &Option<burn::module::Param<Tensor<2>>>| {
        to_vec(Tensor::<2>::from_inner(
            p.as_ref().unwrap().val().grad(&grads).unwrap(),
        ))
    };
    let (got_da, got_db) = (grad(&lin.lora_a), grad(&lin.lora_b));
    let got_dm = to_vec(Tensor::<1>::from_inner(
        lin.lora_magnitude
            .as_ref()
            .unwrap()
            .val()
            .grad(&grads)
            .unwrap(),
    ));

    // By hand: V = W + s A B (columns = output features), g = m / ||V_col||, y = g * (x V) + bias.
    let ab = |i: usize, o: usize| (0..r).map(|k| a[i * r + k] * b[k * d_out + o]).sum::<f64>();
    let v = |i: usize, o: usize| w[i * d_out + o] + s * ab(i, o);
    let norm: Vec<f64> = (0..d_out)
        .map(|o| (0..d_in).map(|i| v(i, o).powi(2)).sum::<f64>().sqrt())
        .collect();
    let g: Vec<f64> = (0..d_out).map(|o| m[o] / norm[o]).collect();
    let xv = |t: usize, o: usize| (0..d_in).map(|i| x[t * d_in + i] * v(i, o)).sum::<f64>();
    let xa = |t: usize, k: usize| {
        (0..d_in)
            .map(|i| x[t * d_in + i] * a[i * r + k])
            .sum::<f64>()
    };
    let want_y: Vec<f64> = (0..n * d_out)
        .map(|j| g[j % d_out] * xv(j / d_out, j % d_out) + bias[j % d_out])
        .collect();
    let want_dm: Vec<f64> = (0..d_out)
        .map(|o| (0..n).map(|t| c[t * d_out + o] * xv(t, o)).sum::<f64>() / norm[o])
        .collect();
    let want_db: Vec<f64> = (0..r * d_out)
        .map(|j| {
            let (k, o) = (j / d_out, j % d_out);
            g[o] * s * (0..n).map(|t| xa(t, k) * c[t * d_out + o]).sum::<f64>()
        })
        .collect();
    let want_da: Vec<f64> = (0..d_in * r)
        .map(|j| {
            let (i, k) = (j / r, j % r);
            s * (0..n)
                .flat_map(|t| (0..d_out).map(move |o| (t, o)))
                .map(|(t, o)| x[t * d_in + i] * b[k * d_out + o] * g[o] * c[t * d_out + o])
                .sum::<f64>()
        })
        .collect();
    let worst = |got: &[f32], want: &[f64]| {
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(0f64, f64::max)
    };
    let (ey, em, ea, eb) = (
        worst(&got_y, &want_y),
        worst(&got_dm, &want_dm),
        worst(&got_da, &want_da),
        worst(&got_db, &want_db),
    );
    println!("DoRA linear vs hand computation: y {ey:e}, dm {em:e}, dA {ea:e}, dB {eb:e}");
    for (what, e) in [("y", ey), ("dm", em), ("dA", ea), ("dB", eb)] {
        assert!(e < 1e-6, "{what} differs by {e}");
    }
    // Central differences of the loss in m (on the plain device: no graph needed).
    let plain = Device::flex();
    let loss_at = |mv: &[f64]| -> f64 {
        let t2 = |v: &[f64], shape: [usize; 2]| {
            Tensor::<2>::from_data(TensorData::new(f(v), shape), &plain)
        };
        let t1 = |v: &[f64]| Tensor::<1>::from_data(TensorData::new(f(v), [v.len()]), &plain);
        let lin = LoraLinear::new(t2(&w, [d_in, d_out]), Some(t1(&bias)))
            .with_lora(t2(&a, [d_in, r]), t2(&b, [r, d_out]), s, 0.0)
            .with_dora(t1(mv));
        let y = to_vec(lin.forward(Tensor::<3>::from_data(
            TensorData::new(f(&x), [1, n, d_in]),
            &plain,
        )));
        y.iter().zip(&c).map(|(&y, &c)| y as f64 * c).sum()
    };
    let h = 1e-2;
    let mut fd_worst = 0f64;
    for o in 0..d_out {
        let (mut up, mut down) = (m.clone(), m.clone());
        up[o] += h;
        down[o] -= h;
        let fd = (loss_at(&up) - loss_at(&down)) / (2.0 * h);
        fd_worst = fd_worst.max((fd - got_dm[o] as f64).abs());
    }
    println!("DoRA dL/dm vs central differences: {fd_worst:e}");
    assert!(fd_worst < 1e-4);
}

/// With dropout configured, the layer takes PEFT's dropout branch `x·W + b + (g-1)·(d·W) + g·s·(d·A)·B`; without
/// masks (the plain device draws none) `d = x` and it must equal the fused branch.
#[test]
fn dora_dropout_branch_equals_the_fused_branch_without_masks() {
    let device = Device::flex();
    let (model, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Lora(dora(4)), &device).unwrap();
    let model = perturbed(model, &device);
    let with_dropout = model
        .clone()
        .try_map_linears(|_, lin| {
            let (a, b, m) = (
                lin.lora_a.as_ref().unwrap().val(),
                lin.lora_b.as_ref().unwrap().val(),
                lin.lora_magnitude.as_ref().unwrap().val(),
            );
            let s = lin.scaling;
            Ok::<_, ()>(lin.with_lora(a, b, s, 0.1).with_dora(m))
        })
        .unwrap();
    let diff = max_abs_diff(&logits(&model, &device), &logits(&with_dropout, &device));
    println!("DoRA dropout branch vs fused branch: {diff:e}");
    assert!(diff < 1e-4);
}

/// DoRA saved in PEFT's format (`lora_magnitude_vector` `[out]` beside A and B, `use_dora: true`), loaded back to
/// the same logits and loss bit for bit, and merged (`m * V / ||V||` per output row) to logits within 1e-5 of
/// the adapter's forward; the merged weight of one projection is checked against the formula in f64.
#[test]
fn dora_adapter_round_trip_format_and_merge() {
    let device = Device::flex();
    let cfg = dora(4);
    let (model, _) =
        load_pretrained(&tiny_qwen2(), &AdapterSpec::Lora(cfg.clone()), &device).unwrap();
    let model = perturbed(model, &device);
    let (base, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &device).unwrap();
    assert!(max_abs_diff(&logits(&model, &device), &logits(&base, &device)) > 1e-3);
    let dir = temp_dir("dora");
    save_peft_adapter(&model, &cfg, "base", &dir).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["use_dora"], true);
    assert_eq!(config["modules_to_save"], serde_json::Value::Null);
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let key = "base_model.model.model.layers.0.self_attn.k_proj.lora_magnitude_vector";
    assert_eq!(st.tensor(key).unwrap().shape(), &[128]);
    // 4 layers x 7 projections x (A, B, magnitude).
    assert_eq!(st.names().len(), 4 * 7 * 3);
    let saved_m: Vec<f32> = st
        .tensor(key)
        .unwrap()
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let k_proj = &model.layers[0].self_attn.k_proj;
    assert_eq!(
        saved_m,
        to_vec(k_proj.lora_magnitude.as_ref().unwrap().val())
    );

    let reloaded = load_peft_adapter(base, &dir).unwrap();
    let ours = logits(&model, &device);
    assert_eq!(max_abs_diff(&ours, &logits(&reloaded, &device)), 0.0);
    let (l0, l1) = (loss(&model, &device), loss(&reloaded, &device));
    println!("DoRA save -> load: loss {l0} vs {l1}");
    assert_eq!(l0, l1);

    // The merged weight of one projection against m * V / ||V|| in f64 (V = W + s·A·B, norms per output).
    let merged_w = to_vec(k_proj.merged_weight());
    let (d_in, d_out) = (k_proj.d_in(), k_proj.d_out());
    let w = to_vec(k_proj.weight.val());
    let (a, b) = (
        to_vec(k_proj.lora_a.as_ref().unwrap().val()),
        to_vec(k_proj.lora_b.as_ref().unwrap().val()),
    );
    let r = 4;
    let v = |i: usize, o: usize| {
        w[i * d_out + o] as f64
            + k_proj.scaling
                * (0..r)
                    .map(|k| a[i * r + k] as f64 * b[k * d_out + o] as f64)
                    .sum::<f64>()
    };
    let m = to_vec(k_proj.lora_magnitude.as_ref().unwrap().val());
    let mut worst = 0f64;
    for o in 0..d_out {
        let norm = (0..d_in).map(|i| v(i, o).powi(2)).sum::<f64>().sqrt();
        for i in 0..d_in {
            let want = m[o] as f64 * v(i, o) / norm;
            worst = worst.max((merged_w[i * d_out + o] as f64 - want).abs());
        }
    }
    println!("DoRA merged k_proj weight vs f64 formula: {worst:e}");
    assert!(worst < 1e-6);

    let merged_dir = temp_dir("dora-merged");
    save_hf_checkpoint(&model, &model.config, &merged_dir).unwrap();
    let (merged, _) = load_pretrained(&merged_dir, &AdapterSpec::Full, &device).unwrap();
    let diff = max_abs_diff(&ours, &logits(&merged, &device));
    println!("DoRA merged checkpoint vs adapter forward: max |logit diff| = {diff:e}");
    assert!(diff <= 1e-5);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&merged_dir);
}

/// Loading an adapter onto a model built with another adapter (what `[adapter] init_from` does: the run's model
/// is built from the config's `[adapter]` first) leaves only the file's adapter: the model's own LoRA branches on
/// projections the file does not target are removed and its `modules_to_save` copies go back to the base's, so
/// that it computes, trains and saves exactly the file's adapter (here DoRA on q_proj and v_proj over a model
/// built with LoRA r=16 on all seven projections plus trained embeddings).
#[test]
fn loading_an_adapter_replaces_the_models_own_adapter() {
    let device = Device::flex().autodiff();
    let file_cfg = LoraConfig {
        r: 4,
        alpha: 6.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        use_dora: true,
        ..LoraConfig::default()
    };
    let (source, _) =
        load_pretrained(&tiny_qwen2(), &AdapterSpec::Lora(file_cfg.clone()), &device).unwrap();
    let source = perturbed(source, &device);
    let dir = temp_dir("replace");
    save_peft_adapter(&source, &file_cfg, "base", &dir).unwrap();
    let saved_names = |dir: &std::path::Path| {
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let mut names: Vec<String> = SafeTensors::deserialize(&bytes)
            .unwrap()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        names.sort();
        names
    };
    let source_names = saved_names(&dir);
    assert_eq!(source_names.len(), 4 * 2 * 3);

    let own = LoraConfig {
        modules_to_save: vec!["embed_tokens".into()],
        ..LoraConfig::default()
    };
    let (model, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Lora(own), &device).unwrap();
    assert_eq!(model.trained_beside_adapters(), (true, false));
    let loaded = load_peft_adapter(model, &dir).unwrap();
    for (name, lin) in loaded.named_linears() {
        let targeted = name.ends_with("q_proj") || name.ends_with("v_proj");
        assert_eq!(lin.has_lora(), targeted, "{name}");
        assert_eq!(lin.lora_magnitude.is_some(), targeted, "{name}");
    }
    assert_eq!(loaded.trained_beside_adapters(), (false, false));
    assert_eq!(
        ytrainer_models::trainable_param_count(&loaded),
        ytrainer_models::trainable_param_count(&source)
    );
    for (path, _, requires_grad) in ytrainer_models::named_params(&loaded) {
        let adapter = path.contains("lora_");
        assert_eq!(requires_grad, adapter, "{path}");
    }
    assert_eq!(
        max_abs_diff(&logits(&source, &device), &logits(&loaded, &device)),
        0.0
    );
    // Saved again: the file's tensors and nothing else.
    let again = temp_dir("replace-again");
    let ytrainer_models::AdapterSpec::Lora(cfg) = loaded.adapter.clone() else {
        panic!("not a LoRA adapter")
    };
    save_peft_adapter(&loaded, &cfg, "base", &again).unwrap();
    assert_eq!(saved_names(&again), source_names);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&again);
}

/// PEFT's `ensure_weight_tying` form of `modules_to_save` on a tied model: the config lists only the embeddings
/// (`["embed_tokens", "model.embed_tokens"]`) and the file holds the one matrix under both names. It loads tied,
/// to the logits of the model it came from; a file whose two matrices differ is refused (the head would be the
/// embeddings, not the file's head).
#[test]
fn ensure_weight_tying_adapter_loads_tied() {
    use ytrainer_models::st::{PendingTensor, SafetensorsReader, write_f32};
    let device = Device::flex();
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        target_modules: vec!["o_proj".into()],
        modules_to_save: vec!["embed_tokens".into()],
        ..LoraConfig::default()
    };
    let (model, _) =
        load_pretrained(&tiny_qwen2(), &AdapterSpec::Lora(cfg.clone()), &device).unwrap();
    let mut model = perturbed(model, &device);
    let e = model.embed_tokens.weight.val();
    model.embed_tokens.weight =
        burn::module::Param::from_tensor(e.clone() + e.mul_scalar(0.7).cos().mul_scalar(0.02));
    let dir = temp_dir("tying");
    save_peft_adapter(&model, &cfg, "base", &dir).unwrap();
    // Rewrite the config as PEFT writes it with `ensure_weight_tying`.
    let config_path = dir.join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["modules_to_save"] = serde_json::json!(["embed_tokens", "model.embed_tokens"]);
    config["ensure_weight_tying"] = true.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let (base, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &device).unwrap();
    let loaded = load_peft_adapter(base, &dir).unwrap();
    assert!(loaded.lm_head.is_none(), "stays tied");
    assert_eq!(loaded.trained_beside_adapters(), (true, false));
    assert_eq!(
        max_abs_diff(&logits(&model, &device), &logits(&loaded, &device)),
        0.0
    );

    // The head changed in the file: refused, naming the tensor.
    let weights = dir.join("adapter_model.safetensors");
    let mut r = SafetensorsReader::open(&weights).unwrap();
    let names: Vec<String> = r.names().map(str::to_string).collect();
    let mut tensors = Vec::new();
    for name in names {
        let shape = r.shape(&name).unwrap().to_vec();
        let mut v = r.read_f32(&name, &shape).unwrap();
        if name == "base_model.model.lm_head.weight" {
            v[7] += 0.5;
        }
        tensors.push(PendingTensor::new(name, shape, move || v));
    }
    drop(r);
    write_f32(&weights, tensors).unwrap();
    let (base, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &device).unwrap();
    let err = load_peft_adapter(base, &dir).unwrap_err().to_string();
    assert!(
        err.contains("base_model.model.lm_head.weight") && err.contains("ensure_weight_tying"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// DoRA over a base kept quantised (q8_0 on load) computes what DoRA over the same weights dequantised to f32
/// computes: logits, loss and the gradients of A, B and the magnitudes (relative 1e-5).
#[test]
fn dora_on_a_quantised_base_matches_the_dequantised_base() {
    let device = Device::flex().autodiff();
    let base = BaseWeights::parse_quantize("q8_0").unwrap();
    let (q, _) =
        load_pretrained_with(&tiny_qwen2(), &AdapterSpec::Lora(dora(4)), &device, base).unwrap();
    let q = perturbed(q, &device);
    assert!(q.layers[0].self_attn.q_proj.quant.is_some());
    let f = q
        .clone()
        .try_map_linears(|_, lin| {
            let dense = LoraLinear::new(lin.base_weight(), lin.bias.as_ref().map(|b| b.val()));
            let (a, b, m) = (
                lin.lora_a.as_ref().unwrap().val(),
                lin.lora_b.as_ref().unwrap().val(),
                lin.lora_magnitude.as_ref().unwrap().val(),
            );
            Ok::<_, ()>(dense.with_lora(a, b, lin.scaling, 0.0).with_dora(m))
        })
        .unwrap();
    let run = |model: &Decoder| {
        let input = plain_input(&ids(model), 2, IDS / 2, &device);
        let ce = per_token_ce(model.forward(&input), &input.input_ids).mean();
        let l = to_vec(ce.clone())[0];
        let grads = ce.backward();
        (l, grads_by_path(model, &grads))
    };
    let ((lq, gq), (lf, gf)) = (run(&q), run(&f));
    println!("DoRA quantised vs dequantised base: loss {lq} vs {lf}");
    assert!(((lq - lf) / lf).abs() < 1e-5);
    assert_eq!(gq.keys().collect::<Vec<_>>(), gf.keys().collect::<Vec<_>>());
    assert!(gq.keys().any(|k| k.ends_with("lora_magnitude")));
    let mut worst = 0f32;
    for (k, (_, g)) in &gf {
        let scale = g.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        worst = worst.max(max_abs_diff(&gq[k].1, g) / scale);
    }
    println!("DoRA quantised vs dequantised base: worst relative gradient difference {worst:e}");
    assert!(worst < 1e-4);
}

/// `modules_to_save` on a tied model (tiny-qwen2): the one embedding matrix is trained, its gradient equals full
/// fine-tuning's (a fresh LoRA changes nothing, so the two are the same function); the adapter holds it as both
/// `embed_tokens` and `lm_head` and lists both; it loads back tied to the same logits and loss; the merge gives
/// the same logits; with the adapters off the model is the base (the frozen original is kept).
#[test]
fn modules_to_save_on_a_tied_model() {
    let device = Device::flex().autodiff();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        modules_to_save: vec!["embed_tokens".into(), "lm_head".into()],
        ..LoraConfig::default()
    };
    let (model, _) =
        load_pretrained(&tiny_qwen2(), &AdapterSpec::Lora(cfg.clone()), &device).unwrap();
    let (full, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &device).unwrap();
    assert!(model.lm_head.is_none());
    assert_eq!(model.trained_beside_adapters(), (true, false));
    let grad_of = |m: &Decoder| {
        let input = plain_input(&ids(m), 2, IDS / 2, &device);
        let ce = per_token_ce(m.forward(&input), &input.input_ids).mean();
        grads_by_path(m, &ce.backward())
    };
    let (g_lora, g_full) = (grad_of(&model), grad_of(&full));
    let (e_lora, e_full) = (
        &g_lora["embed_tokens.weight"].1,
        &g_full["embed_tokens.weight"].1,
    );
    let d = max_abs_diff(e_lora, e_full);
    println!(
        "modules_to_save (tied): embedding gradient norm {:.6}, vs full fine-tuning max diff {d:e}",
        l2(e_lora)
    );
    assert!(l2(e_lora) > 1e-3);
    assert!(d <= 1e-6);
    assert!(!g_lora.contains_key("embed_tokens.original"));
    let trainable: Vec<_> = g_lora.keys().filter(|k| !k.contains("lora_")).collect();
    assert_eq!(trainable, vec!["embed_tokens.weight"]);

    // "Train": move the embeddings and B, then save and reload.
    let plain = Device::flex();
    let (model, _) =
        load_pretrained(&tiny_qwen2(), &AdapterSpec::Lora(cfg.clone()), &plain).unwrap();
    let mut model = perturbed(model, &plain);
    let e = model.embed_tokens.weight.val();
    let moved = e.clone() + e.clone().mul_scalar(0.3).sin().mul_scalar(0.02);
    model.embed_tokens.weight = burn::module::Param::from_tensor(moved);
    let dir = temp_dir("mts-tied");
    save_peft_adapter(&model, &cfg, "base", &dir).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["modules_to_save"],
        serde_json::json!(["embed_tokens", "lm_head"])
    );
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (te, th) = (
        st.tensor("base_model.model.model.embed_tokens.weight")
            .unwrap(),
        st.tensor("base_model.model.lm_head.weight").unwrap(),
    );
    assert_eq!(
        (te.shape(), th.shape()),
        (&[8192usize, 256][..], &[8192usize, 256][..])
    );
    assert_eq!(te.data(), th.data());
    let saved: Vec<f32> = te
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(saved, to_vec(model.embed_tokens.weight.val()));

    let (base, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &plain).unwrap();
    let base_logits = logits(&base, &plain);
    let reloaded = load_peft_adapter(base, &dir).unwrap();
    assert!(
        reloaded.lm_head.is_none(),
        "an adapter with one matrix keeps the model tied"
    );
    assert_eq!(reloaded.trained_beside_adapters(), (true, false));
    let ours = logits(&model, &plain);
    assert!(max_abs_diff(&ours, &base_logits) > 1e-3);
    assert_eq!(max_abs_diff(&ours, &logits(&reloaded, &plain)), 0.0);
    let (l0, l1) = (loss(&model, &plain), loss(&reloaded, &plain));
    println!("modules_to_save (tied) save -> load: loss {l0} vs {l1}");
    assert_eq!(l0, l1);
    // Adapters off: the base, embeddings included.
    let off = ytrainer_models::lora::without_adapters(|| logits(&reloaded, &plain));
    assert_eq!(max_abs_diff(&off, &base_logits), 0.0);

    let merged_dir = temp_dir("mts-tied-merged");
    save_hf_checkpoint(&model, &model.config, &merged_dir).unwrap();
    let (merged, _) = load_pretrained(&merged_dir, &AdapterSpec::Full, &plain).unwrap();
    assert!(merged.lm_head.is_none());
    let diff = max_abs_diff(&ours, &logits(&merged, &plain));
    println!("modules_to_save (tied) merged vs adapter forward: {diff:e}");
    assert!(diff <= 1e-5);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&merged_dir);
}

fn untied_config() -> HfConfig {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": false,
    });
    HfConfig::from_json_str(&json.to_string()).unwrap()
}

/// `modules_to_save = ["lm_head"]` on an untied model: only the head (and LoRA) is trained, its gradient equals
/// full fine-tuning's; it is saved as `base_model.model.lm_head.weight` `[vocab, hidden]`, loads back to the same
/// logits, merges to the same logits, and the adapters-off forward is the base.
#[test]
fn modules_to_save_head_on_an_untied_model() {
    let device = Device::flex().autodiff();
    let config = untied_config();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        modules_to_save: vec!["lm_head".into()],
        ..LoraConfig::default()
    };
    let model = init_random(&config, 5, &AdapterSpec::Lora(cfg.clone()), &device).unwrap();
    let full = init_random(&config, 5, &AdapterSpec::Full, &device).unwrap();
    assert_eq!(model.trained_beside_adapters(), (false, true));
    let grad_of = |m: &Decoder| {
        let input = plain_input(&ids(m), 2, IDS / 2, &device);
        let ce = per_token_ce(m.forward(&input), &input.input_ids).mean();
        grads_by_path(m, &ce.backward())
    };
    let (g_lora, g_full) = (grad_of(&model), grad_of(&full));
    let d = max_abs_diff(&g_lora["lm_head.weight"].1, &g_full["lm_head.weight"].1);
    println!("modules_to_save (untied head): head gradient vs full fine-tuning max diff {d:e}");
    assert!(d <= 1e-6);
    assert!(!g_lora.contains_key("embed_tokens.weight"));

    let plain = Device::flex();
    let model = init_random(&config, 5, &AdapterSpec::Lora(cfg.clone()), &plain).unwrap();
    let mut model = perturbed(model, &plain);
    let head = model.lm_head.as_mut().unwrap();
    let w = head.weight.val();
    head.weight = burn::module::Param::from_tensor(w.clone() + w.cos().mul_scalar(0.05));
    let dir = temp_dir("mts-untied");
    let base_dir = temp_dir("mts-untied-base");
    let base = init_random(&config, 5, &AdapterSpec::Full, &plain).unwrap();
    save_hf_checkpoint(&base, &config, &base_dir).unwrap();
    save_peft_adapter(&model, &cfg, "base", &dir).unwrap();
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("base_model.model.lm_head.weight")
            .unwrap()
            .shape(),
        &[97, 32]
    );
    assert!(
        st.tensor("base_model.model.model.embed_tokens.weight")
            .is_err()
    );
    let (base, _) = load_pretrained(&base_dir, &AdapterSpec::Full, &plain).unwrap();
    let base_logits = logits(&base, &plain);
    let reloaded = load_peft_adapter(base, &dir).unwrap();
    let ours = logits(&model, &plain);
    assert!(max_abs_diff(&ours, &base_logits) > 1e-3);
    assert_eq!(max_abs_diff(&ours, &logits(&reloaded, &plain)), 0.0);
    let off = ytrainer_models::lora::without_adapters(|| logits(&reloaded, &plain));
    assert_eq!(max_abs_diff(&off, &base_logits), 0.0);
    let merged_dir = temp_dir("mts-untied-merged");
    save_hf_checkpoint(&model, &model.config, &merged_dir).unwrap();
    let (merged, _) = load_pretrained(&merged_dir, &AdapterSpec::Full, &plain).unwrap();
    let diff = max_abs_diff(&ours, &logits(&merged, &plain));
    println!("modules_to_save (untied head) merged vs adapter forward: {diff:e}");
    assert!(diff <= 1e-5);
    for d in [dir, base_dir, merged_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A PEFT adapter made on a tied model with only `embed_tokens` in `modules_to_save` (PEFT then gives the
/// embeddings a trained copy and leaves the head as the base's): loading it unties the head so that the logits
/// are `hidden(new embeddings) · E_base^T`, not the tied `· E_new^T`.
#[test]
fn a_tied_adapter_with_embeddings_only_unties_the_head() {
    let device = Device::flex();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        modules_to_save: vec!["embed_tokens".into()],
        ..LoraConfig::default()
    };
    let (model, _) =
        load_pretrained(&tiny_qwen2(), &AdapterSpec::Lora(cfg.clone()), &device).unwrap();
    let mut model = perturbed(model, &device);
    let e = model.embed_tokens.weight.val();
    model.embed_tokens.weight =
        burn::module::Param::from_tensor(e.clone() + e.exp().mul_scalar(0.01));
    let dir = temp_dir("mts-embed-only");
    save_peft_adapter(&model, &cfg, "base", &dir).unwrap();
    // Rewrite it as PEFT would: only the embeddings listed and stored.
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "base_model.model.lm_head.weight")
        .collect();
    safetensors::serialize_to_file(kept, None, &dir.join("adapter_model.safetensors.new")).unwrap();
    std::fs::rename(
        dir.join("adapter_model.safetensors.new"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(dir.join("adapter_config.json"))
        .unwrap()
        .replace("\"lm_head\"", "")
        .replace("\"embed_tokens\",", "\"embed_tokens\"");
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    let (base, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &device).unwrap();
    let base_e = base.embed_tokens.weight.val();
    let reloaded = load_peft_adapter(base, &dir).unwrap();
    assert!(reloaded.lm_head.is_some());
    // Expected: the perturbed model with its head replaced by the base's table.
    let mut want = model.clone();
    want.lm_head = Some(ytrainer_models::decoder::LmHead {
        weight: burn::module::Param::from_tensor(base_e.transpose()),
        original: None,
    });
    let diff = max_abs_diff(&logits(&want, &device), &logits(&reloaded, &device));
    let tied_diff = max_abs_diff(&logits(&model, &device), &logits(&reloaded, &device));
    println!(
        "embeddings-only adapter on a tied model: vs untied expectation {diff:e}, vs tied {tied_diff:e}"
    );
    assert_eq!(diff, 0.0);
    assert!(tied_diff > 1e-4);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Names outside `embed_tokens` / `lm_head` are refused with the accepted names; DoRA and `modules_to_save` are
/// refused by the llama.cpp LoRA GGUF export, which cannot hold them.
#[test]
fn unsupported_modules_to_save_and_lora_gguf_are_clear_errors() {
    let device = Device::flex();
    let cfg = LoraConfig {
        modules_to_save: vec!["norm".into()],
        ..LoraConfig::default()
    };
    let err = load_pretrained(&tiny_qwen2(), &AdapterSpec::Lora(cfg), &device)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("\"norm\"") && err.contains("embed_tokens"),
        "{err}"
    );
    let (model, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Lora(dora(4)), &device).unwrap();
    let dir = temp_dir("dora-gguf");
    let err = ytrainer_models::gguf::export_lora_gguf(&model, &dir.join("a.gguf"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("DoRA") && err.contains("merge"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
