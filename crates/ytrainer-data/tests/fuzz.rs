//! Bounded mutation fuzzing of the text inputs a user or a model file hands us (issue 21): data records in every
//! container (JSON lines, JSON, CSV, text), preference pairs, and chat templates. Valid inputs get random edits
//! made of the syntax that breaks parsers (brackets, quotes, escapes, huge numbers, endless loops for
//! templates) and every case must end in a value or an error, never a panic; templates run under their work
//! limit, so a case can neither hang nor exhaust memory. Deterministic (seeded); `YTRAINER_FUZZ_ITERS` raises
//! the number of cases per input (CI runs the default).

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Map;
use ytrainer_data::{ChatTemplate, Message, load_pairs, parse_records};

fn iters() -> usize {
    std::env::var("YTRAINER_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// Fragments that parsers and template engines treat specially.
const FRAGMENTS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    "\\",
    "\\u0000",
    "\\ud800",
    ",",
    ":",
    "\n",
    "\r\n",
    "\t",
    "null",
    "true",
    "-1",
    "1e999",
    "-0",
    "18446744073709551616",
    "\"weight\": -1",
    "\"role\": 7",
    "\"content\": []",
    "{{",
    "}}",
    "{%",
    "%}",
    "{% for i in range(100000) %}{% for j in range(100000) %}",
    "{% endfor %}{% endfor %}",
    "{{ messages[99999] }}",
    "{{ 'x' * 1000000000 }}",
    "{% set s = s ~ s %}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "🎉",
    "\u{feff}",
    "é",
    ",,,",
    "\"\"",
    "'",
    "#",
    "--",
];

/// One random edit of `text` (on character boundaries, so the result stays valid UTF-8 as files do after the
/// UTF-8 check).
fn mutate(rng: &mut ChaCha8Rng, text: &str) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for _ in 0..rng.random_range(1..5) {
        let at = rng.random_range(0..=chars.len());
        match rng.random_range(0..4) {
            0 => {
                let f = FRAGMENTS[rng.random_range(0..FRAGMENTS.len())];
                chars.splice(at..at, f.chars());
            }
            1 => {
                let end = (at + rng.random_range(0..32)).min(chars.len());
                chars.drain(at..end);
            }
            2 => {
                let end = (at + rng.random_range(0..64)).min(chars.len());
                let span: Vec<char> = chars[at..end].to_vec();
                chars.splice(at..at, span);
            }
            _ => chars.truncate(at),
        }
    }
    chars.into_iter().collect()
}

/// Runs `check` on `iters()` mutations of `seed`; a panic fails naming the case (its text is kept in a file).
fn fuzz(name: &str, seed: &str, check: impl Fn(&str)) {
    let mut rng = ChaCha8Rng::seed_from_u64(name.len() as u64 * 7919);
    for case in 0..iters() {
        let text = mutate(&mut rng, seed);
        if catch_unwind(AssertUnwindSafe(|| check(&text))).is_err() {
            let keep = common::scratch(&format!("fuzz-{name}-case{case}")).join(name);
            std::fs::write(&keep, &text).unwrap();
            panic!(
                "{name}: case {case} panicked; the input is kept at {}",
                keep.display()
            );
        }
    }
}

#[test]
fn record_parsers_survive_damaged_files() {
    let messages = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]}
{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
"#;
    let sharegpt = r#"{"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
"#;
    let alpaca = r#"[{"instruction": "Translate", "input": "bonjour", "output": "hello", "history": [["a", "b"]]}]"#;
    let csv = "instruction,input,output\n\"Say hi\",,\"hi\"\nx,\"y, z\",w\n";
    for (name, seed) in [
        ("messages.jsonl", messages),
        ("sharegpt.jsonl", sharegpt),
        ("alpaca.json", alpaca),
        ("records.csv", csv),
        ("records.txt", "one line\nanother line\n"),
    ] {
        let path = PathBuf::from(name);
        assert!(parse_records(&path, seed).is_ok(), "{name} seed must parse");
        fuzz(name, seed, |t| {
            let _ = parse_records(&path, t);
        });
    }
}

#[test]
fn the_pair_reader_survives_damaged_files() {
    let seed = r#"{"conversations": [{"from": "human", "value": "Pick one"}], "chosen": {"from": "gpt", "value": "A"}, "rejected": {"from": "gpt", "value": "B"}}
{"prompt": "Q?", "chosen": "yes", "rejected": "no", "weight": 0.5}
{"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]}
"#;
    let path = common::scratch("fuzz-pairs").join("pairs.jsonl");
    std::fs::write(&path, seed).unwrap();
    assert!(load_pairs(&path).is_ok(), "the seed must parse");
    fuzz("pairs.jsonl", seed, |t| {
        std::fs::write(&path, t).unwrap();
        let _ = load_pairs(&path);
    });
}

#[test]
fn the_template_renderer_survives_damaged_templates() {
    let a = assets_or_skip!();
    let seed = std::fs::read_to_string(a.join("chat-templates/Qwen-Qwen2.5-7B-Instruct.jinja"))
        .expect("the shared assets' Qwen2.5 template");
    let msgs = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello"),
    ];
    fuzz("template.jinja", &seed, |t| {
        if let Ok(tmpl) = ChatTemplate::new(t, None, Some("<|im_end|>".into())) {
            let _ = tmpl.render(&msgs, true, &Map::new());
        }
    });
}
