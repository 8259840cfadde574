mod common;

use std::path::Path;

use ytrainer_data::{Container, Format, Message, RecordKind, load_records, parse_records};

fn chat(k: &RecordKind) -> &[Message] {
    match k {
        RecordKind::Chat { messages } => messages,
        other => panic!("not chat: {other:?}"),
    }
}

fn err(path: &str, text: &str) -> String {
    parse_records(Path::new(path), text)
        .unwrap_err()
        .to_string()
}

#[test]
fn detects_every_layout() {
    let p = Path::new("d.jsonl");
    let cases = [
        (
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#,
            Format::Messages,
        ),
        (
            r#"{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"#,
            Format::Messages,
        ),
        (
            r#"{"instruction": "q", "input": "", "output": "a"}"#,
            Format::Alpaca,
        ),
        (
            r#"{"prompt": "q", "completion": "a"}"#,
            Format::PromptCompletion,
        ),
        (
            r#"{"prompt": "q", "response": "a"}"#,
            Format::PromptCompletion,
        ),
        (
            r#"{"question": "q", "answer": "a"}"#,
            Format::QuestionAnswer,
        ),
    ];
    for (line, format) in cases {
        let l = parse_records(p, line).unwrap();
        assert_eq!(l.format, format, "{line}");
        assert_eq!(l.container, Container::JsonLines);
        assert_eq!(
            chat(&l.records[0].kind),
            [Message::new("user", "q"), Message::new("assistant", "a")],
            "{line}"
        );
    }
    let l = parse_records(p, r#"{"text": "doc"}"#).unwrap();
    assert_eq!(l.format, Format::Text);
    assert_eq!(l.records[0].kind, RecordKind::Text { text: "doc".into() });
}

#[test]
fn sharegpt_system_roles_typed_parts_and_alpaca_history() {
    let p = Path::new("x.json");
    let l = parse_records(
        p,
        r#"[
  {"system": "S", "conversations": [
     {"from": "human", "value": "q1"}, {"from": "function_call", "value": "{}"},
     {"from": "observation", "value": "r"}, {"from": "bot", "value": "a1"}]},
  {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "value": "b"}]},
                {"role": "assistant", "content": "c"}]}
]"#,
    )
    .unwrap();
    assert_eq!(l.container, Container::JsonArray);
    assert_eq!(
        chat(&l.records[0].kind),
        [
            Message::new("system", "S"),
            Message::new("user", "q1"),
            Message::new("assistant", "{}"),
            Message::new("tool", "r"),
            Message::new("assistant", "a1")
        ]
    );
    assert_eq!(l.records[0].origin.line, 2);
    assert_eq!(l.records[1].origin.line, 5);
    assert_eq!(l.records[1].origin.index, 1);
    assert_eq!(
        chat(&l.records[1].kind),
        [Message::new("user", "ab"), Message::new("assistant", "c")]
    );

    let l = parse_records(
        Path::new("a.jsonl"),
        r#"{"instruction": "Do", "input": "this", "output": "ok", "system": "Sys", "history": [["h1", "r1"], ["h2", "r2"]]}"#,
    )
    .unwrap();
    assert_eq!(
        chat(&l.records[0].kind),
        [
            Message::new("system", "Sys"),
            Message::new("user", "h1"),
            Message::new("assistant", "r1"),
            Message::new("user", "h2"),
            Message::new("assistant", "r2"),
            Message::new("user", "Do\nthis"),
            Message::new("assistant", "ok"),
        ]
    );
}

#[test]
fn empty_answers_are_dropped_with_counted_warnings() {
    let text = "{\"instruction\": \"a\", \"output\": \"x\"}\n\n{\"instruction\": \"b\", \"output\": \"  \"}\n{\"instruction\": \"\", \"input\": \"\", \"output\": \"y\"}\n";
    let l = parse_records(Path::new("data/train.jsonl"), text).unwrap();
    assert_eq!(l.records.len(), 1);
    let w: Vec<String> = l.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        w,
        [
            "data/train.jsonl:3: field \"output\" is empty; every alpaca record needs a non-empty \"output\" (record dropped)",
            "data/train.jsonl:4: field \"instruction\" is empty; every alpaca record needs a non-empty \"instruction\" (record dropped)",
        ]
    );
    let l = parse_records(
        Path::new("c.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"\"}]}\n{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}",
    )
    .unwrap();
    let w: Vec<String> = l.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        w,
        [
            "c.jsonl:2: field \"messages\"[1].content is empty; every assistant turn needs non-empty content (record dropped)",
            "c.jsonl:3: field \"messages\" has no assistant turn, so there is nothing to train on (record dropped)",
        ]
    );
}

#[test]
fn hard_errors_name_file_line_field_and_fix() {
    assert_eq!(
        err("data/train.jsonl", "{\"text\": \"a\"}\n{\"text\": \"b\"\n"),
        "data/train.jsonl:2: malformed JSON: EOF while parsing an object; each line of a JSON Lines file must be one complete JSON object (fix or delete the line)"
    );
    assert_eq!(
        err(
            "d.json",
            "[\n  {\"text\": \"a\"},\n  {\"text\": \"b\",,}\n]"
        ),
        "d.json:3: malformed JSON: key must be a string; the file must be a JSON array of objects"
    );
    assert_eq!(
        err("d.json", "[\n  {\"text\": \"a\"},\n  {\"text\": \"b\"}\n"),
        "d.json:4: malformed JSON: unexpected end of file inside the array (missing `]`); the file must be a JSON array of objects"
    );
    assert_eq!(
        err("d.json", "[{\"text\": \"a\"}, 3]"),
        "d.json:1: malformed JSON: expected a JSON object, found a number; every record must be an object such as {\"messages\": [...]}"
    );
    assert_eq!(
        err("d.jsonl", "{\"foo\": 1, \"bar\": 2}"),
        "d.jsonl:1: unknown record format (keys: \"foo\", \"bar\"); expected \"messages\"/\"conversations\", alpaca \"instruction\"/\"input\"/\"output\", \"prompt\" + \"completion\"/\"response\", \"question\" + \"answer\", or \"text\""
    );
    assert_eq!(
        err("d.jsonl", "\n\n"),
        "d.jsonl: the file holds no records; add at least one record (or remove the file from the data list)"
    );
    assert_eq!(
        err("d.json", "[]"),
        "d.json: the file holds no records; add at least one record (or remove the file from the data list)"
    );
    assert_eq!(
        err("d.jsonl", "{\"instruction\": \"a\", \"output\": \"\"}"),
        "d.jsonl: all 1 records were dropped (1 warnings, first: d.jsonl:1: field \"output\" is empty; every alpaca record needs a non-empty \"output\" (record dropped)); fix the records or remove the file"
    );
    assert_eq!(
        err(
            "d.jsonl",
            "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\"}"
        ),
        "d.jsonl:2: field \"output\" is missing; every alpaca record needs \"output\" (the file's first record was detected as alpaca)"
    );
    assert_eq!(
        err("d.jsonl", "{\"instruction\": \"a\", \"output\": [1]}"),
        "d.jsonl:1: field \"output\" must be a string, found an array"
    );
    assert_eq!(
        err(
            "d.jsonl",
            "{\"messages\": [{\"role\": \"narrator\", \"content\": \"x\"}]}"
        ),
        "d.jsonl:1: field \"messages\"[0] has unknown role \"narrator\"; use user|human, assistant|gpt|bot, system, or tool|function|observation"
    );
    assert_eq!(
        err(
            "d.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": \"x.png\"}]}]}"
        ),
        "d.jsonl:1: field \"messages\"[0].content[0] is a \"image\" part; only text parts ({\"type\": \"text\", \"text\": ...}) are supported — drop non-text parts"
    );
    assert_eq!(
        err("d.jsonl", "{\"messages\": \"hi\"}"),
        "d.jsonl:1: field \"messages\" must be a list of messages, found a string"
    );
    assert_eq!(
        err(
            "d.jsonl",
            "{\"instruction\": \"a\", \"output\": \"b\", \"history\": [[\"x\"]]}"
        ),
        "d.jsonl:1: field \"history\"[0] must be a [user, assistant] pair of strings"
    );
}

#[test]
fn file_level_errors() {
    let d = common::scratch("formats");
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, b"{\"text\": \"ok\"}\n{\"text\": \"\xff\xfe\"}\n").unwrap();
    assert_eq!(
        load_records(&bad).unwrap_err().to_string(),
        format!(
            "{}:2: the file is not valid UTF-8 (first bad byte at byte offset 25); re-encode it as UTF-8",
            bad.display()
        )
    );
    let missing = d.join("missing.json");
    let e = load_records(&missing).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}: cannot read file: ", missing.display())),
        "{e}"
    );
}

#[test]
fn csv_and_txt_containers() {
    let l = parse_records(
        Path::new("d.csv"),
        "instruction,input,output\nq,,a\n\"multi\nline\",x,\"b\"\n",
    )
    .unwrap();
    assert_eq!(l.container, Container::Csv);
    assert_eq!(l.format, Format::Alpaca);
    assert_eq!(
        chat(&l.records[1].kind),
        [
            Message::new("user", "multi\nline\nx"),
            Message::new("assistant", "b")
        ]
    );
    assert_eq!((l.records[0].origin.line, l.records[1].origin.line), (2, 3));

    let l = parse_records(
        Path::new("corpus.txt"),
        "Para one\nstill one\n\n\n  \nPara two\n",
    )
    .unwrap();
    assert_eq!(l.container, Container::Txt);
    assert_eq!(l.format, Format::Text);
    assert_eq!(l.records.len(), 2);
    assert_eq!(
        l.records[0].kind,
        RecordKind::Text {
            text: "Para one\nstill one".into()
        }
    );
    assert_eq!(
        l.records[1].kind,
        RecordKind::Text {
            text: "Para two".into()
        }
    );
    assert_eq!(l.records[1].origin.to_string(), "corpus.txt:6");
}

#[test]
fn real_corpora_load() {
    let a = assets_or_skip!();
    let dir = a.join("corpora/instruct");
    let l = load_records(&dir.join("alpaca_en_demo.json")).unwrap();
    assert_eq!(
        (l.format, l.container, l.records.len() + l.warnings.len()),
        (Format::Alpaca, Container::JsonArray, 999)
    );
    assert_eq!(l.records[0].origin.line, 2);
    let first = chat(&l.records[0].kind);
    assert_eq!(
        first[0],
        Message::new("user", "Describe a process of making crepes.")
    );
    assert!(first[1].content.starts_with("Making crepes is an easy"));

    let l = load_records(&dir.join("v1_sft_demo.jsonl")).unwrap();
    assert_eq!(
        (l.format, l.container, l.records.len(), l.warnings.len()),
        (Format::Messages, Container::JsonLines, 500, 0)
    );
    assert_eq!(chat(&l.records[0].kind)[0], Message::new("user", "hi"));
    assert_eq!(l.records[499].origin.line, 500);

    let l = load_records(&dir.join("glaive_toolcall_en_demo.json")).unwrap();
    assert_eq!(
        (l.format, l.records.len() + l.warnings.len()),
        (Format::Messages, 300)
    );
    let roles: Vec<&str> = chat(&l.records[0].kind)
        .iter()
        .map(|m| m.role.as_str())
        .collect();
    assert_eq!(
        roles,
        [
            "user",
            "assistant",
            "user",
            "assistant",
            "tool",
            "assistant",
            "user",
            "assistant"
        ]
    );

    let l = load_records(&dir.join("identity.json")).unwrap();
    assert_eq!((l.format, l.warnings.len()), (Format::Alpaca, 0));
    // Multi-turn conversations are kept whole.
    let l = load_records(&a.join("corpora/preference/dpo_en_demo.json")).unwrap();
    assert_eq!(l.format, Format::Messages);
}

/// Issue 21 item 13: a turn without its text names the layout's own key and says "missing"; a CSV error is
/// reported as CSV, not as "malformed JSON".
#[test]
fn missing_content_and_bad_csv_are_named_for_what_they_are() {
    let l = parse_records(
        Path::new("m.jsonl"),
        "{\"messages\":[{\"role\":\"user\"},{\"role\":\"assistant\",\"content\":\"x\"}]}\n{\"messages\":[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"a\"}]}\n",
    )
    .unwrap();
    let w: Vec<String> = l.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        w,
        [
            "m.jsonl:1: field \"messages\"[0].content is missing; every user turn needs non-empty content (record dropped)"
        ]
    );
    let l = parse_records(
        Path::new("s.jsonl"),
        "{\"conversations\":[{\"from\":\"human\",\"value\":\"q\"},{\"from\":\"gpt\",\"value\":\" \"}]}\n{\"conversations\":[{\"from\":\"human\",\"value\":\"q\"},{\"from\":\"gpt\",\"value\":\"a\"}]}\n",
    )
    .unwrap();
    let w: Vec<String> = l.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        w,
        [
            "s.jsonl:1: field \"conversations\"[1].value is empty; every assistant turn needs non-empty content (record dropped)"
        ]
    );
    let e = parse_records(Path::new("b.csv"), "instruction,output\n\"unterminated,x\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("b.csv:2: malformed CSV: "), "{e}");
    assert!(
        e.ends_with("; the file must be CSV with a header row naming the fields and the same number of fields on every row (quote fields that hold commas)"),
        "{e}"
    );
}

fn map(pairs: &[(&str, &str)]) -> ytrainer_data::ColumnMap {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// A column map renames the file's fields to the ones a layout reads, before the layout is detected: custom
/// alpaca-style names, question/answer spelt otherwise, CSV headers.
#[test]
fn column_map_reads_differently_named_fields() {
    let p = Path::new("d.jsonl");
    let text = "{\"task\": \"Add\", \"numbers\": \"2 3\", \"result\": \"5\", \"id\": 1}\n\
                {\"task\": \"Say hi\", \"result\": \"hi\"}\n";
    let m = map(&[
        ("instruction", "task"),
        ("input", "numbers"),
        ("output", "result"),
    ]);
    let l = ytrainer_data::parse_records_with(p, text, &m).unwrap();
    assert_eq!(l.format, Format::Alpaca);
    assert_eq!(
        chat(&l.records[0].kind),
        [
            Message::new("user", "Add\n2 3"),
            Message::new("assistant", "5")
        ]
    );
    assert_eq!(
        chat(&l.records[1].kind),
        [
            Message::new("user", "Say hi"),
            Message::new("assistant", "hi")
        ]
    );
    let qa = map(&[("question", "Q"), ("answer", "A")]);
    let l =
        ytrainer_data::parse_records_with(Path::new("d.csv"), "Q,A\nwhy?,because\n", &qa).unwrap();
    assert_eq!(l.format, Format::QuestionAnswer);
    assert_eq!(
        chat(&l.records[0].kind),
        [
            Message::new("user", "why?"),
            Message::new("assistant", "because")
        ]
    );
    // Without the map the same file is an unknown layout.
    assert!(err("d.jsonl", text).contains("unknown record format"));
}

/// A map entry the first record lacks, a later record lacking a mapped required field and a map key that is
/// no record field are errors naming the file, the line and both names.
#[test]
fn column_map_errors_name_file_record_and_field() {
    let p = Path::new("d.jsonl");
    let m = map(&[("instruction", "task"), ("output", "reslt")]);
    let e = ytrainer_data::parse_records_with(p, "{\"task\": \"a\", \"result\": \"b\"}\n", &m)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "d.jsonl:1: column map entry output = \"reslt\": the first record has no field \"reslt\" (its fields: \
         \"task\", \"result\"); fix the map or the file"
    );
    let m = map(&[("instruction", "task"), ("output", "result")]);
    let text = "{\"task\": \"a\", \"result\": \"b\"}\n{\"task\": \"c\"}\n";
    let e = ytrainer_data::parse_records_with(p, text, &m)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "d.jsonl:2: field \"output\" is missing; every alpaca record needs \"output\" (the file's first record \
         was detected as alpaca) (column map: \"output\" is the file's \"result\")"
    );
    let m = map(&[("anwser", "a")]);
    let e = ytrainer_data::parse_records_with(p, "{\"question\": \"q\", \"a\": \"b\"}\n", &m)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "d.jsonl:1: column map entry anwser = \"a\": `anwser` is not a record field ytrainer reads; map one of: \
             messages, conversations, instruction"
        ),
        "{e}"
    );
}
