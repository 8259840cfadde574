//! Interop end to end through the binary: GGUF convert (tokenizer identical to transformers'), score parity
//! with transformers, greedy generation, render, merge (f32 / bf16, sharded), and bad input.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{Value, json};
use ytrainer_data::TokenizerWrapper;

fn smollm() -> PathBuf {
    assets().join("smollm2-135m-instruct")
}

fn gguf() -> PathBuf {
    smollm().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(smollm().join("reference.json")).unwrap())
        .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// `len` bytes from the start and from the middle of each text corpus (lossily cut to UTF-8), with its path.
fn corpus_chunks(len: usize) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(assets().join("corpora")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_none_or(|e| e != "txt") {
            continue;
        }
        let text = std::fs::read(&p).unwrap();
        for start in [0, text.len() / 2] {
            let end = (start + len).min(text.len());
            out.push((
                p.clone(),
                String::from_utf8_lossy(&text[start..end]).to_string(),
            ));
        }
    }
    out
}

/// Convert the GGUF, check the files, and that its tokenizer equals the shipped transformers one on the corpora.
#[test]
fn gguf_convert_writes_hf_dir_and_identical_tokenizer() {
    let tmp = TempDir::new("convert");
    let out = tmp.path().join("hf");
    let o = ytrainer_ok(&["convert", "--from", &s(&gguf()), "--to", &s(&out)]);
    assert!(stdout(&o).contains("converted"));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["rope_parameters"]["rope_theta"], 100000.0);
    assert_eq!(
        cfg["rope_theta"], 100000.0,
        "top-level spelling for transformers 4.x readers"
    );
    let tc: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let shipped_template = std::fs::read_to_string(smollm().join("chat_template.jinja")).unwrap();
    assert_eq!(tc["chat_template"].as_str().unwrap(), shipped_template);
    assert_eq!(tc["eos_token"], "<|im_end|>");

    let ours = TokenizerWrapper::from_file(&out.join("tokenizer.json")).unwrap();
    let theirs = TokenizerWrapper::from_file(&smollm().join("tokenizer.json")).unwrap();
    let mut checked = 0usize;
    // 64 KB from the start and the middle of each corpus.
    for (p, chunk) in corpus_chunks(65_536) {
        let a = ours.encode(&chunk).unwrap();
        let b = theirs.encode(&chunk).unwrap();
        if a != b {
            let i = a
                .iter()
                .zip(&b)
                .position(|(x, y)| x != y)
                .unwrap_or(a.len().min(b.len()));
            let lo = i.saturating_sub(5);
            panic!(
                "tokenization differs on {} at token {i}: ours {:?} {:?}, shipped {:?} {:?}",
                p.display(),
                &a[lo..(i + 5).min(a.len())],
                ours.decode(&a[lo..(i + 5).min(a.len())], false).unwrap(),
                &b[lo..(i + 5).min(b.len())],
                theirs.decode(&b[lo..(i + 5).min(b.len())], false).unwrap()
            );
        }
        assert_eq!(
            ours.decode(&a, false).unwrap(),
            theirs.decode(&b, false).unwrap()
        );
        checked += a.len();
    }
    let special = "<|im_start|>user\nHi 2024! ünïcödé 你好<|im_end|>\n";
    assert_eq!(
        ours.encode(special).unwrap(),
        theirs.encode(special).unwrap()
    );
    assert!(checked > 100_000, "only {checked} tokens compared");

    // GGUF -> HF -> reload: scoring the converted directory equals scoring the GGUF directly.
    let idsf = tmp.path().join("ids.json");
    std::fs::write(
        &idsf,
        json!([ids(&reference()["input_ids"][0])]).to_string(),
    )
    .unwrap();
    let a = tmp.path().join("a.jsonl");
    let b = tmp.path().join("b.jsonl");
    ytrainer_ok(&[
        "score",
        "--model",
        &s(&gguf()),
        "--ids-json",
        &s(&idsf),
        "--out",
        &s(&a),
    ]);
    ytrainer_ok(&[
        "score",
        "--model",
        &s(&out),
        "--ids-json",
        &s(&idsf),
        "--out",
        &s(&b),
    ]);
    assert_eq!(jsonl(&a), jsonl(&b));

    // `eval` takes the GGUF as run / score do, and measures what it measures on the converted directory.
    let eval = |model: &Path| -> Value {
        let o = ytrainer_ok(&[
            "eval",
            "--model",
            &s(model),
            "--data",
            "examples/quickstart/eval.jsonl",
            "--max-samples",
            "4",
            "--format",
            "json",
        ]);
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    let (on_gguf, on_dir) = (eval(&gguf()), eval(&out));
    assert!(on_gguf["datasets"][0]["supervised_loss"].as_f64().unwrap() > 0.0);
    assert_eq!(on_gguf["datasets"], on_dir["datasets"]);
}

#[test]
fn score_and_greedy_generation_match_transformers() {
    let tmp = TempDir::new("score");
    let r = reference();
    let idsf = tmp.path().join("ids.json");
    std::fs::write(&idsf, r["input_ids"].to_string()).unwrap();
    let out = tmp.path().join("scores.jsonl");
    ytrainer_ok(&[
        "score",
        "--model",
        &s(&gguf()),
        "--ids-json",
        &s(&idsf),
        "--out",
        &s(&out),
        "--top-k",
        "5",
    ]);
    let lines = jsonl(&out);
    assert_eq!(lines.len(), 2);
    let (mut worst, mut sum, mut n) = (0f64, 0f64, 0usize);
    for (b, line) in lines.iter().enumerate() {
        assert_eq!(line["index"], b);
        let toks = line["tokens"].as_array().unwrap();
        assert_eq!(toks.len(), 14);
        for (p, t) in toks.iter().enumerate() {
            assert_eq!(t["id"], r["input_ids"][b][p + 1]);
            let loss = t["loss"].as_f64().unwrap();
            worst = worst.max((loss - r["loss_per_token"][b][p].as_f64().unwrap()).abs());
            sum += loss;
            n += 1;
            let top: Vec<u32> = t["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x[0].as_u64().unwrap() as u32)
                .collect();
            assert_eq!(top, ids(&r["top5_ids"][b][p]), "top-5 at [{b}, {p}]");
            let rank = t["rank"].as_u64().unwrap();
            let in_top = top
                .iter()
                .position(|&i| i == t["id"].as_u64().unwrap() as u32);
            if let Some(k) = in_top {
                assert_eq!(rank, k as u64 + 1);
            }
            assert!(t["entropy"].as_f64().unwrap() >= 0.0 && t["prob"].as_f64().unwrap() <= 1.0);
            assert!(t["piece"].is_string());
        }
        let ppl = line["perplexity"].as_f64().unwrap();
        assert!((ppl - line["mean_loss"].as_f64().unwrap().exp()).abs() < 1e-9);
    }
    assert!(
        worst <= 2e-3,
        "per-token loss differs from transformers by {worst}"
    );
    assert!((sum / n as f64 - r["mean_loss"].as_f64().unwrap()).abs() <= 1e-3);

    // Greedy generation from the recorded prompt ids, token for token.
    let case = &r["greedy"]["The capital of France is"];
    let prompt = ids(&case["prompt_ids"]);
    let want = ids(&case["output_ids"]);
    let prompt_arg = prompt
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let n_new = (want.len() - prompt.len()).to_string();
    let o = ytrainer_ok(&[
        "generate",
        "--model",
        &s(&gguf()),
        "--prompt-ids",
        &prompt_arg,
        "--max-new-tokens",
        &n_new,
        "--json",
    ]);
    let v: Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    assert_eq!(ids(&v["output_ids"]), want[prompt.len()..].to_vec());
    assert!(v["tokens_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn render_shows_template_output_and_supervised_tokens() {
    let tmp = TempDir::new("render");
    let tpl = tmp.path().join("t.jinja");
    std::fs::write(
        &tpl,
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}[assistant]{% endif %} {{ strftime_now('%d %b %Y') }} {{ mode }} {{ n + 1 }}",
    )
    .unwrap();
    let msgs = tmp.path().join("m.json");
    std::fs::write(&msgs, r#"[{"role": "user", "content": "Hi"}]"#).unwrap();
    let o = ytrainer_ok(&[
        "render",
        "--template",
        &s(&tpl),
        "--messages",
        &s(&msgs),
        "--add-generation-prompt",
        "--bos-token",
        "<s>",
        "--date",
        "2024-07-26",
        "--var",
        "mode=fast",
        "--var",
        "n=41",
    ]);
    assert_eq!(stdout(&o), "<s>[user] Hi\n[assistant] 26 Jul 2024 fast 42");

    // What training sees for a record of SmolLM2 (tokenizer and template only; no weights are read).
    let data = tmp.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Say hi\"}, {\"role\": \"assistant\", \"content\": \"Hi there\"}]}\n",
    )
    .unwrap();
    let o = ytrainer_ok(&[
        "render",
        "--model",
        &s(&smollm()),
        "--data",
        &s(&data),
        "--record",
        "0",
        "--format",
        "json",
    ]);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(
        v["text"]
            .as_str()
            .unwrap()
            .starts_with("<|im_start|>system\nYou are a helpful AI assistant")
    );
    let sup: String = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["supervised"] == true)
        .map(|t| t["piece"].as_str().unwrap())
        .collect();
    assert_eq!(sup, "Hi there<|im_end|>");
    // Text form marks the supervised tokens; a missing record is a clear error.
    let o = ytrainer_ok(&["render", "--model", &s(&smollm()), "--data", &s(&data)]);
    assert!(
        stdout(&o).contains("\u{ab}Hi there<|im_end|>\u{bb}"),
        "{}",
        stdout(&o)
    );
    assert_user_error(
        &ytrainer(&[
            "render",
            "--model",
            &s(&smollm()),
            "--data",
            &s(&data),
            "--record",
            "5",
        ]),
        "--record 5",
    );
}

/// A PEFT adapter for tiny-qwen2 with random (non-zero) A and B on q_proj and v_proj.
fn write_adapter(dir: &Path, d_out_v: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}).to_string(),
    )
    .unwrap();
    let mut tensors = Vec::new();
    let mut seed = 1u32;
    let mut rnd = move |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.1
            })
            .collect()
    };
    for l in 0..4 {
        for (m, d_out) in [("q_proj", 256), ("v_proj", d_out_v)] {
            let p = format!("base_model.model.model.layers.{l}.self_attn.{m}");
            let a = rnd(4 * 256);
            let b = rnd(d_out * 4);
            tensors.push(ytrainer_models::st::PendingTensor::new(
                format!("{p}.lora_A.weight"),
                vec![4, 256],
                move || a,
            ));
            tensors.push(ytrainer_models::st::PendingTensor::new(
                format!("{p}.lora_B.weight"),
                vec![d_out, 4],
                move || b,
            ));
        }
    }
    ytrainer_models::st::write_f32(&dir.join("adapter_model.safetensors"), tensors).unwrap();
}

fn losses(path: &Path) -> Vec<f64> {
    jsonl(path)
        .iter()
        .flat_map(|l| {
            l["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["loss"].as_f64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn merge_equals_base_plus_adapter_in_f32_and_shards_bf16() {
    let tmp = TempDir::new("merge");
    let base = assets().join("tiny-qwen2");
    let adapter = tmp.path().join("adapter");
    write_adapter(&adapter, 128);
    let idsf = tmp.path().join("ids.json");
    std::fs::write(&idsf, "[[1, 50, 300, 7000, 12, 99, 4000, 8191, 5, 6]]").unwrap();
    let with_adapter = tmp.path().join("a.jsonl");
    ytrainer_ok(&[
        "score",
        "--model",
        &s(&base),
        "--adapter",
        &s(&adapter),
        "--ids-json",
        &s(&idsf),
        "--out",
        &s(&with_adapter),
    ]);
    let plain = tmp.path().join("p.jsonl");
    ytrainer_ok(&[
        "score",
        "--model",
        &s(&base),
        "--ids-json",
        &s(&idsf),
        "--out",
        &s(&plain),
    ]);
    assert_ne!(
        losses(&with_adapter),
        losses(&plain),
        "the adapter must change the model"
    );

    let merged = tmp.path().join("merged");
    ytrainer_ok(&[
        "merge",
        "--model",
        &s(&base),
        "--adapter",
        &s(&adapter),
        "--out",
        &s(&merged),
    ]);
    assert!(merged.join("model.safetensors").is_file() && merged.join("tokenizer.json").is_file());
    let m = tmp.path().join("m.jsonl");
    ytrainer_ok(&[
        "score",
        "--model",
        &s(&merged),
        "--ids-json",
        &s(&idsf),
        "--out",
        &s(&m),
    ]);
    for (x, y) in losses(&m).iter().zip(losses(&with_adapter)) {
        assert!((x - y).abs() <= 1e-5, "merged {x} vs base+adapter {y}");
    }

    // bf16, sharded at 4 MB: index + shards, loadable, close to f32.
    let half = tmp.path().join("merged-bf16");
    ytrainer_ok(&[
        "merge",
        "--model",
        &s(&base),
        "--adapter",
        &s(&adapter),
        "--out",
        &s(&half),
        "--dtype",
        "bf16",
        "--max-shard-size",
        "4MB",
    ]);
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(half.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(index["metadata"]["total_size"], 5_050_624 * 2);
    assert!(half.join("model-00001-of-00003.safetensors").is_file());
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(half.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    // RoPE in transformers 5's and transformers 4's spelling (tiny-qwen2 has only rope_parameters).
    assert_eq!(cfg["rope_parameters"]["rope_theta"], 1e6);
    assert_eq!(cfg["rope_theta"], 1e6);
    let h = tmp.path().join("h.jsonl");
    ytrainer_ok(&[
        "score",
        "--model",
        &s(&half),
        "--ids-json",
        &s(&idsf),
        "--out",
        &s(&h),
    ]);
    for (x, y) in losses(&h).iter().zip(losses(&m)) {
        assert!((x - y).abs() <= 0.05, "bf16 {x} vs f32 {y}");
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let tmp = TempDir::new("bad");
    let bytes = std::fs::read(gguf()).unwrap();
    let trunc = tmp.path().join("trunc.gguf");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    assert_user_error(
        &ytrainer(&[
            "convert",
            "--from",
            &s(&trunc),
            "--to",
            &s(&tmp.path().join("o")),
        ]),
        "truncated",
    );
    let magic = tmp.path().join("magic.gguf");
    std::fs::write(&magic, b"not a gguf at all, just text").unwrap();
    assert_user_error(
        &ytrainer(&[
            "convert",
            "--from",
            &s(&magic),
            "--to",
            &s(&tmp.path().join("o")),
        ]),
        "not a GGUF file",
    );
    assert_user_error(
        &ytrainer(&["score", "--model", &s(&trunc), "--ids-json", &s(&magic)]),
        "",
    );

    // A model directory without tokenizer.json.
    let notok = tmp.path().join("notok");
    std::fs::create_dir_all(&notok).unwrap();
    std::fs::copy(
        assets().join("tiny-qwen2/config.json"),
        notok.join("config.json"),
    )
    .unwrap();
    let idsf = tmp.path().join("ids.json");
    std::fs::write(&idsf, "[[1, 2, 3]]").unwrap();
    assert_user_error(
        &ytrainer(&["score", "--model", &s(&notok), "--ids-json", &s(&idsf)]),
        "missing tokenizer.json",
    );
    assert_user_error(
        &ytrainer(&["generate", "--model", &s(&notok), "--prompt", "hi"]),
        "missing tokenizer.json",
    );

    // An adapter made for another base (v_proj out 256 instead of 128).
    let adapter = tmp.path().join("adapter");
    write_adapter(&adapter, 256);
    let o = ytrainer(&[
        "score",
        "--model",
        &s(&assets().join("tiny-qwen2")),
        "--adapter",
        &s(&adapter),
        "--ids-json",
        &s(&idsf),
    ]);
    assert_user_error(&o, "v_proj.lora_B.weight");
    assert!(stderr(&o).contains("expected shape"), "{}", stderr(&o));
    let o = ytrainer(&[
        "merge",
        "--model",
        &s(&assets().join("tiny-qwen2")),
        "--adapter",
        &s(&adapter),
        "--out",
        &s(&tmp.path().join("m")),
        "--dtype",
        "f8",
    ]);
    assert_user_error(&o, "--dtype `f8`");

    // Token ids outside the vocabulary.
    std::fs::write(&idsf, "[[1, 2, 999999]]").unwrap();
    assert_user_error(
        &ytrainer(&[
            "score",
            "--model",
            &s(&assets().join("tiny-qwen2")),
            "--ids-json",
            &s(&idsf),
        ]),
        "outside the model's vocabulary",
    );
}

/// A GGUF v3 file from `(key, value)` metadata (strings, string arrays, f32 arrays, i32 arrays, u32, f32 and
/// bool values) and F32 tensors `(name, row-major shape, values)`, laid out as llama.cpp writes them.
fn gguf_file(kv: &[(&str, Value)], tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    fn put_str(o: &mut Vec<u8>, s: &str) {
        o.extend((s.len() as u64).to_le_bytes());
        o.extend(s.as_bytes());
    }
    let mut o = b"GGUF".to_vec();
    o.extend(3u32.to_le_bytes());
    o.extend((tensors.len() as u64).to_le_bytes());
    o.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut o, k);
        match v {
            Value::String(s) => {
                o.extend(8u32.to_le_bytes());
                put_str(&mut o, s);
            }
            Value::Bool(b) => {
                o.extend(7u32.to_le_bytes());
                o.push(*b as u8);
            }
            Value::Number(n) if n.is_u64() => {
                o.extend(4u32.to_le_bytes());
                o.extend((n.as_u64().unwrap() as u32).to_le_bytes());
            }
            Value::Number(n) => {
                o.extend(6u32.to_le_bytes());
                o.extend((n.as_f64().unwrap() as f32).to_le_bytes());
            }
            Value::Object(a) => {
                // {"f32": [...]}, {"i32": [...]} or {"str": [...]}
                let (ty, items) = a.iter().next().unwrap();
                let items = items.as_array().unwrap();
                o.extend(9u32.to_le_bytes());
                let code = match ty.as_str() {
                    "f32" => 6u32,
                    "i32" => 5,
                    _ => 8,
                };
                o.extend(code.to_le_bytes());
                o.extend((items.len() as u64).to_le_bytes());
                for it in items {
                    match code {
                        6 => o.extend((it.as_f64().unwrap() as f32).to_le_bytes()),
                        5 => o.extend((it.as_i64().unwrap() as i32).to_le_bytes()),
                        _ => put_str(&mut o, it.as_str().unwrap()),
                    }
                }
            }
            _ => unreachable!(),
        }
    }
    let mut offset = 0u64;
    for (name, shape, values) in tensors {
        put_str(&mut o, name);
        o.extend((shape.len() as u32).to_le_bytes());
        for &d in shape.iter().rev() {
            o.extend((d as u64).to_le_bytes());
        }
        o.extend(0u32.to_le_bytes()); // F32
        o.extend(offset.to_le_bytes());
        offset += (4 * values.len() as u64).div_ceil(32) * 32;
    }
    let pad = |o: &mut Vec<u8>| o.resize(o.len().div_ceil(32) * 32, 0);
    pad(&mut o);
    for (_, _, values) in tensors {
        o.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        pad(&mut o);
    }
    o
}

/// The shipped Llama tokenizer (`tokenizers/llama-spm/tokenizer.json`) as llama.cpp's converter stores it in a
/// GGUF: pieces, SentencePiece-style scores (minus the order a piece was learnt in: the rank of the first merge
/// that makes it; control, unknown and byte pieces 0; single characters last; Llama's hand-added runs of `▁` all
/// -1e9) and token types. Also returns the tokenizer.json.
fn llama_spm_metadata() -> (Vec<(&'static str, Value)>, Value) {
    let dir = assets().join("tokenizers/llama-spm");
    let tj: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tj["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let merges = tj["model"]["merges"].as_array().unwrap();
    let mut rank = std::collections::HashMap::new();
    for (i, m) in merges.iter().enumerate() {
        let (l, r) = (m[0].as_str().unwrap(), m[1].as_str().unwrap());
        rank.entry(format!("{l}{r}")).or_insert(i);
    }
    let ty = |id: usize, t: &str| -> i64 {
        match id {
            0 => 2,
            1 | 2 => 3,
            _ if t.starts_with("<0x") && t.len() == 6 => 6,
            _ => 1,
        }
    };
    let scores: Vec<f64> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| match (ty(id, t), rank.get(t)) {
            (1, _) if t.chars().count() > 1 && t.chars().all(|c| c == '\u{2581}') => -1e9,
            (1, Some(&r)) => -(r as f64),
            (1, None) => -((merges.len() + id) as f64),
            _ => 0.0,
        })
        .collect();
    let types: Vec<i64> = tokens.iter().enumerate().map(|(i, t)| ty(i, t)).collect();
    let meta = vec![
        ("tokenizer.ggml.model", json!("llama")),
        ("tokenizer.ggml.tokens", json!({ "str": tokens })),
        ("tokenizer.ggml.scores", json!({ "f32": scores })),
        ("tokenizer.ggml.token_type", json!({ "i32": types })),
        ("tokenizer.ggml.bos_token_id", json!(1)),
        ("tokenizer.ggml.eos_token_id", json!(2)),
        ("tokenizer.ggml.unknown_token_id", json!(0)),
    ];
    (meta, tj)
}

/// The SentencePiece path: a `tokenizer.ggml.model = llama` vocabulary (pieces, scores, token types, as
/// llama.cpp's converter writes them for Llama 2) rebuilds into a tokenizer whose merges equal transformers'
/// Llama tokenizer.json, that passes llama.cpp's llama-spm test vectors and tokenizes and decodes the corpora
/// like the shipped tokenizer.json.
#[test]
fn gguf_sentencepiece_vocabulary_rebuilds_the_llama_tokenizer() {
    let dir = assets().join("tokenizers/llama-spm");
    let (mut meta, tj) = llama_spm_metadata();
    meta.insert(0, ("general.architecture", json!("llama")));
    let tmp = TempDir::new("spm-gguf");
    let path = tmp.path().join("vocab.gguf");
    std::fs::write(&path, gguf_file(&meta, &[])).unwrap();
    let gguf = ytrainer_models::gguf::GgufFile::open(&path).unwrap();
    let rebuilt = ytrainer_models::gguf::gguf_tokenizer(&gguf).unwrap();
    assert_eq!(rebuilt.bos_token.as_deref(), Some("<s>"));
    assert_eq!(rebuilt.eos_token.as_deref(), Some("</s>"));
    assert_eq!(rebuilt.unk_token.as_deref(), Some("<unk>"));
    let rj: Value = serde_json::from_str(&rebuilt.tokenizer_json).unwrap();
    assert_eq!(rj["model"]["merges"], tj["model"]["merges"]);
    assert_eq!(rj["normalizer"], tj["normalizer"]);
    assert_eq!(rj["decoder"], tj["decoder"]);
    assert_eq!(rj["post_processor"], tj["post_processor"]);
    let rebuilt_path = tmp.path().join("tokenizer.json");
    std::fs::write(&rebuilt_path, &rebuilt.tokenizer_json).unwrap();
    let ours = TokenizerWrapper::from_file(&rebuilt_path).unwrap();
    let theirs = TokenizerWrapper::from_file(&dir.join("tokenizer.json")).unwrap();

    // llama.cpp's own test vectors for this vocabulary.
    let inp = std::fs::read_to_string(dir.join("ggml-vocab-llama-spm.gguf.inp")).unwrap();
    let out = std::fs::read_to_string(dir.join("ggml-vocab-llama-spm.gguf.out")).unwrap();
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    assert_eq!(texts.pop(), Some(""));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(texts.len(), lines.len());
    for (text, line) in texts.iter().zip(&lines) {
        let want: Vec<u32> = line
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        let got = ours.encode(text).unwrap();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(
            ours.decode(&got, false).unwrap(),
            theirs.decode(&want, false).unwrap()
        );
    }
    // The corpora: 16 KB from the start and the middle of each.
    let mut checked = 0usize;
    for (p, chunk) in corpus_chunks(16_384) {
        let a = ours.encode(&chunk).unwrap();
        assert_eq!(a, theirs.encode(&chunk).unwrap(), "{}", p.display());
        assert_eq!(
            ours.decode(&a, false).unwrap(),
            theirs.decode(&a, false).unwrap()
        );
        checked += a.len();
    }
    assert!(checked > 20_000, "only {checked} tokens compared");
    let special = "<s> Hi 2024! ünïcödé 你好 🦙</s>";
    assert_eq!(
        ours.encode(special).unwrap(),
        theirs.encode(special).unwrap()
    );
}

/// A SentencePiece model end to end: a tiny random Llama in a GGUF with the Llama tokenizer's vocabulary is
/// converted (tokenizer.json rebuilt, no warning) and scored directly; both score exactly like the converted
/// weights with the shipped `tokenizer.json` in place of the rebuilt one.
#[test]
fn sentencepiece_gguf_converts_and_scores_like_the_shipped_tokenizer() {
    let (mut meta, _) = llama_spm_metadata();
    let (vocab, h, inter) = (32000usize, 16usize, 32usize);
    meta.extend([
        ("general.architecture", json!("llama")),
        ("llama.embedding_length", json!(h)),
        ("llama.feed_forward_length", json!(inter)),
        ("llama.block_count", json!(1)),
        ("llama.attention.head_count", json!(2)),
        ("llama.attention.head_count_kv", json!(1)),
        ("llama.attention.layer_norm_rms_epsilon", json!(1e-5)),
        ("llama.rope.freq_base", json!(10000.0)),
        ("llama.context_length", json!(256)),
        ("llama.vocab_size", json!(vocab)),
    ]);
    // Small deterministic weights (a linear congruential sequence in [-0.5, 0.5) * scale).
    let mut state = 12345u64;
    let mut values = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    };
    let kv = h / 2;
    let tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = vec![
        ("token_embd.weight", vec![vocab, h], values(vocab * h, 2.0)),
        ("blk.0.attn_norm.weight", vec![h], vec![1.0; h]),
        ("blk.0.attn_q.weight", vec![h, h], values(h * h, 0.5)),
        ("blk.0.attn_k.weight", vec![kv, h], values(kv * h, 0.5)),
        ("blk.0.attn_v.weight", vec![kv, h], values(kv * h, 0.5)),
        ("blk.0.attn_output.weight", vec![h, h], values(h * h, 0.5)),
        ("blk.0.ffn_norm.weight", vec![h], vec![1.0; h]),
        (
            "blk.0.ffn_gate.weight",
            vec![inter, h],
            values(inter * h, 0.5),
        ),
        (
            "blk.0.ffn_up.weight",
            vec![inter, h],
            values(inter * h, 0.5),
        ),
        (
            "blk.0.ffn_down.weight",
            vec![h, inter],
            values(h * inter, 0.5),
        ),
        ("output_norm.weight", vec![h], vec![1.0; h]),
    ];
    let tmp = TempDir::new("spm-model");
    let gguf = tmp.path().join("tiny-spm.gguf");
    std::fs::write(&gguf, gguf_file(&meta, &tensors)).unwrap();

    let hf = tmp.path().join("hf");
    let o = ytrainer_ok(&["convert", "--from", &s(&gguf), "--to", &s(&hf)]);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    let tc: Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (tc["bos_token"].as_str(), tc["eos_token"].as_str()),
        (Some("<s>"), Some("</s>"))
    );
    // `merge` from the GGUF (no adapter) writes what `convert` writes, and lists every file it wrote.
    let merged = tmp.path().join("merged");
    let o = ytrainer_ok(&["merge", "--model", &s(&gguf), "--out", &s(&merged)]);
    let listed: Vec<String> = stdout(&o)
        .lines()
        .skip(1)
        .map(|l| l.trim().to_string())
        .collect();
    let mut names: Vec<String> = std::fs::read_dir(&merged)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let mut converted: Vec<String> = std::fs::read_dir(&hf)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    converted.sort();
    assert_eq!(names, converted);
    assert!(
        names.contains(&"generation_config.json".to_string()),
        "{names:?}"
    );
    let mut listed_names: Vec<String> = listed
        .iter()
        .map(|l| {
            Path::new(l)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string()
        })
        .collect();
    listed_names.sort();
    assert_eq!(
        listed_names,
        names,
        "merge lists every file it wrote:\n{}",
        stdout(&o)
    );
    for f in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert_eq!(
            std::fs::read_to_string(merged.join(f)).unwrap(),
            std::fs::read_to_string(hf.join(f)).unwrap(),
            "{f}"
        );
    }
    // The same weights with the shipped tokenizer.
    let shipped = tmp.path().join("shipped");
    std::fs::create_dir_all(&shipped).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(hf.join(f), shipped.join(f)).unwrap();
    }
    std::fs::copy(
        assets().join("tokenizers/llama-spm/tokenizer.json"),
        shipped.join("tokenizer.json"),
    )
    .unwrap();

    let data = tmp.path().join("text.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"The quick brown fox jumps over the lazy dog.\"}\n\
         {\"text\": \"  Leading spaces, ünïcödé, 你好 and 🦙 byte fallback; tabs\\tand\\nnewlines.\"}\n",
    )
    .unwrap();
    let score = |model: &Path, name: &str| -> Vec<Value> {
        let out = tmp.path().join(name);
        ytrainer_ok(&[
            "score",
            "--model",
            &s(model),
            "--data",
            &s(&data),
            "--out",
            &s(&out),
        ]);
        jsonl(&out)
    };
    let (direct, converted, reference) = (
        score(&gguf, "direct.jsonl"),
        score(&hf, "converted.jsonl"),
        score(&shipped, "shipped.jsonl"),
    );
    assert_eq!(reference.len(), 2);
    assert!(reference[1]["tokens"].as_array().unwrap().len() > 20);
    for got in [&direct, &converted] {
        for (a, b) in got.iter().zip(&reference) {
            let ids = |r: &Value| -> Vec<u64> {
                r["tokens"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t["id"].as_u64().unwrap())
                    .collect()
            };
            assert_eq!(ids(a), ids(b));
            assert!(
                (a["mean_loss"].as_f64().unwrap() - b["mean_loss"].as_f64().unwrap()).abs() < 1e-5
            );
        }
    }
}

/// Runs ytrainer from the repository root with `YTRAINER_CACHE` pointing into a test directory.
fn ytrainer_cached(cache: &Path, args: &[&str]) -> std::process::Output {
    let o = std::process::Command::new(bin())
        .args(args)
        .current_dir(root())
        .env("YTRAINER_CACHE", cache)
        .output()
        .expect("failed to start ytrainer");
    assert!(
        o.status.success(),
        "ytrainer {args:?} failed:\n{}",
        stderr(&o)
    );
    o
}

/// LoRA on the SmolLM2 Q4_1 GGUF trains on the quantised blocks (QLoRA) and follows the same per-step losses
/// and gradient norms as the same run over the dequantised f32 base (`--dequantize-base`); only the
/// tokenizer, config and template land in the cache, and no f32 copy of the weights is written anywhere.
#[test]
fn qlora_on_a_gguf_follows_the_dequantized_run() {
    let tmp = TempDir::new("qlora-run");
    let data = tmp.path().join("d.jsonl");
    let recs: Vec<String> = [
        (
            "What is a compiler?",
            "A program that translates source code into machine code.",
        ),
        ("Name a prime number.", "Seven is a prime number."),
        ("What colour is the sky?", "On a clear day the sky is blue."),
        ("Say hello.", "Hello! How can I help you today?"),
    ]
    .iter()
    .map(|(q, a)| {
        json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            .to_string()
    })
    .collect();
    std::fs::write(&data, recs.join("\n")).unwrap();
    let cache = tmp.path().join("cache");
    let run = |dir: &str, extra: &[&str]| -> Vec<Value> {
        let out = tmp.path().join(dir);
        let mut args = vec![
            "run",
            "--model",
            &*Box::leak(s(&gguf()).into_boxed_str()),
            "--data",
            &*Box::leak(s(&data).into_boxed_str()),
            "--loss",
            "nlirg",
            "--max-steps",
            "2",
            "--tokens-per-step",
            "16",
            "--set",
            "train.micro_batch_tokens=40",
            "--max-seq-len",
            "64",
            "--output-dir",
            &*Box::leak(s(&out).into_boxed_str()),
        ];
        args.extend_from_slice(extra);
        ytrainer_cached(&cache, &args);
        jsonl(&out.join("metrics.jsonl"))
            .into_iter()
            .filter(|l| l.get("step").is_some() && l.get("loss").is_some())
            .collect()
    };
    let quant = run("q", &[]);
    let f32_run = run("f", &["--dequantize-base"]);
    assert_eq!(quant.len(), 2, "{quant:?}");
    assert_eq!(quant.len(), f32_run.len());
    for (a, b) in quant.iter().zip(&f32_run) {
        for key in ["loss", "grad_norm"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-4 * y.abs().max(1.0),
                "step {}: {key} {x} (quantised base) vs {y} (f32 base)",
                a["step"]
            );
        }
    }
    // The quantised run converted only the tokenizer and config; the f32 run added the weights.
    let entries: Vec<PathBuf> = std::fs::read_dir(cache.join("gguf"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let dir = &entries[0];
    assert!(dir.join("config.json").is_file() && dir.join("tokenizer.json").is_file());
    assert!(
        dir.join("model.safetensors").is_file(),
        "written by --dequantize-base"
    );
    let run_bytes: u64 = walk(&tmp.path().join("q"))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        run_bytes < 200 << 20,
        "the QLoRA run directory holds {run_bytes} bytes: a copy of the base?"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `--quantize-base` is checked before anything loads: an unknown kind, a GGUF base and full fine-tuning are
/// refused with the key and what to do.
#[test]
fn quantize_base_bad_values_are_refused() {
    let tiny = s(&assets().join("tiny-qwen2"));
    let gg = s(&gguf());
    let data = s(&root().join("examples/quickstart/train.jsonl"));
    let base = |model: &str, extra: &[&str]| {
        let mut a = vec!["run", "--model", model, "--data", &data, "--max-steps", "1"];
        a.extend_from_slice(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let go = |v: Vec<String>| ytrainer(&v.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert_user_error(
        &go(base(&tiny, &["--quantize-base", "q3_k"])),
        "[model] quantize_base = \"q3_k\": expected \"q8_0\", \"q4_0\" or \"nf4\"",
    );
    assert_user_error(
        &go(base(&gg, &["--quantize-base", "q8_0"])),
        "is a GGUF file, which trains on its own quantisation; remove quantize_base",
    );
    assert_user_error(
        &go(base(
            &tiny,
            &["--quantize-base", "nf4", "--adapter", "full"],
        )),
        "needs a LoRA adapter",
    );
}

/// Runs ytrainer in `cwd`.
fn ytrainer_in(cwd: &Path, args: &[&str]) -> std::process::Output {
    let o = std::process::Command::new(bin())
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("failed to start ytrainer");
    assert!(
        o.status.success(),
        "ytrainer {args:?} in {} failed:\n{}",
        cwd.display(),
        stderr(&o)
    );
    o
}

/// A LoRA run given its base as a path relative to the directory it ran in exports an adapter whose
/// `base_model_name_or_path` is absolute, so the adapter loads onto it from any other directory;
/// `--base-model-id` records a hub id instead (in `adapter_config.json` and the model card).
#[test]
fn exported_adapter_names_its_base_by_an_absolute_path_or_the_given_id() {
    let tmp = TempDir::new("adapter-base");
    let work = tmp.path().join("work");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(assets().join("tiny-qwen2"), work.join("base")).unwrap();
    let data = s(&root().join("examples/quickstart/train.jsonl"));
    let train = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "run",
            "--model",
            "base",
            "--data",
            &data,
            "--max-steps",
            "1",
            "--max-seq-len",
            "64",
            "--set",
            "eval.max_samples=2",
            "--output-dir",
            out,
        ];
        args.extend_from_slice(extra);
        ytrainer_in(&work, &args);
        let text =
            std::fs::read_to_string(work.join(out).join("final/adapter_config.json")).unwrap();
        let cfg: Value = serde_json::from_str(&text).unwrap();
        let card = std::fs::read_to_string(work.join(out).join("final/README.md")).unwrap();
        (
            cfg["base_model_name_or_path"].as_str().unwrap().to_string(),
            card,
        )
    };
    let (base, card) = train("run", &[]);
    let base_path = Path::new(&base);
    assert!(base_path.is_absolute(), "relative base recorded: {base}");
    assert_eq!(
        base_path,
        assets().join("tiny-qwen2").canonicalize().unwrap(),
        "the base's real location"
    );
    assert!(base_path.join("config.json").is_file());
    assert!(card.contains(&format!("base_model: {base}")), "{card}");
    // From another working directory, the recorded base and the adapter load together.
    let adapter = s(&work.join("run/final"));
    let o = ytrainer_in(
        &elsewhere,
        &[
            "eval",
            "--model",
            &base,
            "--adapter",
            &adapter,
            "--data",
            &data,
            "--window",
            "64",
            "--max-samples",
            "2",
            "--format",
            "json",
        ],
    );
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["datasets"][0]["loss"].as_f64().unwrap().is_finite());

    let id = "HuggingFaceTB/SmolLM2-135M-Instruct";
    let (named, card) = train("named", &["--base-model-id", id]);
    assert_eq!(named, id);
    assert!(card.contains(&format!("base_model: {id}")), "{card}");
}

/// `generate` starts from the model's `generation_config.json` as transformers does (`do_sample` with its
/// temperature / top-p / repetition penalty / length, top-k 50 when unset), says so on stderr, and every flag
/// wins over the file; a broken file is an error naming it.
#[test]
fn generation_reads_generation_config_defaults_and_flags_override_them() {
    let tmp = TempDir::new("gen-config");
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let tiny = assets().join("tiny-qwen2");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        #[cfg(unix)]
        std::os::unix::fs::symlink(tiny.join(f), model.join(f)).unwrap();
    }
    let gen_cfg = model.join("generation_config.json");
    std::fs::write(
        &gen_cfg,
        r#"{"do_sample": true, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.3, "max_new_tokens": 5}"#,
    )
    .unwrap();
    let generate = |m: &Path, extra: &[&str]| -> (Value, String) {
        let mut args = vec![
            "generate",
            "--model",
            &*Box::leak(s(m).into_boxed_str()),
            "--prompt",
            "Hello",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = ytrainer_ok(&args);
        (serde_json::from_str(stdout(&o).trim()).unwrap(), stderr(&o))
    };
    let (out, err) = generate(&model, &[]);
    assert_eq!(out["new_tokens"], 5, "max_new_tokens from the file");
    assert!(
        err.contains(&format!(
            "sampling: temperature 0.7, top-k 50, top-p 0.9, repetition penalty 1.3, at most 5 new tokens \
             (temperature, top_p, repetition_penalty, max_new_tokens, do_sample from {})",
            gen_cfg.display()
        )),
        "{err}"
    );
    // Same seed, same sample.
    assert_eq!(generate(&model, &[]).0["output_ids"], out["output_ids"]);
    // Flags win: greedy with the file's penalty equals the plain model run greedily with that penalty.
    let (greedy, err) = generate(&model, &["--temperature", "0", "--max-new-tokens", "3"]);
    assert!(
        err.contains("sampling: greedy, repetition penalty 1.3, at most 3 new tokens"),
        "{err}"
    );
    let (plain, err) = generate(
        &tiny,
        &["--max-new-tokens", "3", "--repetition-penalty", "1.3"],
    );
    assert!(
        err.contains("sampling: greedy, repetition penalty 1.3, at most 3 new tokens\n"),
        "{err}"
    );
    assert_eq!(greedy["output_ids"], plain["output_ids"]);
    // A file that does not parse names itself.
    std::fs::write(&gen_cfg, r#"{"temperature": "hot"}"#).unwrap();
    let o = ytrainer(&["generate", "--model", &s(&model), "--prompt", "Hello"]);
    assert_user_error(&o, &format!("{}: invalid type", gen_cfg.display()));
}

/// Per-token losses of `model` on fixed ids (the first 2 rows of the SmolLM2 reference ids).
fn token_losses(model: &Path, tmp: &Path, tag: &str) -> Vec<f64> {
    let idsf = tmp.join("ids.json");
    std::fs::write(&idsf, reference()["input_ids"].to_string()).unwrap();
    let out = tmp.join(format!("{tag}.jsonl"));
    ytrainer_ok(&[
        "score",
        "--model",
        &s(model),
        "--ids-json",
        &s(&idsf),
        "--out",
        &s(&out),
    ]);
    jsonl(&out)
        .iter()
        .flat_map(|l| {
            l["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["loss"].as_f64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `export --to x.gguf`: the SmolLM2 GGUF (llama: q/k rows permuted back into llama.cpp's order, tokenizer
/// metadata carried over) exported in f32 re-imports to the same per-token losses bit for bit; the tiny Qwen2
/// checkpoint (tokenizer rebuilt from tokenizer.json, q/k/v biases) in f16 and q8_0 within their rounding.
#[test]
fn gguf_export_round_trips() {
    let tmp = TempDir::new("gguf-export");
    let out = tmp.path().join("smol-f32.gguf");
    let o = ytrainer_ok(&[
        "export",
        "--model",
        &s(&gguf()),
        "--to",
        &s(&out),
        "--type",
        "f32",
    ]);
    assert!(stdout(&o).contains("(f32, 272 tensors,"), "{}", stdout(&o));
    let a = token_losses(&gguf(), tmp.path(), "src");
    let b = token_losses(&out, tmp.path(), "f32");
    assert_eq!(a.len(), 28);
    assert_eq!(a, b, "f32 export changed the model");
    let src = ytrainer_models::gguf::GgufFile::open(&gguf()).unwrap();
    let back = ytrainer_models::gguf::GgufFile::open(&out).unwrap();
    for (k, v) in src
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
    {
        assert_eq!(back.metadata.get(k), Some(v), "{k}");
    }

    let tiny = assets().join("tiny-qwen2");
    let idsf = tmp.path().join("tiny-ids.json");
    std::fs::write(&idsf, "[[1, 5, 9, 200, 17, 42, 7, 300, 11, 3, 99, 64]]").unwrap();
    let mean = |m: &Path| -> f64 {
        let o = tmp.path().join("tiny.jsonl");
        ytrainer_ok(&[
            "score",
            "--model",
            &s(m),
            "--ids-json",
            &s(&idsf),
            "--out",
            &s(&o),
        ]);
        jsonl(&o)[0]["mean_loss"].as_f64().unwrap()
    };
    let base = mean(&tiny);
    for (ty, tol) in [("f16", 1e-4), ("q8_0", 1e-2)] {
        let p = tmp.path().join(format!("tiny-{ty}.gguf"));
        ytrainer_ok(&["export", "--model", &s(&tiny), "--to", &s(&p), "--type", ty]);
        let m = mean(&p);
        assert!(((m - base) / base).abs() < tol, "{ty}: {m} vs {base}");
        assert!(ty == "f16" || m != base, "q8_0 should round something");
    }
}

/// `export --lora-gguf`: a trained LoRA adapter as llama.cpp's LoRA GGUF (A `[r, in]`, B `[out, r]` per
/// projection, alpha in the metadata), and the export command's input errors.
#[test]
fn lora_gguf_export_and_errors() {
    let tmp = TempDir::new("lora-gguf");
    let tiny = assets().join("tiny-qwen2");
    let run = tmp.path().join("run");
    ytrainer_ok(&[
        "run",
        "--model",
        &s(&tiny),
        "--data",
        "examples/quickstart/train.jsonl",
        "--max-steps",
        "1",
        "--lora-r",
        "4",
        "--output-dir",
        &s(&run),
    ]);
    let out = tmp.path().join("adapter.gguf");
    ytrainer_ok(&[
        "export",
        "--model",
        &s(&tiny),
        "--adapter",
        &s(&run.join("final")),
        "--lora-gguf",
        &s(&out),
    ]);
    let g = ytrainer_models::gguf::GgufFile::open(&out).unwrap();
    assert_eq!(g.metadata["general.type"].as_str(), Some("adapter"));
    assert_eq!(g.metadata["adapter.type"].as_str(), Some("lora"));
    assert!(g.metadata["adapter.lora.alpha"].as_f64().unwrap() > 0.0);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).unwrap()).unwrap();
    let (hidden, layers) = (
        cfg["hidden_size"].as_u64().unwrap(),
        cfg["num_hidden_layers"].as_u64().unwrap() as usize,
    );
    let a = g
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_q.weight.lora_a")
        .unwrap();
    let b = g
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_q.weight.lora_b")
        .unwrap();
    assert_eq!(a.shape(), vec![4, hidden as usize]);
    assert_eq!(b.shape()[1], 4);
    assert_eq!(g.tensors.len() % (2 * layers), 0);

    // The merged model as a GGUF scores like base + adapter.
    let merged = tmp.path().join("merged.gguf");
    ytrainer_ok(&[
        "export",
        "--model",
        &s(&tiny),
        "--adapter",
        &s(&run.join("final")),
        "--to",
        &s(&merged),
        "--type",
        "f32",
    ]);
    let idsf = tmp.path().join("ids.json");
    std::fs::write(&idsf, "[[1, 5, 9, 200, 17, 42, 7, 300, 11, 3, 99, 64]]").unwrap();
    let mean = |extra: &[&str]| -> f64 {
        let o = tmp.path().join("s.jsonl");
        let mut args = vec![
            "score",
            "--ids-json",
            &*Box::leak(s(&idsf).into_boxed_str()),
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", &*Box::leak(s(&o).into_boxed_str())]);
        ytrainer_ok(&args);
        jsonl(&o)[0]["mean_loss"].as_f64().unwrap()
    };
    let with_adapter = mean(&[
        "--model",
        &*Box::leak(s(&tiny).into_boxed_str()),
        "--adapter",
        &*Box::leak(s(&run.join("final")).into_boxed_str()),
    ]);
    let from_gguf = mean(&["--model", &*Box::leak(s(&merged).into_boxed_str())]);
    assert!(
        ((with_adapter - from_gguf) / with_adapter).abs() < 1e-6,
        "{with_adapter} vs {from_gguf}"
    );
    assert_ne!(
        with_adapter,
        mean(&["--model", &*Box::leak(s(&tiny).into_boxed_str())])
    );

    assert_user_error(
        &ytrainer(&[
            "export",
            "--model",
            &s(&tiny),
            "--to",
            &s(&out),
            "--type",
            "q3_k",
        ]),
        "--type `q3_k`: expected f32, f16, q8_0 or q4_0",
    );
    assert_user_error(
        &ytrainer(&["export", "--model", &s(&tiny)]),
        "nothing to write: give --to FILE.gguf (the merged model) and/or --lora-gguf FILE.gguf (the adapter)",
    );
    assert_user_error(
        &ytrainer(&["export", "--model", &s(&tiny), "--lora-gguf", &s(&out)]),
        "--lora-gguf writes an adapter: give it with --adapter DIR",
    );
}

/// Inference on a quantised GGUF (score, eval, generate, sort) keeps the base in its blocks, as QLoRA training
/// does: the same numbers as the dequantised f32 copy (`YTRAINER_DEQUANTIZE=1`), byte for byte, at about half
/// the memory on SmolLM2 Q4_1 (282 vs 591 MB peak RSS).
#[test]
fn inference_on_a_quantised_gguf_equals_the_dequantised_copy() {
    let tmp = TempDir::new("score-quant");
    let data = tmp.path().join("eval8.jsonl");
    let text = std::fs::read_to_string(root().join("examples/quickstart/eval.jsonl")).unwrap();
    std::fs::write(&data, text.lines().take(8).collect::<Vec<_>>().join("\n")).unwrap();
    let run = |dequantize: &str| {
        let out = tmp.path().join(format!("scores-{dequantize}.jsonl"));
        let o = std::process::Command::new(bin())
            .args([
                "score",
                "--model",
                &s(&gguf()),
                "--data",
                &s(&data),
                "--top-k",
                "3",
                "--out",
                &s(&out),
            ])
            .env("YTRAINER_DEQUANTIZE", dequantize)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read_to_string(out).unwrap()
    };
    let (kept, f32_copy) = (run("0"), run("1"));
    assert_eq!(kept.lines().count(), 8);
    assert_eq!(kept, f32_copy);
}
