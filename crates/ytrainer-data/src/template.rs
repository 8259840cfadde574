//! Chat templates, rendered the way Hugging Face transformers renders them.
//!
//! The masks this crate computes are only right if the text we train on is byte for byte what the
//! model sees at inference, so the Jinja environment copies transformers' choices: `trim_blocks`,
//! `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, Python string/dict methods,
//! and a `tojson` that keeps non-ASCII characters and does no HTML escaping (Python's
//! `json.dumps(ensure_ascii=False)`).

use std::path::Path;

use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, Error as JError, ErrorKind};
use serde_json::{Map, Value};

use crate::error::DataError;
use crate::formats::Message;

const NAME: &str = "chat";

/// The work one rendering may do, in minijinja fuel: one unit per instruction, and one per 64 bytes of text or
/// containers the template creates. A template comes with a model file, which is untrusted input: without a
/// bound, nested `range(100000)` loops hang and a string doubled in a loop exhausts memory (issue 21). 10 M fuel
/// is ~10 M instructions (about a second) or ~640 MB of created data, while the largest real conversations we
/// render (thousands of turns, megabytes of text) need well under 1 M.
pub const RENDER_FUEL: u64 = 10_000_000;

/// A compiled chat template plus the special-token strings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Where the template came from (a file), named in rendering errors; `None` for a template given as a string.
    origin: Option<String>,
    bos: Option<String>,
    eos: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("source_len", &self.source.len())
            .finish()
    }
}

fn tmpl_err(e: JError) -> DataError {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    DataError::Template(msg)
}

/// A special token in tokenizer_config.json is a string or an AddedToken object.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// Compiles `source`. `bos`/`eos` are exposed to the template as `bos_token`/`eos_token`;
    /// `None` leaves them undefined, as transformers does.
    pub fn new(source: &str, bos: Option<String>, eos: Option<String>) -> Result<Self, DataError> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(tmpl_err)?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<JValue, JError> {
            Err(JError::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            strftime(&fmt, secs)
        });
        env.add_filter("tojson", tojson);
        // Python's None is not iterable (minijinja iterates none as empty); templates test
        // `tools is iterable and tools | length > 0` with tools=None, as transformers passes it.
        env.add_test("iterable", |v: &JValue| {
            !v.is_none() && v.try_iter().is_ok()
        });
        env.add_template_owned(NAME, strip_generation_tags(source))
            .map_err(tmpl_err)?;
        env.set_fuel(Some(RENDER_FUEL));
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            origin: None,
            bos,
            eos,
        })
    }

    /// Loads a model directory's template: `chat_template` in tokenizer_config.json (a string, or a
    /// list of `{name, template}` from which "default" is taken), else `chat_template.jinja`.
    pub fn from_model_dir(dir: &Path) -> Result<Self, DataError> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Map<String, Value> = match std::fs::read_to_string(&cfg_path) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| {
                DataError::Template(format!("{}: malformed JSON: {e}", cfg_path.display()))
            })?,
            Err(_) => Map::new(),
        };
        let from_cfg = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        };
        let origin = if from_cfg.is_some() {
            format!("{} (\"chat_template\")", cfg_path.display())
        } else {
            dir.join("chat_template.jinja").display().to_string()
        };
        let source = match from_cfg {
            Some(s) => s,
            None => {
                let p = dir.join("chat_template.jinja");
                std::fs::read_to_string(&p).map_err(|_| {
                    DataError::Template(format!(
                        "{}: no chat template found (neither \"chat_template\" in tokenizer_config.json nor chat_template.jinja); add a chat_template.jinja to the model directory or train on raw text (`training_type = \"cpt\"`)",
                        dir.display()
                    ))
                })?
            }
        };
        Ok(Self::new(
            &source,
            token_string(cfg.get("bos_token")),
            token_string(cfg.get("eos_token")),
        )
        .map_err(|e| match e {
            DataError::Template(m) => DataError::Template(format!("{origin}: {m}")),
            other => other,
        })?
        .with_origin(origin))
    }

    /// Names where the template came from in rendering errors (a file path, a GGUF's metadata key).
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = Some(origin.into());
        self
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Makes `strftime_now` return this instant (Unix seconds, UTC) instead of the current time, so a rendering
    /// that mentions today's date is reproducible (`ytrainer render --date`).
    pub fn set_fixed_time(&mut self, unix_secs: i64) {
        self.env
            .add_function("strftime_now", move |fmt: String| -> String {
                strftime(&fmt, unix_secs)
            });
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_deref()
    }

    /// Renders `messages`. `vars` are extra template variables (e.g. `enable_thinking`); they
    /// override `bos_token`/`eos_token`/`tools`/`documents` but not `messages`/`add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        vars: &Map<String, Value>,
    ) -> Result<String, DataError> {
        let mut ctx = Map::new();
        if let Some(b) = &self.bos {
            ctx.insert("bos_token".into(), Value::String(b.clone()));
        }
        if let Some(e) = &self.eos {
            ctx.insert("eos_token".into(), Value::String(e.clone()));
        }
        // transformers always passes these two, as None when the caller gives none: `tools is none` holds.
        ctx.insert("tools".into(), Value::Null);
        ctx.insert("documents".into(), Value::Null);
        for (k, v) in vars {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).map_err(|e| DataError::Template(e.to_string()))?,
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        let tmpl = self.env.get_template(NAME).map_err(tmpl_err)?;
        tmpl.render(JValue::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| {
                let origin = self.origin.as_ref().map(|o| format!("{o}: ")).unwrap_or_default();
                if e.kind() == ErrorKind::OutOfFuel {
                    DataError::Template(format!(
                        "{origin}rendering stopped at its work limit ({RENDER_FUEL} fuel: about {RENDER_FUEL} \
                         template instructions or {} MB of created text): the template loops or grows without \
                         bound on this record ({} message(s)); a chat template is code that ships with the model, \
                         so fix or replace it (e.g. a chat_template.jinja in the model directory)",
                        RENDER_FUEL * 64 / 1_000_000,
                        messages.len()
                    ))
                } else {
                    match tmpl_err(e) {
                        DataError::Template(m) => DataError::Template(format!("{origin}{m}")),
                        other => other,
                    }
                }
            })
    }
}

/// Rewrites transformers' `{% generation %}` / `{% endgeneration %}` tags (an extension that
/// records assistant spans) into `{% if true %}` / `{% endif %}`: same output, same whitespace
/// control. The spans they mark are recomputed here by prefix rendering instead.
fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tag = &rest[i..];
        // The closing `%}` comes after the opening `{%` (in `{%}` they would overlap).
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let body = inner
            .trim_start_matches(['-', '+'])
            .trim_end_matches(['-', '+'])
            .trim();
        let replacement = match body {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(&inner[..inner.len() - inner.trim_start_matches(['-', '+']).len()]);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.push_str(&inner[inner.trim_end_matches(['-', '+']).len()..]);
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=.., separators=.., sort_keys=..)`.
fn tojson(value: &JValue, indent: Option<JValue>, kwargs: Kwargs) -> Result<JValue, JError> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<JValue>>("indent")?,
    };
    let indent: Option<usize> = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let seps: Option<Vec<String>> = kwargs.get("separators")?;
    let _ = kwargs.get::<Option<bool>>("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match seps {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(JError::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ));
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let v: Value = serde_json::to_value(value)
        .map_err(|e| JError::new(ErrorKind::BadSerialization, e.to_string()))?;
    let mut out = String::new();
    let w = PyJson {
        indent,
        item_sep: &item_sep,
        key_sep: &key_sep,
        sort_keys,
    };
    w.write(&mut out, &v, 0);
    Ok(JValue::from_safe_string(out))
}

struct PyJson<'a> {
    indent: Option<usize>,
    item_sep: &'a str,
    key_sep: &'a str,
    sort_keys: bool,
}

impl PyJson<'_> {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    }

    fn write(&self, out: &mut String, v: &Value, depth: usize) {
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => out.push_str(&n.to_string()),
            Value::String(s) => write_py_str(out, s),
            Value::Array(a) => {
                if a.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.write(out, x, depth + 1);
                }
                self.newline(out, depth);
                out.push(']');
            }
            Value::Object(m) => {
                if m.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut items: Vec<(&String, &Value)> = m.iter().collect();
                if self.sort_keys {
                    items.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, x)) in items.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    write_py_str(out, k);
                    out.push_str(self.key_sep);
                    self.write(out, x, depth + 1);
                }
                self.newline(out, depth);
                out.push('}');
            }
        }
    }
}

fn write_py_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// The subset of C `strftime` that chat templates use, in UTC (transformers uses local time; a
/// training run should not depend on the machine's time zone).
pub fn strftime(fmt: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let rem = unix_secs.rem_euclid(86_400);
    let (h, mi, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + if leap && m > 2 { 1 } else { 0 };
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('-') => match it.next() {
                Some('d') => out.push_str(&d.to_string()),
                Some('m') => out.push_str(&m.to_string()),
                Some('H') => out.push_str(&h.to_string()),
                Some(o) => {
                    out.push_str("%-");
                    out.push(o);
                }
                None => out.push_str("%-"),
            },
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{:02}", if h % 12 == 0 { 12 } else { h % 12 })),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}
