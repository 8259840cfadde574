//! `ytrainer render`: what training sees for one record (the rendered text and its tokens, supervised ones
//! marked), or the raw rendering of any chat template for a list of messages.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde_json::json;
use ytrainer_data::{
    ChatTemplate, DataOptions, Message, Overlong, RecordKind, TrainOn, load_records, prepare,
    render_chat_spans,
};

use crate::cli::Format;
use crate::interop::parse_vars;
use ytrainer_recipes::source::load_tokenizer;

/// `ytrainer render`
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Model directory or `.gguf` file (tokenizer + chat template), with --data.
    #[arg(long, requires = "data")]
    pub model: Option<PathBuf>,
    /// Data file; one record of it is rendered.
    #[arg(long, requires = "model")]
    pub data: Option<PathBuf>,
    /// 0-based record index.
    #[arg(long, default_value_t = 0)]
    pub record: usize,
    /// A Jinja chat template file, with --messages.
    #[arg(long, conflicts_with_all = ["model", "data"], requires = "messages")]
    pub template: Option<PathBuf>,
    /// JSON file with a list of `{"role": .., "content": ..}` messages.
    #[arg(long, requires = "template")]
    pub messages: Option<PathBuf>,
    /// Append the assistant prompt (what inference renders).
    #[arg(long)]
    pub add_generation_prompt: bool,
    /// `bos_token` passed to the template.
    #[arg(long)]
    pub bos_token: Option<String>,
    /// `eos_token` passed to the template.
    #[arg(long)]
    pub eos_token: Option<String>,
    /// Template variable, repeatable: `--var enable_thinking=false` (JSON when it parses, else a string).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// What `strftime_now` returns, `YYYY-MM-DD` (midnight UTC).
    #[arg(long)]
    pub date: Option<String>,
    /// all_assistant, last_assistant or everything (with --data).
    #[arg(long, default_value = "all_assistant")]
    pub train_on: String,
    /// Longest sample in tokens (as in training).
    #[arg(long, default_value_t = 4096)]
    pub max_seq_len: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// `YYYY-MM-DD` -> Unix seconds at midnight UTC.
pub fn parse_date(s: &str) -> Option<i64> {
    let mut it = s.trim().splitn(3, '-');
    let y: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let d: i64 = it.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from civil (H. Hinnant).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468) * 86_400)
}

fn fix_date(t: &mut ChatTemplate, date: Option<&str>) -> Result<()> {
    if let Some(d) = date {
        let secs = parse_date(d)
            .ok_or_else(|| anyhow!("--date `{d}`: expected YYYY-MM-DD, e.g. 2024-07-26"))?;
        t.set_fixed_time(secs);
    }
    Ok(())
}

/// `ytrainer render`
pub fn render(a: RenderArgs) -> Result<()> {
    let vars = parse_vars(&a.vars)?;
    if let (Some(tp), Some(mp)) = (&a.template, &a.messages) {
        let src =
            std::fs::read_to_string(tp).with_context(|| format!("cannot read {}", tp.display()))?;
        let text =
            std::fs::read_to_string(mp).with_context(|| format!("cannot read {}", mp.display()))?;
        let messages: Vec<Message> = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected a JSON list of messages, e.g. [{{\"role\": \"user\", \"content\": \"Hi\"}}]",
                mp.display()
            )
        })?;
        let mut t = ChatTemplate::new(&src, a.bos_token.clone(), a.eos_token.clone())
            .with_context(|| format!("compiling {}", tp.display()))?;
        fix_date(&mut t, a.date.as_deref())?;
        let out = t
            .render(&messages, a.add_generation_prompt, &vars)
            .with_context(|| format!("rendering {}", tp.display()))?;
        match a.format {
            Format::Json => println!("{}", json!({ "text": out })),
            Format::Text => print!("{out}"),
        }
        return Ok(());
    }
    let (Some(model), Some(data)) = (&a.model, &a.data) else {
        bail!(
            "give either --model M --data F [--record N], or --template T.jinja --messages m.json"
        );
    };
    let (tok, mut template) = load_tokenizer(model)?;
    if let Some(t) = template.as_mut() {
        fix_date(t, a.date.as_deref())?;
    }
    let loaded = load_records(data)?;
    let n = loaded.records.len();
    let rec = loaded.records.get(a.record).ok_or_else(|| {
        anyhow!(
            "--record {}: {} has {n} records (indices 0..{})",
            a.record,
            data.display(),
            n.saturating_sub(1)
        )
    })?;
    let train_on = match a.train_on.as_str() {
        "all_assistant" => TrainOn::AllAssistant,
        "last_assistant" => TrainOn::LastAssistant,
        "everything" => TrainOn::Everything,
        other => {
            bail!("--train-on `{other}`: expected all_assistant, last_assistant or everything")
        }
    };
    let opts = DataOptions {
        max_seq_len: a.max_seq_len,
        overlong: Overlong::Truncate,
        train_on,
        cpt: false,
        template_vars: vars.clone(),
    };
    let text = match &rec.kind {
        RecordKind::Chat { messages } => {
            let t = template
                .as_ref()
                .ok_or_else(|| anyhow!("{}: the model has no chat template", model.display()))?;
            render_chat_spans(t, messages, train_on, &vars)?.text
        }
        RecordKind::Text { text } => text.clone(),
    };
    let prepared = prepare(std::slice::from_ref(rec), &tok, template.as_ref(), &opts)?;
    let Some(ex) = prepared.examples.first() else {
        bail!(
            "record {} ({}) yields no training example (no supervised tokens, or skipped)",
            a.record,
            rec.origin
        );
    };
    let pieces: Vec<String> = ex
        .input_ids
        .iter()
        .map(|&id| tok.decode(&[id], false).unwrap_or_default())
        .collect();
    let supervised = ex.targets.iter().filter(|&&t| t).count();
    match a.format {
        Format::Json => {
            let tokens: Vec<_> = ex
                .input_ids
                .iter()
                .zip(&pieces)
                .zip(&ex.targets)
                .map(|((id, p), t)| json!({"id": id, "piece": p, "supervised": t}))
                .collect();
            println!(
                "{}",
                json!({"record": a.record, "origin": rec.origin.to_string(), "text": text,
                       "n_tokens": ex.input_ids.len(), "n_supervised": supervised, "tokens": tokens})
            );
        }
        Format::Text => {
            let color = std::io::stdout().is_terminal();
            println!(
                "=== rendered text (record {}, {}) ===",
                a.record, rec.origin
            );
            println!("{text}");
            println!(
                "=== {} tokens, {supervised} supervised ({}) ===",
                ex.input_ids.len(),
                if color {
                    "green"
                } else {
                    "between \u{ab} and \u{bb}"
                }
            );
            let mut out = String::new();
            let mut open = false;
            for (p, &t) in pieces.iter().zip(&ex.targets) {
                if t != open {
                    out.push_str(match (t, color) {
                        (true, true) => "\x1b[32m",
                        (false, true) => "\x1b[0m",
                        (true, false) => "\u{ab}",
                        (false, false) => "\u{bb}",
                    });
                    open = t;
                }
                out.push_str(p);
            }
            if open {
                out.push_str(if color { "\x1b[0m" } else { "\u{bb}" });
            }
            println!("{out}");
        }
    }
    Ok(())
}
