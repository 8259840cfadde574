//! Checkpoint and adapter I/O, configs and error messages.

mod common;

use std::path::Path;

use burn::prelude::*;
use common::*;
use safetensors::SafeTensors;
use ytrainer_models::{
    AdapterSpec, ArchSpec, Decoder, HfConfig, LoraConfig, ModelError, init_random,
    load_peft_adapter, load_pretrained, save_hf_checkpoint, save_peft_adapter,
};

fn logits(model: &Decoder, device: &Device) -> Vec<f32> {
    let ids: Vec<i64> = (0..24)
        .map(|i| (i * 733 + 5) % model.spec.vocab_size as i64)
        .collect();
    to_vec(model.forward(&plain_input(&ids, 2, 12, device)))
}

/// Gives every LoRA B a deterministic nonzero value, so that the adapter changes the outputs.
fn nonzero_b(model: Decoder, device: &Device) -> Decoder {
    let mut k = 0.0f32;
    model
        .try_map_linears(|_, lin| {
            let a = lin.lora_a.as_ref().unwrap().val();
            let [r, d_out] = lin.lora_b.as_ref().unwrap().val().dims();
            let b: Vec<f32> = (0..r * d_out)
                .map(|i| ((i as f32 * 0.37 + k).sin()) * 0.05)
                .collect();
            k += 1.0;
            let b = Tensor::from_data(TensorData::new(b, [r, d_out]), device);
            let scaling = lin.scaling;
            Ok::<_, ()>(lin.with_lora(a, b, scaling, 0.0))
        })
        .unwrap()
}

fn lora_model(device: &Device) -> Decoder {
    let (model, _) = load_pretrained(
        &tiny_qwen2(),
        &AdapterSpec::Lora(LoraConfig::default()),
        device,
    )
    .unwrap();
    nonzero_b(model, device)
}

#[test]
fn peft_adapter_round_trip_and_format() {
    let device = Device::flex();
    let model = lora_model(&device);
    let dir = temp_dir("peft");
    let files = save_peft_adapter(
        &model,
        &LoraConfig::default(),
        "shared/assets/tiny-qwen2",
        &dir,
    )
    .unwrap();
    assert_eq!(files.len(), 3);

    // adapter_config.json: PEFT's 41 fields in alphabetical order, with our values.
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    let config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(config.len(), 41);
    let keys_in_file_order: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("  \"").and_then(|l| l.split('"').next()))
        .collect();
    let mut sorted = keys_in_file_order.clone();
    sorted.sort();
    assert_eq!(
        keys_in_file_order, sorted,
        "keys are written in alphabetical order"
    );
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 8);
    assert_eq!(config["lora_alpha"], 16);
    assert_eq!(config["lora_dropout"], 0.0);
    assert_eq!(config["use_rslora"], false);
    assert_eq!(config["bias"], "none");
    assert_eq!(config["fan_in_fan_out"], false);
    assert_eq!(config["inference_mode"], true);
    assert_eq!(
        config["base_model_name_or_path"],
        "shared/assets/tiny-qwen2"
    );
    let mut targets: Vec<&str> = config["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        [
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj"
        ]
    );

    // adapter_model.safetensors: 56 F32 tensors, PEFT's saved key names, A [r, in], B [out, r].
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(metadata.metadata().as_ref().unwrap()["format"], "pt");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 56);
    let p = "base_model.model.model.layers.0";
    for (key, shape) in [
        (format!("{p}.self_attn.q_proj.lora_A.weight"), [8, 256]),
        (format!("{p}.self_attn.q_proj.lora_B.weight"), [256, 8]),
        (format!("{p}.self_attn.k_proj.lora_B.weight"), [128, 8]),
        (format!("{p}.self_attn.v_proj.lora_B.weight"), [128, 8]),
        (format!("{p}.self_attn.o_proj.lora_A.weight"), [8, 256]),
        (format!("{p}.mlp.gate_proj.lora_B.weight"), [704, 8]),
        (format!("{p}.mlp.up_proj.lora_B.weight"), [704, 8]),
        (format!("{p}.mlp.down_proj.lora_A.weight"), [8, 704]),
        (format!("{p}.mlp.down_proj.lora_B.weight"), [256, 8]),
    ] {
        let t = st.tensor(&key).unwrap_or_else(|_| panic!("missing {key}"));
        assert_eq!(t.shape(), shape, "{key}");
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
    }
    // A in the file is the transpose of Burn's [in, r].
    let a_file = st
        .tensor(&format!("{p}.self_attn.q_proj.lora_A.weight"))
        .unwrap();
    let a_file: Vec<f32> = a_file
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let a_ours = to_vec(
        model.layers[0]
            .self_attn
            .q_proj
            .lora_a
            .as_ref()
            .unwrap()
            .val(),
    );
    assert_eq!(a_file, transpose(&a_ours, 256, 8));

    // Loading the adapter onto a fresh base gives the same outputs and trains only A/B.
    let (base, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &device).unwrap();
    let reloaded = load_peft_adapter(base, &dir).unwrap();
    assert!(matches!(reloaded.adapter, AdapterSpec::Lora(ref c) if c.r == 8 && c.alpha == 16.0));
    let diff = max_abs_diff(&logits(&model, &device), &logits(&reloaded, &device));
    println!("PEFT round trip max abs diff: {diff:e}");
    assert_eq!(diff, 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn peft_adapter_load_freezes_base_on_autodiff() {
    let device = Device::flex().autodiff();
    let model = lora_model(&device);
    let dir = temp_dir("peft-ad");
    save_peft_adapter(&model, &LoraConfig::default(), "base", &dir).unwrap();
    let (base, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &device).unwrap();
    let reloaded = load_peft_adapter(base, &dir).unwrap();
    let trainable = ytrainer_models::trainable_param_count(&reloaded);
    assert_eq!(trainable, ytrainer_models::trainable_param_count(&model));
    for (path, _, requires_grad) in ytrainer_models::named_params(&reloaded) {
        let is_lora = path.ends_with("lora_a") || path.ends_with("lora_b");
        assert_eq!(requires_grad, is_lora, "{path}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn merged_hf_checkpoint_reloads_with_same_logits() {
    let device = Device::flex();
    let model = lora_model(&device);
    let dir = temp_dir("merged");
    save_hf_checkpoint(&model, &model.config, &dir).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.len(),
        50,
        "tied: no lm_head.weight, as transformers saves it"
    );
    assert!(st.names().iter().all(|n| !n.contains("lora")));
    let (merged, config) = load_pretrained(&dir, &AdapterSpec::Full, &device).unwrap();
    assert_eq!(config.tie_word_embeddings, Some(true));
    assert_eq!(config.rope_parameters, model.config.rope_parameters);
    assert_eq!(config.rope_theta, Some(1e6), "written at the top level too");
    let (ours, theirs) = (logits(&model, &device), logits(&merged, &device));
    let diff = max_abs_diff(&ours, &theirs);
    println!("merged checkpoint max abs logit diff: {diff:e}");
    assert!(diff <= 1e-4);
    // The adapter did change the model (B is nonzero).
    let (base, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &device).unwrap();
    assert!(max_abs_diff(&logits(&base, &device), &theirs) > 1e-2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes `tiny-qwen2` as two shards plus an index, with the reference `safetensors` writer.
fn write_sharded_copy(dir: &Path) {
    let bytes = std::fs::read(tiny_qwen2().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let tensors: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(tensors, None, &dir.join(&file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::copy(tiny_qwen2().join("config.json"), dir.join("config.json")).unwrap();
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let device = Device::flex();
    let dir = temp_dir("sharded");
    write_sharded_copy(&dir);
    let (single, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &device).unwrap();
    let (sharded, _) = load_pretrained(&dir, &AdapterSpec::Full, &device).unwrap();
    assert_eq!(logits(&single, &device), logits(&sharded, &device));
    let _ = std::fs::remove_dir_all(&dir);
}

fn tiny_config(json: serde_json::Value) -> HfConfig {
    serde_json::from_value(json).unwrap()
}

#[test]
fn qwen3_and_untied_llama_from_init_random() {
    let device = Device::flex();
    // Qwen3: q/k norms, head_dim (48) * heads (4) != hidden (128), no qkv bias.
    let qwen3 = tiny_config(serde_json::json!({
        "model_type": "qwen3", "vocab_size": 300, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 48,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true, "some_unknown_field": [1, 2]
    }));
    let model = init_random(&qwen3, 7, &AdapterSpec::Full, &device).unwrap();
    let (v, h, i, hd, layers) = (300, 128, 256, 48, 2);
    let (q, kv) = (4 * hd, 2 * hd);
    let expected = v * h + layers * (h * q + 2 * h * kv + q * h + 2 * hd + 3 * h * i + 2 * h) + h;
    assert_eq!(ytrainer_models::total_param_count(&model), expected);
    assert_eq!(model.spec.param_count(), expected);
    assert!(model.layers[0].self_attn.q_norm.is_some());
    assert!(model.layers[0].self_attn.q_proj.bias.is_none());
    let out = logits(&model, &device);
    assert!(out.iter().all(|x| x.is_finite()));
    // Deterministic in the seed.
    let again = init_random(&qwen3, 7, &AdapterSpec::Full, &device).unwrap();
    assert_eq!(out, logits(&again, &device));

    // Llama with an untied head and no biases.
    let llama = tiny_config(serde_json::json!({
        "model_type": "llama", "vocab_size": 320, "hidden_size": 96, "intermediate_size": 160,
        "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "eos_token_id": [1, 2]
    }));
    assert_eq!(llama.eos_token_ids(), [1, 2]);
    let model = init_random(&llama, 1, &AdapterSpec::Full, &device).unwrap();
    let (v, h, i, layers) = (320, 96, 160, 3);
    let kv = 3 * 16;
    let expected = 2 * v * h + layers * (h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h) + h;
    assert!(model.lm_head.is_some());
    assert_eq!(ytrainer_models::total_param_count(&model), expected);
    assert!(logits(&model, &device).iter().all(|x| x.is_finite()));

    // LoRA on the Llama: only A/B are trainable (checked on an autodiff device).
    let ad = Device::flex().autodiff();
    let lora = LoraConfig {
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        ..LoraConfig::default()
    };
    let model = init_random(&llama, 1, &AdapterSpec::Lora(lora), &ad).unwrap();
    assert_eq!(
        ytrainer_models::trainable_param_count(&model),
        layers * 8 * ((h + h) + (h + kv))
    );
    let names = ytrainer_models::named_params(&model);
    assert!(
        names
            .iter()
            .any(|(p, _, g)| p == "layers.0.self_attn.q_proj.lora_a" && *g)
    );
    assert!(
        names
            .iter()
            .any(|(p, _, g)| p == "layers.0.input_layernorm.weight" && !*g)
    );
}

#[test]
fn rope_theta_and_rope_parameters_are_equivalent() {
    let device = Device::flex();
    let base = serde_json::json!({
        "model_type": "qwen2", "vocab_size": 200, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6
    });
    let mut old = base.clone();
    old["rope_theta"] = 500000.0.into();
    let mut new = base.clone();
    new["rope_parameters"] = serde_json::json!({ "rope_theta": 500000.0, "rope_type": "default" });
    let a = init_random(&tiny_config(old), 3, &AdapterSpec::Full, &device).unwrap();
    let b = init_random(&tiny_config(new), 3, &AdapterSpec::Full, &device).unwrap();
    assert_eq!(a.spec.rope, b.spec.rope);
    assert_eq!(logits(&a, &device), logits(&b, &device));
    // And a different theta does change the outputs.
    let mut other = base;
    other["rope_theta"] = 10000.0.into();
    let c = init_random(&tiny_config(other), 3, &AdapterSpec::Full, &device).unwrap();
    assert_ne!(logits(&a, &device), logits(&c, &device));
}

/// A saved config.json carries RoPE in both spellings, transformers 5's `rope_parameters` and transformers 4's
/// top-level `rope_theta` (+ `rope_scaling` when scaled), whichever the source used, with equal values; and it
/// reads back to the same RoPE.
#[test]
fn saved_config_writes_rope_theta_at_the_top_level_and_in_rope_parameters() {
    let base = serde_json::json!({
        "model_type": "llama", "vocab_size": 200, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6
    });
    let llama3 = serde_json::json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192
    });
    let mut v5 = base.clone();
    v5["rope_parameters"] = serde_json::json!({ "rope_theta": 100000.0, "rope_type": "default" });
    let mut v4 = base.clone();
    v4["rope_theta"] = 100000.0.into();
    let mut v5_scaled = base.clone();
    v5_scaled["rope_parameters"] = llama3.clone();
    v5_scaled["rope_parameters"]["rope_theta"] = 500000.0.into();
    let mut v4_scaled = base.clone();
    v4_scaled["rope_theta"] = 500000.0.into();
    v4_scaled["rope_scaling"] = llama3.clone();
    for (name, src, theta, scaled) in [
        ("v5", v5, 100000.0, false),
        ("v4", v4, 100000.0, false),
        ("v5 llama3", v5_scaled, 500000.0, true),
        ("v4 llama3", v4_scaled, 500000.0, true),
    ] {
        let config = HfConfig::from_json_str(&src.to_string()).unwrap();
        let written: serde_json::Value = serde_json::from_str(&config.to_json_string()).unwrap();
        assert_eq!(written["rope_theta"], theta, "{name}: {written}");
        assert_eq!(written["rope_parameters"]["rope_theta"], theta, "{name}");
        let kind = if scaled { "llama3" } else { "default" };
        assert_eq!(written["rope_parameters"]["rope_type"], kind, "{name}");
        if scaled {
            for k in [
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ] {
                assert_eq!(written["rope_parameters"][k], llama3[k], "{name}: {k}");
                assert_eq!(written["rope_scaling"][k], llama3[k], "{name}: {k}");
            }
            assert_eq!(written["rope_scaling"]["rope_type"], "llama3", "{name}");
        } else {
            assert!(written.get("rope_scaling").is_none(), "{name}: {written}");
        }
        let back = HfConfig::from_json_str(&written.to_string()).unwrap();
        assert_eq!(back.rope().unwrap(), config.rope().unwrap(), "{name}");
        // Each spelling alone (what a reader of only one of them sees) resolves to the same RoPE.
        let mut only_v4 = written.clone();
        only_v4.as_object_mut().unwrap().remove("rope_parameters");
        let mut only_v5 = written.clone();
        for k in ["rope_theta", "rope_scaling"] {
            only_v5.as_object_mut().unwrap().remove(k);
        }
        for alone in [only_v4, only_v5] {
            let c = HfConfig::from_json_str(&alone.to_string()).unwrap();
            assert_eq!(c.rope().unwrap(), config.rope().unwrap(), "{name}: {alone}");
        }
    }
    // A config without any RoPE field keeps the class default implicit.
    let plain = HfConfig::from_json_str(&base.to_string()).unwrap();
    let written: serde_json::Value = serde_json::from_str(&plain.to_json_string()).unwrap();
    assert!(written.get("rope_theta").is_none() && written.get("rope_parameters").is_none());
}

/// A copy of tiny-qwen2 with `edit` applied to its config and tensors dropped by `keep`.
fn edited_copy(
    name: &str,
    edit: impl Fn(&mut serde_json::Value),
    keep: impl Fn(&str) -> bool,
) -> std::path::PathBuf {
    let dir = temp_dir(name);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_qwen2().join("config.json")).unwrap())
            .unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(tiny_qwen2().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<_> = st.tensors().into_iter().filter(|(n, _)| keep(n)).collect();
    safetensors::serialize_to_file(tensors, None, &dir.join("model.safetensors")).unwrap();
    dir
}

#[test]
fn errors_name_the_tensor_the_file_and_the_field() {
    let device = Device::flex();
    let missing = "model.layers.1.mlp.up_proj.weight";
    let dir = edited_copy("missing", |_| {}, |n| n != missing);
    let err = load_pretrained(&dir, &AdapterSpec::Full, &device).unwrap_err();
    assert!(matches!(err, ModelError::MissingTensor { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "tensor `{missing}` not found in {}: the checkpoint does not match its config.json",
            dir.join("model.safetensors").display()
        )
    );
    let _ = std::fs::remove_dir_all(&dir);

    let dir = edited_copy("shape", |c| c["intermediate_size"] = 700.into(), |_| true);
    let err = load_pretrained(&dir, &AdapterSpec::Full, &device).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "tensor `model.layers.0.mlp.gate_proj.weight` in {}: expected shape [700, 256], found [704, 256]",
            dir.join("model.safetensors").display()
        )
    );
    let _ = std::fs::remove_dir_all(&dir);

    let mut config = tiny_config(serde_json::json!({
        "model_type": "gpt2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2
    }));
    assert_eq!(
        ArchSpec::from_config(&config).unwrap_err().to_string(),
        "config.json: field `model_type`: unsupported architecture `gpt2`; supported: llama, mistral, qwen2, qwen3"
    );
    config.model_type = "llama".into();
    config.rope_parameters = Some(ytrainer_models::RopeParameters {
        rope_theta: Some(10000.0),
        rope_type: Some("yarn".into()),
        ..Default::default()
    });
    assert_eq!(
        ArchSpec::from_config(&config).unwrap_err().to_string(),
        "config.json: field `rope_parameters.rope_type`: RoPE type \"yarn\" is not supported; supported: \"default\", \"llama3\""
    );

    let empty = temp_dir("empty");
    std::fs::copy(tiny_qwen2().join("config.json"), empty.join("config.json")).unwrap();
    let err = load_pretrained(&empty, &AdapterSpec::Full, &device).unwrap_err();
    assert!(matches!(err, ModelError::NoWeights { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn bf16_and_f16_checkpoints_are_converted_to_f32() {
    // A model whose weights are exactly representable in bf16/f16 loads identically from either dtype.
    let device = Device::flex();
    let (model, config) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &device).unwrap();
    let dir = temp_dir("f32-source");
    save_hf_checkpoint(&model, &config, &dir).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (dtype, name) in [
        (safetensors::Dtype::BF16, "bf16"),
        (safetensors::Dtype::F16, "f16"),
    ] {
        let out = temp_dir(name);
        std::fs::copy(dir.join("config.json"), out.join("config.json")).unwrap();
        let converted: Vec<(String, Vec<u8>, Vec<usize>)> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| {
                let data: Vec<u8> = t
                    .data()
                    .chunks_exact(4)
                    .flat_map(|c| {
                        let x = f32::from_le_bytes(c.try_into().unwrap());
                        match dtype {
                            safetensors::Dtype::BF16 => half::bf16::from_f32(x).to_le_bytes(),
                            _ => half::f16::from_f32(x).to_le_bytes(),
                        }
                    })
                    .collect();
                (n, data, t.shape().to_vec())
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = converted
            .iter()
            .map(|(n, d, s)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(dtype, s.clone(), d).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
        let (loaded, _) = load_pretrained(&out, &AdapterSpec::Full, &device).unwrap();
        let emb = to_vec(loaded.embed_tokens.weight.val());
        let expected: Vec<f32> = to_vec(model.embed_tokens.weight.val())
            .into_iter()
            .map(|x| match dtype {
                safetensors::Dtype::BF16 => half::bf16::from_f32(x).to_f32(),
                _ => half::f16::from_f32(x).to_f32(),
            })
            .collect();
        assert_eq!(emb, expected, "{name}");
        let _ = std::fs::remove_dir_all(&out);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// rsLoRA: the branch is scaled by `alpha / sqrt(r)` (8 / 2 = 4 at r = 4, not 8 / 4 = 2); the adapter says
/// `use_rslora: true`, reloads to the same outputs, and merges to the same logits.
#[test]
fn rslora_adapter_round_trip_and_merge() {
    let device = Device::flex();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        use_rslora: true,
        ..LoraConfig::default()
    };
    let (model, _) =
        load_pretrained(&tiny_qwen2(), &AdapterSpec::Lora(cfg.clone()), &device).unwrap();
    let model = nonzero_b(model, &device);
    assert_eq!(model.layers[0].self_attn.q_proj.scaling, 4.0);
    let dir = temp_dir("rslora");
    save_peft_adapter(&model, &cfg, "base", &dir).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (&config["use_rslora"], &config["r"], &config["lora_alpha"]),
        (
            &serde_json::json!(true),
            &serde_json::json!(4),
            &serde_json::json!(8)
        )
    );
    let (base, _) = load_pretrained(&tiny_qwen2(), &AdapterSpec::Full, &device).unwrap();
    let reloaded = load_peft_adapter(base, &dir).unwrap();
    assert_eq!(reloaded.layers[0].self_attn.q_proj.scaling, 4.0);
    let ours = logits(&model, &device);
    assert_eq!(max_abs_diff(&ours, &logits(&reloaded, &device)), 0.0);
    // The same A and B at plain scaling give other outputs: the scaling is what the file's flag restores.
    let plain = model
        .clone()
        .try_map_linears(|_, lin| {
            let (a, b) = (
                lin.lora_a.as_ref().unwrap().val(),
                lin.lora_b.as_ref().unwrap().val(),
            );
            Ok::<_, ()>(lin.with_lora(a, b, 2.0, 0.0))
        })
        .unwrap();
    assert!(max_abs_diff(&ours, &logits(&plain, &device)) > 1e-3);
    let merged_dir = temp_dir("rslora-merged");
    save_hf_checkpoint(&model, &model.config, &merged_dir).unwrap();
    let (merged, _) = load_pretrained(&merged_dir, &AdapterSpec::Full, &device).unwrap();
    assert!(max_abs_diff(&ours, &logits(&merged, &device)) <= 1e-4);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&merged_dir);
}
