//! `ytrainer render`: flags in, [`ytrainer_recipes::render`] (one record as training sees it, or a chat
//! template applied to messages), text with the supervised tokens marked, or JSON, out.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use serde_json::json;
use ytrainer_recipes::render::{
    RecordRender, RenderedRecord, TemplateRender, render_record, render_template,
};

use crate::format::Format;
use crate::interop::{parse_train_on, parse_vars};

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

/// `ytrainer render`
pub fn render(a: RenderArgs) -> Result<()> {
    let vars = parse_vars(&a.vars)?;
    if let (Some(template), Some(messages)) = (&a.template, &a.messages) {
        let out = render_template(&TemplateRender {
            template: template.clone(),
            messages: messages.clone(),
            add_generation_prompt: a.add_generation_prompt,
            bos_token: a.bos_token.clone(),
            eos_token: a.eos_token.clone(),
            vars,
            date: a.date.clone(),
        })?;
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
    let r = render_record(&RecordRender {
        model: model.clone(),
        data: data.clone(),
        record: a.record,
        train_on: parse_train_on(&a.train_on)?,
        max_seq_len: a.max_seq_len,
        vars,
        date: a.date.clone(),
    })?;
    match a.format {
        Format::Json => println!("{}", r.to_json()),
        Format::Text => print_text(&r, std::io::stdout().is_terminal()),
    }
    Ok(())
}

/// The text, then the tokens with the supervised runs in green on a terminal, between guillemets elsewhere; a
/// supervised run whose data weight is not 1 is followed by `[weight W]`.
fn print_text(r: &RenderedRecord, color: bool) {
    println!("=== rendered text (record {}, {}) ===", r.record, r.origin);
    println!("{}", r.text);
    println!(
        "=== {} tokens, {} supervised ({}) ===",
        r.ids.len(),
        r.n_supervised(),
        if color {
            "green"
        } else {
            "between \u{ab} and \u{bb}"
        }
    );
    let mut out = String::new();
    let mut open = false;
    let mut run_weight = 1.0f32;
    let close = |out: &mut String, w: f32| {
        out.push_str(if color { "\x1b[0m" } else { "\u{bb}" });
        if w != 1.0 {
            out.push_str(&format!("[weight {w}]"));
        }
    };
    for (i, (p, &t)) in r.pieces.iter().zip(&r.supervised).enumerate() {
        let w = if t { r.weight(i) } else { 1.0 };
        if open && (!t || w != run_weight) {
            close(&mut out, run_weight);
            open = false;
        }
        if t && !open {
            out.push_str(if color { "\x1b[32m" } else { "\u{ab}" });
            open = true;
            run_weight = w;
        }
        out.push_str(p);
    }
    if open {
        close(&mut out, run_weight);
    }
    println!("{out}");
}
