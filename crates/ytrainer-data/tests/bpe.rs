mod common;

use serde_json::Map;
use ytrainer_data::{
    CHATML_SPECIAL_TOKENS, CHATML_TEMPLATE, ChatTemplate, Message, TokenizerWrapper, TrainOn,
    tokenize_chat, train_byte_level_bpe,
};

const TEXT: &[&str] = &[
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs!",
    "def add(a, b):\n    return a + b  # 123 4567\n",
    "Héllo wörld 👋 — ça va? 日本語も話せます。\n\n\tTabs and  double  spaces.",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
];

#[test]
fn training_is_deterministic_and_round_trips() {
    let a = train_byte_level_bpe(TEXT, 400, &CHATML_SPECIAL_TOKENS).unwrap();
    let b = train_byte_level_bpe(TEXT, 400, &CHATML_SPECIAL_TOKENS).unwrap();
    assert_eq!(a, b);
    let tok = TokenizerWrapper::from_json_str(&a).unwrap();
    assert_eq!(tok.vocab_size(), 400);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(397));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(398));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(399));
    assert_eq!(tok.eos_id(), Some(399));
    assert_eq!(
        tok.token_to_id("!"),
        Some(0),
        "GPT-2 byte order, as in Qwen2's vocabulary"
    );
    for t in TEXT.iter().chain(&["unseen wörds ✓ 42", "", " ", "\n\n\n"]) {
        let ids = tok.encode(t).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), *t);
    }
    // Merges compress the training text.
    let ids = tok.encode(TEXT[0]).unwrap();
    assert!(ids.len() < TEXT[0].len() / 2, "{}", ids.len());
    // Special tokens stay single tokens inside text.
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>").unwrap();
    assert_eq!(ids[0], 398);
    assert_eq!(*ids.last().unwrap(), 399);
    // Different vocab sizes give different (prefix-consistent) tokenizers.
    let small = train_byte_level_bpe(TEXT, 300, &CHATML_SPECIAL_TOKENS).unwrap();
    assert_ne!(small, a);
}

#[test]
fn pre_tokenizer_matches_tiny_qwen2() {
    let a = assets_or_skip!();
    let j = train_byte_level_bpe(TEXT, 300, &CHATML_SPECIAL_TOKENS).unwrap();
    let ours: serde_json::Value = serde_json::from_str(&j).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(a.join("tiny-qwen2/tokenizer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ours["pre_tokenizer"], theirs["pre_tokenizer"]);
    assert_eq!(ours["decoder"], theirs["decoder"]);
}

#[test]
fn vocab_too_small_is_an_error() {
    assert_eq!(
        train_byte_level_bpe(TEXT, 258, &CHATML_SPECIAL_TOKENS)
            .unwrap_err()
            .to_string(),
        "invalid option: vocab_size = 258 is too small: byte-level BPE needs 256 byte tokens plus 3 special tokens (259)"
    );
}

#[test]
fn chatml_template_with_trained_tokenizer() {
    let tok = TokenizerWrapper::from_json_str(
        &train_byte_level_bpe(TEXT, 350, &CHATML_SPECIAL_TOKENS).unwrap(),
    )
    .unwrap();
    let t = ChatTemplate::new(CHATML_TEMPLATE, None, Some("<|im_end|>".into())).unwrap();
    let msgs = vec![
        Message::new("system", "S"),
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello there"),
    ];
    let v = Map::new();
    assert_eq!(
        t.render(&msgs, false, &v).unwrap(),
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there<|im_end|>\n"
    );
    assert_eq!(
        t.render(&msgs[..2], true, &v).unwrap(),
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ex = tokenize_chat(&tok, &t, &msgs, TrainOn::AllAssistant, &v).unwrap();
    let sup: Vec<u32> = ex
        .input_ids
        .iter()
        .zip(&ex.targets)
        .filter(|p| *p.1)
        .map(|p| *p.0)
        .collect();
    assert_eq!(tok.decode(&sup, false).unwrap(), "Hello there<|im_end|>");
}

#[test]
fn trains_on_a_real_corpus_quickly() {
    let a = assets_or_skip!();
    let text = std::fs::read_to_string(a.join("corpora/general_en_devils_dictionary.txt")).unwrap();
    let sample: String = text.chars().take(60_000).collect();
    let start = std::time::Instant::now();
    let j = train_byte_level_bpe(&[&sample], 1024, &CHATML_SPECIAL_TOKENS).unwrap();
    let tok = TokenizerWrapper::from_json_str(&j).unwrap();
    assert_eq!(tok.vocab_size(), 1024);
    let ids = tok.encode(&sample).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), sample);
    assert!(
        ids.len() * 2 < sample.len(),
        "{} tokens for {} bytes",
        ids.len(),
        sample.len()
    );
    assert!(start.elapsed().as_secs() < 20);
}
