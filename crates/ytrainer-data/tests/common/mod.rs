#![allow(dead_code)]

use std::path::PathBuf;

/// The shared assets live outside the repository; tests that need them skip when absent.
pub fn assets() -> Option<PathBuf> {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/assets"
    ));
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!(
            "NOTICE: shared assets not found at {}; skipping",
            p.display()
        );
        None
    }
}

#[macro_export]
macro_rules! assets_or_skip {
    () => {
        match common::assets() {
            Some(p) => p,
            None => return,
        }
    };
}

pub fn oracle(a: &std::path::Path) -> serde_json::Value {
    let s = std::fs::read_to_string(a.join("oracles/chat_templates.json")).unwrap();
    serde_json::from_str(&s).unwrap()
}

pub fn messages(v: &serde_json::Value) -> Vec<ytrainer_data::Message> {
    serde_json::from_value(v.clone()).unwrap()
}

pub fn template_dir(a: &std::path::Path, name: &str) -> PathBuf {
    match name {
        "Qwen-Qwen2.5-7B-Instruct" => a.join("tiny-qwen2"),
        "SmolLM2-135M-Instruct" => a.join("smollm2-135m-instruct"),
        other => panic!("unknown oracle template {other}"),
    }
}

/// A scratch directory unique to one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ytrainer-data-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
