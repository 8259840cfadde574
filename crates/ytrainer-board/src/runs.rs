//! Runs: folders holding `metrics.jsonl`, `config.resolved.toml` or `ytrainer-run.json` (what `ytrainer run`
//! writes, docs/quickstart.md), found a few levels below each root. A damaged file never hides a run: a line of
//! `metrics.jsonl` that is cut short (the run is writing it, or it was truncated), not JSON, or not UTF-8 is
//! skipped with a warning naming the file and line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};

use crate::paths::{Root, resolve, run_id};
use crate::{BoardError, Result};

/// How deep below a root runs are looked for (a sweep's trials are `sweep/trials/<id>`).
const MAX_DEPTH: usize = 4;
/// A run whose `metrics.jsonl` changed this recently, without `summary.json`, is shown as training.
const LIVE: Duration = Duration::from_secs(120);

/// Whether `dir` is a run folder.
pub fn is_run(dir: &Path) -> bool {
    ["metrics.jsonl", "config.resolved.toml", "ytrainer-run.json"]
        .iter()
        .any(|f| dir.join(f).is_file())
}

/// Folders below `dir` (not following symbolic links; a run's own sub-folders are not searched).
pub fn walk(dir: &Path, depth: usize, visit: &mut dyn FnMut(&Path) -> bool) {
    if !visit(dir) || depth == 0 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut subdirs: Vec<_> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    subdirs.sort();
    for d in subdirs {
        walk(&d, depth - 1, visit);
    }
}

/// Lines of a JSONL file as objects, and a warning for each line that could not be used.
pub fn read_jsonl(bytes: &[u8], name: &str) -> (Vec<Map<String, Value>>, Vec<String>) {
    let mut rows = Vec::new();
    let mut warnings = Vec::new();
    let ends_with_newline = bytes.last() == Some(&b'\n');
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let last = lines.len().saturating_sub(1);
    for (i, line) in lines.iter().enumerate() {
        let line_no = i + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(text) = std::str::from_utf8(line) else {
            warnings.push(format!(
                "{name} line {line_no}: not UTF-8 text; the line is skipped (is this really a ytrainer metrics file?)"
            ));
            continue;
        };
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => rows.push(m),
            Ok(_) => warnings.push(format!(
                "{name} line {line_no}: a JSON value that is not an object; the line is skipped"
            )),
            Err(e) if i == last && !ends_with_newline && e.is_eof() => warnings.push(format!(
                "{name} line {line_no}: incomplete (the file ends in the middle of a line: truncated, or the run \
                 is writing it); the line is skipped"
            )),
            Err(e) => warnings.push(format!(
                "{name} line {line_no}: not JSON ({e}); the line is skipped"
            )),
        }
    }
    (rows, warnings)
}

/// A run folder's files, read once.
struct RunFiles {
    metrics: Vec<Map<String, Value>>,
    eval: Vec<Map<String, Value>>,
    config_text: Option<String>,
    config: Option<toml::Table>,
    summary: Option<Value>,
    warnings: Vec<String>,
    status: &'static str,
}

fn text_of(bytes: Vec<u8>, name: &str, warnings: &mut Vec<String>) -> Option<String> {
    match String::from_utf8(bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            warnings.push(format!(
                "{name}: not UTF-8 text (invalid byte at offset {}); not shown",
                e.utf8_error().valid_up_to()
            ));
            None
        }
    }
}

/// A parsed JSONL file: its rows and warnings.
type Parsed = Arc<(Vec<Map<String, Value>>, Vec<String>)>;

/// A parsed file with the length and modification time it had.
type Stamped = (u64, Option<SystemTime>, Parsed);

/// Parsed JSONL files by path, with the length and modification time they had: the page polls every run every
/// few seconds, and only a file that changed (a training run's) is read and parsed again.
static PARSED: Mutex<Option<HashMap<PathBuf, Stamped>>> = Mutex::new(None);

/// `dir/name` parsed as JSONL (through `root`, so it lies inside the given folders); `None` when absent.
fn jsonl_file(root: &Root, dir: &Path, name: &str) -> Result<Option<Parsed>> {
    let Some(path) = root.contain(&dir.join(name))? else {
        return Ok(None);
    };
    let Ok(meta) = std::fs::metadata(&path) else {
        return Ok(None);
    };
    if !meta.is_file() {
        return Ok(None);
    }
    let stamp = (meta.len(), meta.modified().ok());
    if let Some((len, modified, parsed)) = PARSED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .get(&path)
        && (*len, *modified) == stamp
    {
        return Ok(Some(Arc::clone(parsed)));
    }
    let bytes = std::fs::read(&path).map_err(|e| {
        BoardError::unusable(format!("cannot read {}: {e}", dir.join(name).display()))
    })?;
    let parsed: Parsed = Arc::new(read_jsonl(&bytes, name));
    PARSED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(path, (stamp.0, stamp.1, Arc::clone(&parsed)));
    Ok(Some(parsed))
}

fn read_run(root: &Root, dir: &Path) -> Result<RunFiles> {
    let mut warnings = Vec::new();
    let jsonl = |name: &str, warnings: &mut Vec<String>| -> Result<Vec<Map<String, Value>>> {
        Ok(match jsonl_file(root, dir, name)? {
            Some(p) => {
                warnings.extend(p.1.iter().cloned());
                p.0.clone()
            }
            None => Vec::new(),
        })
    };
    let metrics = jsonl("metrics.jsonl", &mut warnings)?;
    let eval = jsonl("eval.jsonl", &mut warnings)?;
    let config_text = root
        .read(dir, "config.resolved.toml")?
        .and_then(|b| text_of(b, "config.resolved.toml", &mut warnings));
    let config = config_text
        .as_deref()
        .and_then(|t| match t.parse::<toml::Table>() {
            Ok(c) => Some(c),
            Err(e) => {
                warnings.push(format!(
                    "config.resolved.toml: not valid TOML ({}); settings not shown",
                    e.message()
                ));
                None
            }
        });
    let summary = root
        .read(dir, "summary.json")?
        .and_then(|b| text_of(b, "summary.json", &mut warnings))
        .and_then(|t| match serde_json::from_str::<Value>(&t) {
            Ok(v) => Some(v),
            Err(e) => {
                warnings.push(format!("summary.json: not JSON ({e}); ignored"));
                None
            }
        });
    let modified = std::fs::metadata(dir.join("metrics.jsonl"))
        .and_then(|m| m.modified())
        .ok();
    let status = if summary.is_some() {
        "finished"
    } else if modified.is_some_and(|t| {
        SystemTime::now()
            .duration_since(t)
            .is_ok_and(|age| age < LIVE)
    }) {
        "training"
    } else if modified.is_some() {
        "stopped"
    } else {
        "not started"
    };
    Ok(RunFiles {
        metrics,
        eval,
        config_text,
        config,
        summary,
        warnings,
        status,
    })
}

/// `key.sub` of a TOML table.
pub fn toml_get<'a>(t: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut v = t.get(parts.next()?)?;
    for p in parts {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

fn num(m: &Map<String, Value>, k: &str) -> Option<f64> {
    m.get(k).and_then(Value::as_f64)
}

fn summary_of(index: usize, root: &Root, dir: &Path, f: &RunFiles) -> Value {
    let c = f.config.as_ref();
    let s = |k: &str| c.and_then(|c| toml_get(c, k)).and_then(|v| v.as_str());
    let loss_params = c
        .and_then(|c| toml_get(c, "loss.params"))
        .and_then(|v| v.as_table())
        .map(|t| {
            t.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let name = dir
        .strip_prefix(&root.canon)
        .ok()
        .filter(|r| !r.as_os_str().is_empty())
        .map(|r| r.display().to_string())
        .unwrap_or_else(|| {
            dir.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default()
        });
    json!({
        "id": run_id(index, root, dir),
        "name": name,
        "path": root.shown.join(dir.strip_prefix(&root.canon).unwrap_or(Path::new(""))).display().to_string(),
        "status": f.status,
        "steps": f.metrics.last().and_then(|m| num(m, "step")),
        "max_steps": c.and_then(|c| toml_get(c, "train.max_steps")).and_then(|v| v.as_integer()).filter(|&n| n > 0),
        "loss": s("loss.name"),
        "loss_params": loss_params,
        "adapter": s("adapter.type"),
        "model": s("model.preset").map(|p| format!("preset {p}")).or_else(|| s("model.path").map(str::to_string)),
        "last_loss": f.metrics.last().and_then(|m| num(m, "loss")),
        "eval_first": f.eval.first().and_then(|m| num(m, "eval_loss")),
        "eval_last": f.eval.last().and_then(|m| num(m, "eval_loss")),
        "warnings": f.warnings,
    })
}

/// Every run under the roots, with its status, steps, strategy and evaluation.
pub fn list(roots: &[Root]) -> Value {
    let mut out = Vec::new();
    for (i, root) in roots.iter().enumerate() {
        walk(&root.canon, MAX_DEPTH, &mut |dir| {
            if !is_run(dir) {
                return true;
            }
            match read_run(root, dir) {
                Ok(f) => out.push(summary_of(i, root, dir, &f)),
                Err(e) => out.push(json!({
                    "id": run_id(i, root, dir),
                    "name": dir.file_name().map(|n| n.to_string_lossy().to_string()),
                    "path": dir.display().to_string(),
                    "status": "unreadable",
                    "warnings": [e.message],
                })),
            }
            false
        });
    }
    Value::Array(out)
}

/// One run: its summary, every metrics and eval line, the resolved config and `summary.json`.
pub fn detail(roots: &[Root], id: &str) -> Result<Value> {
    let (root, dir) = resolve(roots, id)?;
    if !is_run(&dir) {
        return Err(BoardError::not_found(format!(
            "run `{id}`: {} holds no metrics.jsonl, config.resolved.toml or ytrainer-run.json (not a run folder, \
             or it was deleted)",
            dir.display()
        )));
    }
    let index = roots
        .iter()
        .position(|r| std::ptr::eq(r, root))
        .unwrap_or(0);
    let f = read_run(root, &dir)?;
    let zone_borders = f
        .config
        .as_ref()
        .and_then(|c| toml_get(c, "loss.zone_borders"))
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_float()).collect::<Vec<_>>());
    let mut v = summary_of(index, root, &dir, &f);
    v["metrics"] = json!(f.metrics);
    v["eval"] = json!(f.eval);
    v["config"] = json!(f.config_text);
    v["summary"] = f.summary.clone().unwrap_or(Value::Null);
    v["zone_borders"] = json!(zone_borders);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_jsonl_lines_become_warnings() {
        let (rows, w) = read_jsonl(b"{\"step\":1}\n{\"step\":2}\n{\"st", "metrics.jsonl");
        assert_eq!(rows.len(), 2);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].starts_with("metrics.jsonl line 3: incomplete"),
            "{w:?}"
        );
        let (rows, w) = read_jsonl(b"{\"step\":1}\n\xff\xfe\n[1]\n{oops}\n", "m.jsonl");
        assert_eq!(rows.len(), 1);
        assert!(w[0].starts_with("m.jsonl line 2: not UTF-8"), "{w:?}");
        assert!(w[1].starts_with("m.jsonl line 3: a JSON value that is not an object"));
        assert!(w[2].starts_with("m.jsonl line 4: not JSON"), "{w:?}");
    }
}
