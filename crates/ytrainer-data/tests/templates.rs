mod common;

use serde_json::Map;
use ytrainer_data::{ChatTemplate, Message};

/// The oracle's Qwen2.5 template is the tiny-qwen2 one (identical to the llama.cpp copy), bos = None,
/// eos = <|im_end|>; SmolLM2's comes from its own model dir (bos/eos from tokenizer_config.json).
fn oracle_template(a: &std::path::Path, name: &str) -> ChatTemplate {
    let t = ChatTemplate::from_model_dir(&common::template_dir(a, name)).unwrap();
    let o = common::oracle(a);
    let meta = &o["templates"][name];
    assert_eq!(t.bos_token(), meta["bos_token"].as_str(), "{name} bos");
    assert_eq!(t.eos_token(), meta["eos_token"].as_str(), "{name} eos");
    t
}

#[test]
fn oracle_renderings_match_byte_for_byte() {
    let a = assets_or_skip!();
    let o = common::oracle(&a);
    let mut checked = 0;
    for case in o["cases"].as_array().unwrap() {
        let name = case["template"].as_str().unwrap();
        let t = oracle_template(&a, name);
        let msgs = common::messages(&case["messages"]);
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let got = t.render(&msgs, agp, &Map::new()).unwrap();
        assert_eq!(
            got,
            case["rendered"].as_str().unwrap(),
            "{name} / {} / agp={agp}",
            case["conversation"]
        );
        checked += 1;
    }
    assert_eq!(checked, 24);
}

#[test]
fn oracle_template_files_are_the_ones_in_chat_templates_dir() {
    let a = assets_or_skip!();
    let q =
        std::fs::read_to_string(a.join("chat-templates/Qwen-Qwen2.5-7B-Instruct.jinja")).unwrap();
    let tiny = std::fs::read_to_string(a.join("tiny-qwen2/chat_template.jinja")).unwrap();
    assert_eq!(q.trim_end(), tiny.trim_end());
}

#[test]
fn tokenizer_config_chat_template_string_list_and_added_token_objects() {
    let d = common::scratch("tcfg");
    std::fs::write(
        d.join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}"}],
           "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>"}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(&d).unwrap();
    assert_eq!(t.bos_token(), Some("<s>"));
    assert_eq!(t.eos_token(), Some("</s>"));
    let out = t
        .render(&[Message::new("user", "hi")], false, &Map::new())
        .unwrap();
    assert_eq!(out, "<s>hi</s>");

    std::fs::write(
        d.join("tokenizer_config.json"),
        r#"{"chat_template": "A{{ messages|length }}"}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(&d).unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "hi")], false, &Map::new())
            .unwrap(),
        "A1"
    );
    assert_eq!(t.bos_token(), None);

    let empty = common::scratch("tcfg-none");
    let err = ChatTemplate::from_model_dir(&empty)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "chat template: {}: no chat template found (neither \"chat_template\" in tokenizer_config.json nor chat_template.jinja); add a chat_template.jinja to the model directory or train on raw text (`training_type = \"cpt\"`)",
            empty.display()
        )
    );
}

#[test]
fn jinja_environment_matches_transformers() {
    let t = ChatTemplate::new(
        "{% for m in messages %}\n  {{ m.content | tojson }}|{{ m.content.upper() }}|{{ m.content.strip().split(' ')|length }}\n{% endfor %}{{ {'b': 1, 'a': [1, 2.5, none, true], 'é': '<&>'} | tojson }}|{{ {'b': 1, 'a': 2} | tojson(indent=2) }}|{{ 'x' if foo is not defined }}",
        None,
        None,
    )
    .unwrap();
    let out = t
        .render(
            &[Message::new("user", " héllo \"w\"\n ")],
            false,
            &Map::new(),
        )
        .unwrap();
    // trim_blocks + lstrip_blocks remove the tag lines; tojson keeps non-ASCII, does no HTML escaping
    // and uses Python's separators.
    assert_eq!(
        out,
        "  \" héllo \\\"w\\\"\\n \"| HÉLLO \"W\"\n |2\n{\"b\": 1, \"a\": [1, 2.5, null, true], \"é\": \"<&>\"}|{\n  \"b\": 1,\n  \"a\": 2\n}|x"
    );

    let t = ChatTemplate::new(
        "{{ raise_exception('only user and assistant roles') }}",
        None,
        None,
    )
    .unwrap();
    let err = t.render(&[], false, &Map::new()).unwrap_err().to_string();
    assert!(err.starts_with("chat template: "), "{err}");
    assert!(err.contains("only user and assistant roles"), "{err}");

    let t = ChatTemplate::new(
        "{%- set ns = namespace(n=0) -%}{%- for m in messages -%}{%- if loop.index > 2 %}{% break %}{% endif -%}{%- set ns.n = ns.n + 1 -%}{%- endfor -%}{{ ns.n }} {{ strftime_now('%Y')|length }} {{ greeting }}",
        None,
        None,
    )
    .unwrap();
    let mut vars = Map::new();
    vars.insert("greeting".into(), "hey".into());
    let msgs = vec![Message::new("user", "a"); 5];
    assert_eq!(t.render(&msgs, false, &vars).unwrap(), "2 4 hey");
}

#[test]
fn strftime_subset() {
    // 2024-07-26T12:00:00Z, the oracle's frozen time.
    let t = 1_721_995_200;
    assert_eq!(
        ytrainer_data::template::strftime("%d %b %Y", t),
        "26 Jul 2024"
    );
    assert_eq!(
        ytrainer_data::template::strftime("%A %B %-d, %Y %H:%M:%S %j %%", t),
        "Friday July 26, 2024 12:00:00 208 %"
    );
}

/// Templates of the llama.cpp collection that cannot render a plain user/assistant conversation,
/// with the reason. Everything else must render.
const KNOWN_FAILURES: &[(&str, &str)] = &[];

#[test]
fn every_collected_template_renders_a_simple_conversation() {
    let a = assets_or_skip!();
    let mut names: Vec<_> = std::fs::read_dir(a.join("chat-templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 70);
    let msgs = vec![
        Message::new("system", "You are helpful."),
        Message::new("user", "Hello!"),
        Message::new("assistant", "Hi there."),
        Message::new("user", "What is 2+2?"),
    ];
    let mut failures = Vec::new();
    let mut no_system = Vec::new();
    for p in &names {
        let name = p.file_stem().unwrap().to_str().unwrap().to_string();
        let src = std::fs::read_to_string(p).unwrap();
        let mut vars = Map::new();
        if name == "fireworks-ai-llama-3-firefunction-v2" {
            // Like under transformers, this template needs these two variables from the caller.
            vars.insert("functions".into(), "[]".into());
            vars.insert("datetime".into(), "2024-07-26".into());
        }
        let t = ChatTemplate::new(&src, Some("<s>".into()), Some("</s>".into()));
        let r = t.and_then(|t| {
            t.render(&msgs, true, &vars).or_else(|e| {
                // Some templates (Gemma 2) reject a system turn by design: retry without it.
                let out = t.render(&msgs[1..], true, &vars).map_err(|_| e)?;
                no_system.push(name.clone());
                Ok(out)
            })
        });
        match r {
            Ok(out) => {
                assert!(out.contains("What is 2+2?"), "{name}: {out}");
                assert!(out.contains("Hi there."), "{name}: {out}");
            }
            Err(e) => failures.push((name, e.to_string())),
        }
    }
    let unexpected: Vec<_> = failures
        .iter()
        .filter(|(n, _)| !KNOWN_FAILURES.iter().any(|(k, _)| k == n))
        .collect();
    assert!(
        unexpected.is_empty(),
        "templates failing to render: {unexpected:#?}"
    );
    let stale: Vec<_> = KNOWN_FAILURES
        .iter()
        .filter(|(k, _)| !failures.iter().any(|(n, _)| n == k))
        .collect();
    assert!(
        stale.is_empty(),
        "known failures that now render: {stale:?}"
    );
    assert_eq!(no_system, ["google-gemma-2-2b-it"]);
}

/// Issue 21: a chat template ships with the model file, so it is untrusted. Nested loops that would run for
/// hours and a string doubled until it fills memory both stop at the render's work limit with an error that
/// names the template's file.
#[test]
fn hostile_templates_stop_at_the_work_limit_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("ytrainer-hostile-tmpl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let msgs = [Message::new("user", "hi")];
    for (name, src) in [
        (
            "loops",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        ),
        (
            "doubling",
            "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
        ),
        ("repeat", "{{ 'x' * 100000000000 }}"),
    ] {
        std::fs::write(dir.join("chat_template.jinja"), src).unwrap();
        let t = ChatTemplate::from_model_dir(&dir).unwrap();
        let err = t.render(&msgs, false, &Map::new()).unwrap_err().to_string();
        let expected = format!(
            "chat template: {}: rendering stopped at its work limit (10000000 fuel",
            dir.join("chat_template.jinja").display()
        );
        assert!(err.starts_with(&expected), "{name}: {err}");
        assert!(err.contains("(1 message(s))"), "{name}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Found by the fuzz harness (tests/fuzz.rs): `{%}` made the generation-tag rewriter slice backwards and panic.
#[test]
fn an_overlapping_tag_is_a_template_error_not_a_panic() {
    let e = ChatTemplate::new("a {%} b", None, None)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("chat template: "), "{e}");
}
