mod common;

use serde_json::{Map, Value};
use ytrainer_data::{
    ChatTemplate, Message, TokenizerWrapper, TrainOn, render_chat_spans, tokenize_chat,
    tokenize_chat_limited, tokenize_text,
};

fn tokenizer_for(a: &std::path::Path, name: &str) -> TokenizerWrapper {
    TokenizerWrapper::from_file(&common::template_dir(a, name).join("tokenizer.json")).unwrap()
}

/// For every oracle conversation: the segment-wise ids equal transformers' whole-text ids, except
/// where a BPE merge crosses the prompt/answer border (checked separately), and the mask is the
/// oracle's assistant content plus the `<|im_end|>` token.
#[test]
fn masks_match_oracle_assistant_content_plus_end_of_turn() {
    let a = assets_or_skip!();
    let o = common::oracle(&a);
    let mut checked = 0;
    let mut border_merges = Vec::new();
    for case in o["assistant_masks"].as_array().unwrap() {
        let name = case["template"].as_str().unwrap();
        let conv = case["conversation"].as_str().unwrap();
        let tok = tokenizer_for(&a, name);
        let t = ChatTemplate::from_model_dir(&common::template_dir(&a, name)).unwrap();
        let msgs = common::messages(&case["messages"]);
        let ex = tokenize_chat(&tok, &t, &msgs, TrainOn::AllAssistant, &Map::new()).unwrap();
        let mut oracle_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let mut rendered = case["rendered"].as_str().unwrap().to_string();
        assert_eq!(
            tok.encode(&rendered).unwrap(),
            oracle_ids,
            "{name}/{conv}: whole-text ids"
        );
        let mut oracle_mask: Vec<bool> = case["assistant_token_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v == 1)
            .collect();
        let mut offsets: Vec<(usize, usize)> =
            serde_json::from_value(case["offsets"].clone()).unwrap();
        if case["add_generation_prompt"] == true {
            // Training renders without the generation prompt: drop it (3 tokens, never supervised).
            let gp = "<|im_start|>assistant\n";
            rendered.truncate(rendered.len() - gp.len());
            let n = oracle_ids.len() - tok.encode(gp).unwrap().len();
            assert!(oracle_mask[n..].iter().all(|&m| !m));
            oracle_ids.truncate(n);
            oracle_mask.truncate(n);
            offsets.truncate(n);
        }
        assert_eq!(
            tok.decode(&ex.input_ids, false).unwrap(),
            rendered,
            "{name}/{conv}: decode"
        );
        if ex.input_ids != oracle_ids {
            border_merges.push(format!("{name}/{conv}"));
            continue;
        }
        // Expected: tokens overlapping [content start, content end + len("<|im_end|>")) (chars).
        let spans: Vec<(usize, usize)> = case["content_spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["char_span"][0].as_u64().unwrap() as usize,
                    s["char_span"][1].as_u64().unwrap() as usize + 10,
                )
            })
            .collect();
        let expected: Vec<bool> = offsets
            .iter()
            .map(|&(s, e)| spans.iter().any(|&(a, b)| e > a && s < b))
            .collect();
        assert_eq!(ex.targets, expected, "{name}/{conv}");
        // The oracle's (TRL generation-span) mask additionally holds the header's "\n" and the
        // newline after <|im_end|>; ours is exactly that minus those two tokens per turn.
        let mut trimmed = oracle_mask.clone();
        let mut t = 0;
        while t < trimmed.len() {
            if trimmed[t] {
                let mut e = t;
                while e < trimmed.len() && oracle_mask[e] {
                    e += 1;
                }
                trimmed[t] = false;
                trimmed[e - 1] = false;
                t = e;
            } else {
                t += 1;
            }
        }
        assert_eq!(
            ex.targets, trimmed,
            "{name}/{conv} vs oracle generation mask"
        );
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        for (i, &id) in ex.input_ids.iter().enumerate() {
            if ex.targets[i] && i + 1 < ex.input_ids.len() && !ex.targets[i + 1] {
                assert_eq!(
                    id, im_end,
                    "{name}/{conv}: a supervised run must end with <|im_end|>"
                );
            }
        }
        checked += 1;
    }
    // With these tokenizers no BPE merge crosses a prompt/answer border in the oracle conversations.
    assert!(border_merges.is_empty(), "{border_merges:?}");
    assert_eq!(checked, 16);
}

/// With the real Qwen2 vocabulary (151k tokens, which has "\n\n"), the oracle answer "\nOui..."
/// after the generation prompt "<|im_start|>assistant\n" merges across the border in whole-text
/// tokenization; we keep the prompt's "\n" (unsupervised, as inference sees it) and start the
/// answer with its own "\n".
#[test]
fn border_merge_keeps_the_mask_exact() {
    let a = assets_or_skip!();
    let o = common::oracle(&a);
    let case = o["assistant_masks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["template"] == "Qwen-Qwen2.5-7B-Instruct"
                && c["conversation"] == "e_whitespace_unicode"
                && c["add_generation_prompt"] == false
        })
        .unwrap();
    let tok = TokenizerWrapper::from_file(&a.join("tokenizers/qwen2/tokenizer.json")).unwrap();
    let t = ChatTemplate::from_model_dir(&a.join("tiny-qwen2")).unwrap();
    let msgs = common::messages(&case["messages"]);
    let ex = tokenize_chat(&tok, &t, &msgs, TrainOn::AllAssistant, &Map::new()).unwrap();
    let whole = tok.encode(case["rendered"].as_str().unwrap()).unwrap();
    assert_eq!(whole.len() + 1, ex.input_ids.len());
    let nl = tok.encode("\n").unwrap();
    let nlnl = tok.encode("\n\n").unwrap();
    assert_eq!((nl.len(), nlnl.len()), (1, 1));
    // Prompt part: identical to what inference tokenizes for the generation prompt.
    let prompt = t.render(&msgs[..1], true, &Map::new()).unwrap();
    let prompt_ids = tok.encode(&prompt).unwrap();
    assert_eq!(&ex.input_ids[..prompt_ids.len()], &prompt_ids[..]);
    assert_eq!(*prompt_ids.last().unwrap(), nl[0]);
    assert!(ex.targets[..prompt_ids.len()].iter().all(|&x| !x));
    // Answer part: starts with its own "\n", fully supervised through <|im_end|>.
    let answer = format!("{}<|im_end|>", msgs[1].content);
    let answer_ids = tok.encode(&answer).unwrap();
    let n = prompt_ids.len();
    assert_eq!(&ex.input_ids[n..n + answer_ids.len()], &answer_ids[..]);
    assert_eq!(ex.input_ids[n], nl[0]);
    assert!(ex.targets[n..n + answer_ids.len()].iter().all(|&x| x));
    assert_eq!(ex.num_targets(), answer_ids.len());
    // Whole-text tokenization has a single "\n\n" token there instead.
    assert_eq!(whole[n - 1], nlnl[0]);
}

/// A crafted template whose prompt ends in a space: whole-text pre-tokenization glues the space to
/// the answer's first word (" Paris"), segment-wise tokenization does not.
#[test]
fn crafted_border_space_is_not_supervised() {
    let a = assets_or_skip!();
    let tok = tokenizer_for(&a, "Qwen-Qwen2.5-7B-Instruct");
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content }}\n{% else %}A: {{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}",
        None,
        None,
    )
    .unwrap();
    let msgs = vec![
        Message::new("user", "Capital of France?"),
        Message::new("assistant", "Paris"),
    ];
    let ex = tokenize_chat(&tok, &t, &msgs, TrainOn::AllAssistant, &Map::new()).unwrap();
    let whole = tok
        .encode("Q: Capital of France?\nA: Paris<|im_end|>\n")
        .unwrap();
    assert_ne!(ex.input_ids, whole);
    let prompt_ids = tok.encode("Q: Capital of France?\nA: ").unwrap();
    let answer_ids = tok.encode("Paris<|im_end|>").unwrap();
    let tail = tok.encode("\n").unwrap();
    let expected: Vec<u32> = prompt_ids
        .iter()
        .chain(&answer_ids)
        .chain(&tail)
        .copied()
        .collect();
    assert_eq!(ex.input_ids, expected);
    let expected_mask: Vec<bool> = std::iter::repeat_n(false, prompt_ids.len())
        .chain(std::iter::repeat_n(true, answer_ids.len()))
        .chain(std::iter::repeat_n(false, tail.len()))
        .collect();
    assert_eq!(ex.targets, expected_mask);
    assert_eq!(
        tok.decode(
            &ex.input_ids[prompt_ids.len()..prompt_ids.len() + answer_ids.len()],
            false
        )
        .unwrap(),
        "Paris<|im_end|>"
    );
}

#[test]
fn train_on_variants() {
    let a = assets_or_skip!();
    let tok = tokenizer_for(&a, "SmolLM2-135M-Instruct");
    let t = ChatTemplate::from_model_dir(&a.join("smollm2-135m-instruct")).unwrap();
    let msgs = vec![
        Message::new("user", "one"),
        Message::new("assistant", "A1"),
        Message::new("user", "two"),
        Message::new("assistant", "A2"),
    ];
    let v = Map::new();
    let r = render_chat_spans(&t, &msgs, TrainOn::AllAssistant, &v).unwrap();
    let sup: Vec<&str> = r
        .spans
        .iter()
        .filter(|s| s.1)
        .map(|s| &r.text[s.0.clone()])
        .collect();
    assert_eq!(sup, ["A1<|im_end|>", "A2<|im_end|>"]);
    let r = render_chat_spans(&t, &msgs, TrainOn::LastAssistant, &v).unwrap();
    let sup: Vec<&str> = r
        .spans
        .iter()
        .filter(|s| s.1)
        .map(|s| &r.text[s.0.clone()])
        .collect();
    assert_eq!(sup, ["A2<|im_end|>"]);
    // Spans tile the text.
    let mut end = 0;
    for (range, _) in &r.spans {
        assert_eq!(range.start, end);
        end = range.end;
    }
    assert_eq!(end, r.text.len());
    let ex = tokenize_chat(&tok, &t, &msgs, TrainOn::Everything, &v).unwrap();
    assert_eq!(ex.input_ids, tok.encode(&r.text).unwrap());
    assert_eq!(ex.num_targets(), ex.len() - 1);
    assert!(!ex.targets[0]);
    assert_eq!(ex.position_ids, (0..ex.len() as u32).collect::<Vec<_>>());
    assert_eq!(ex.segment_ids, vec![1; ex.len()]);
}

#[test]
fn template_rewriting_history_is_a_clear_error() {
    let a = assets_or_skip!();
    let tok = tokenizer_for(&a, "Qwen-Qwen2.5-7B-Instruct");
    // Drops every assistant turn but the last (like reasoning templates drop old <think> blocks).
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        None,
        None,
    )
    .unwrap();
    let msgs = vec![
        Message::new("user", "one"),
        Message::new("assistant", "A1"),
        Message::new("user", "two"),
        Message::new("assistant", "A2"),
    ];
    let err = tokenize_chat(&tok, &t, &msgs, TrainOn::AllAssistant, &Map::new()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "conversation: the chat template renders turn 1 differently once later turns follow (rendered prompt is not a prefix of the rendered conversation); this template rewrites earlier turns (e.g. it drops reasoning) — use train_on = \"last_assistant\" or a training variant of the template"
    );
    let ex = tokenize_chat(&tok, &t, &msgs, TrainOn::LastAssistant, &Map::new()).unwrap();
    assert_eq!(
        tok.decode(
            &ex.input_ids
                .iter()
                .zip(&ex.targets)
                .filter(|p| *p.1)
                .map(|p| *p.0)
                .collect::<Vec<_>>(),
            false
        )
        .unwrap(),
        "A2<|im_end|>"
    );
}

/// The oracle's `{% generation %}`-tagged training templates render the same text as the originals.
#[test]
fn generation_tagged_templates_render_like_originals() {
    let a = assets_or_skip!();
    let o = common::oracle(&a);
    for (key, name) in [
        ("trl_qwen2_5_training_template", "Qwen-Qwen2.5-7B-Instruct"),
        ("smollm2_generation_template", "SmolLM2-135M-Instruct"),
    ] {
        let tagged = ChatTemplate::new(
            o["meta"][key].as_str().unwrap(),
            None,
            Some("<|im_end|>".into()),
        )
        .unwrap();
        for case in o["assistant_masks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["template"] == name)
        {
            let msgs = common::messages(&case["messages"]);
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            assert_eq!(
                tagged.render(&msgs, agp, &Map::new()).unwrap(),
                case["rendered"].as_str().unwrap(),
                "{key}"
            );
        }
    }
}

#[test]
fn tokenize_text_appends_eos() {
    let a = assets_or_skip!();
    let tok = tokenizer_for(&a, "Qwen-Qwen2.5-7B-Instruct");
    assert_eq!(tok.eos_id(), Some(8191));
    let ex = tokenize_text(&tok, "Hello world!", true).unwrap();
    assert_eq!(ex.input_ids, vec![39, 7153, 862, 0, 8191]);
    assert_eq!(ex.targets, vec![false, true, true, true, true]);
    let ex = tokenize_text(&tok, "Hello world!", false).unwrap();
    assert_eq!(ex.input_ids, vec![39, 7153, 862, 0]);
}

#[test]
fn tiny_qwen2_reference_tokenizer() {
    let a = assets_or_skip!();
    let tok = tokenizer_for(&a, "Qwen-Qwen2.5-7B-Instruct");
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(a.join("tiny-qwen2/reference_tokenizer.json")).unwrap(),
    )
    .unwrap();
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            c["decoded"].as_str().unwrap()
        );
        let tokens: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        let expected: Vec<String> = serde_json::from_value(c["tokens"].clone()).unwrap();
        assert_eq!(tokens, expected);
    }
}

fn llama_cpp_vectors(dir: &std::path::Path, stem: &str) -> (usize, usize) {
    let tok = TokenizerWrapper::from_file(&dir.join("tokenizer.json")).unwrap();
    let inp = std::fs::read_to_string(dir.join(format!("{stem}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("{stem}.gguf.out"))).unwrap();
    // llama.cpp's format: every string is followed by "\n__ggml_vocab_test__\n"; one line of ids each.
    let sep = "\n__ggml_vocab_test__\n";
    let mut texts: Vec<&str> = inp.split(sep).collect();
    assert_eq!(texts.pop(), Some(""));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(texts.len(), lines.len());
    let mut ok = 0;
    let mut bad = Vec::new();
    for (text, line) in texts.iter().zip(&lines) {
        let expected: Vec<u32> = line
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        let got = tok.encode(text).unwrap();
        if got == expected {
            ok += 1;
        } else {
            bad.push((text.to_string(), got, expected));
        }
    }
    assert!(bad.is_empty(), "{stem}: {bad:?}");
    (ok, texts.len())
}

#[test]
fn llama_cpp_qwen2_vectors() {
    let a = assets_or_skip!();
    let (ok, n) = llama_cpp_vectors(&a.join("tokenizers/qwen2"), "ggml-vocab-qwen2");
    assert_eq!((ok, n), (46, 46));
}

#[test]
fn llama_cpp_llama_spm_vectors() {
    let a = assets_or_skip!();
    let (ok, n) = llama_cpp_vectors(&a.join("tokenizers/llama-spm"), "ggml-vocab-llama-spm");
    assert_eq!((ok, n), (46, 46));
}

/// Issue 21: a record far longer than `max_seq_len` is only tokenized as far as it is kept. The limited
/// tokenization must give exactly the first tokens of the full one: for a long plain text (1 MB of the FOLDOC
/// corpus) and for a many-turn conversation (which also stops rendering turns early).
#[test]
fn limited_tokenization_keeps_exactly_the_first_tokens() {
    let a = assets_or_skip!();
    let tok = TokenizerWrapper::from_file(&a.join("tokenizers/qwen2/tokenizer.json")).unwrap();
    let text = std::fs::read_to_string(a.join("corpora/domain_computing_foldoc.txt")).unwrap();
    let text = &text[..1_000_000];
    let full = tok.encode(text).unwrap();
    for n in [1, 100, 5_000, 20_000] {
        let p = tok.encode_prefix(text, n).unwrap();
        assert!(p.len() >= n && p.len() < full.len(), "{n}: {}", p.len());
        assert_eq!(&p[..], &full[..p.len()], "n = {n}");
    }
    // shorter than the cut: the whole encoding
    assert_eq!(
        tok.encode_prefix(&text[..1000], 10).unwrap(),
        tok.encode(&text[..1000]).unwrap()
    );

    let t = ChatTemplate::from_model_dir(&a.join("tiny-qwen2")).unwrap();
    let mut msgs = Vec::new();
    for i in 0..200 {
        msgs.push(Message::new(
            "user",
            &format!(
                "question {i}: {}",
                text.get(i * 50..i * 50 + 40).unwrap_or("?")
            ),
        ));
        msgs.push(Message::new(
            "assistant",
            &format!(
                "answer {i}: {}",
                text.get(i * 70..i * 70 + 60).unwrap_or("!")
            ),
        ));
    }
    let whole = tokenize_chat(&tok, &t, &msgs, TrainOn::AllAssistant, &Map::new()).unwrap();
    for keep in [10, 300, 2_000] {
        let ex = tokenize_chat_limited(
            &tok,
            &t,
            &msgs,
            TrainOn::AllAssistant,
            &Map::new(),
            Some(keep),
        )
        .unwrap();
        assert!(
            ex.input_ids.len() > keep && ex.input_ids.len() < whole.input_ids.len(),
            "{keep}"
        );
        let n = ex.input_ids.len();
        assert_eq!(&ex.input_ids[..], &whole.input_ids[..n], "keep = {keep}");
        assert_eq!(&ex.targets[..], &whole.targets[..n], "keep = {keep}");
    }
}
