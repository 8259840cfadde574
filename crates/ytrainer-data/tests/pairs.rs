//! Preference-pair loading: every layout, weights, and the bad-record cases (errors name file:line; pairs that
//! express no preference are dropped with a counted warning, never silently used).

use std::path::PathBuf;

use ytrainer_data::{ChatTemplate, TokenizerWrapper, load_pairs, tokenize_pair};

fn write(name: &str, content: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ytrainer-pairs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn assets() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/assets"
    ))
}

#[test]
fn sharegpt_pairs_from_the_demo_file() {
    let l = load_pairs(&assets().join("corpora/preference/dpo_en_demo.json")).unwrap();
    assert_eq!(l.pairs.len(), 300);
    assert!(l.warnings.is_empty());
    let p = &l.pairs[0];
    assert_eq!(p.prompt.last().unwrap().role, "user");
    assert!(
        p.prompt[0]
            .content
            .starts_with("Hi! I'd like to create a new language game")
    );
    assert!(
        p.chosen
            .starts_with("That sounds like a fun and engaging idea!")
    );
    assert_ne!(p.chosen, p.rejected);
    assert_eq!(p.origin.line, 2);
}

#[test]
fn messages_pairs_from_v1_demo() {
    let l = load_pairs(&assets().join("corpora/preference/v1_dpo_demo.jsonl")).unwrap();
    assert!(!l.pairs.is_empty());
    let p = &l.pairs[0];
    assert_eq!(p.prompt[0].role, "system");
    assert_eq!(p.prompt.last().unwrap().role, "user");
    assert!(
        p.chosen.starts_with("Abdulah Hasanagic is the proud owner"),
        "{}",
        p.chosen
    );
}

#[test]
fn prompt_chosen_rejected_strings_with_weight_and_system() {
    let f = write(
        "pcr.jsonl",
        "{\"prompt\": \"2+2?\", \"chosen\": \"4\", \"rejected\": \"5\", \"weight\": 0.5, \"system\": \"Be exact.\"}\n",
    );
    let l = load_pairs(&f).unwrap();
    let p = &l.pairs[0];
    assert_eq!(p.weight, 0.5);
    assert_eq!(p.prompt.len(), 2);
    assert_eq!((p.chosen.as_str(), p.rejected.as_str()), ("4", "5"));
}

#[test]
fn bad_records() {
    let f = write(
        "missing.jsonl",
        "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n{\"prompt\": \"q\", \"chosen\": \"a\"}\n",
    );
    assert_eq!(
        load_pairs(&f).unwrap_err().to_string(),
        format!(
            "{}:2: field \"rejected\" is missing; every preference pair needs \"chosen\" and \"rejected\" (and \"prompt\" or \"conversations\")",
            f.display()
        )
    );
    let f = write(
        "warn.jsonl",
        "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n{\"prompt\": \"q\", \"chosen\": \"same\", \"rejected\": \"same\"}\n{\"prompt\": \"q\", \"chosen\": \"\", \"rejected\": \"b\"}\n",
    );
    let l = load_pairs(&f).unwrap();
    assert_eq!(l.pairs.len(), 1);
    let w: Vec<String> = l.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        w,
        [
            format!(
                "{}:2: chosen and rejected are identical, so the pair expresses no preference (record dropped)",
                f.display()
            ),
            format!(
                "{}:3: the chosen completion is empty (record dropped)",
                f.display()
            ),
        ]
    );
    let f = write(
        "prefix.jsonl",
        "{\"chosen_messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"x\"}], \"rejected_messages\": [{\"role\": \"user\", \"content\": \"b\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}\n",
    );
    assert_eq!(
        load_pairs(&f).unwrap_err().to_string(),
        format!(
            "{}:1: \"chosen_messages\" and \"rejected_messages\" must share every turn before the final answer",
            f.display()
        )
    );
    let f = write(
        "weight.jsonl",
        "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\", \"weight\": -1}\n",
    );
    assert_eq!(
        load_pairs(&f).unwrap_err().to_string(),
        format!(
            "{}:1: field \"weight\" = -1: must be a finite number >= 0",
            f.display()
        )
    );
    let f = write(
        "allbad.jsonl",
        "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"a\"}\n",
    );
    assert!(
        load_pairs(&f)
            .unwrap_err()
            .to_string()
            .contains("the file holds no usable preference pair (1 dropped")
    );
}

#[test]
fn both_sides_share_the_prompt_and_supervise_only_the_completion() {
    let dir = assets().join("tiny-qwen2");
    let tok = TokenizerWrapper::from_file(&dir.join("tokenizer.json")).unwrap();
    let t = ChatTemplate::from_model_dir(&dir).unwrap();
    let f = write(
        "tok.jsonl",
        "{\"prompt\": \"Name a colour.\", \"chosen\": \"Blue.\", \"rejected\": \"Seven.\"}\n",
    );
    let p = &load_pairs(&f).unwrap().pairs[0];
    let ex = tokenize_pair(&tok, &t, p, &Default::default()).unwrap();
    let pc = ex.chosen.targets.iter().position(|&x| x).unwrap();
    let pr = ex.rejected.targets.iter().position(|&x| x).unwrap();
    assert_eq!(pc, pr);
    assert_eq!(ex.chosen.input_ids[..pc], ex.rejected.input_ids[..pr]);
    let sup: Vec<u32> = ex
        .chosen
        .input_ids
        .iter()
        .zip(&ex.chosen.targets)
        .filter(|(_, t)| **t)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(tok.decode(&sup, false).unwrap(), "Blue.<|im_end|>");
}
