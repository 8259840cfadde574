//! Showing what a model is fed: one data record as training sees it (the rendered text and its tokens, with
//! the supervised ones marked), or any chat template applied to a list of messages. Both go through the same
//! template and preparation code as training, so what is shown is what is trained on.

use std::path::PathBuf;

use serde_json::json;
use ytrainer_data::{
    ChatTemplate, DataOptions, Message, Overlong, RecordKind, TrainOn, load_records, prepare,
    render_chat_spans,
};

use crate::error::{Context, Result};
use crate::source::load_tokenizer;
use crate::{bail, invalid};

/// A chat template file applied to a messages file, with no model involved.
#[derive(Debug, Clone)]
pub struct TemplateRender {
    /// The Jinja template file.
    pub template: PathBuf,
    /// JSON file with a list of `{"role": .., "content": ..}` messages.
    pub messages: PathBuf,
    /// Append the assistant prompt (what inference renders).
    pub add_generation_prompt: bool,
    /// `bos_token` passed to the template.
    pub bos_token: Option<String>,
    /// `eos_token` passed to the template.
    pub eos_token: Option<String>,
    /// Template variables.
    pub vars: serde_json::Map<String, serde_json::Value>,
    /// What `strftime_now` returns, `YYYY-MM-DD`; pinned so renderings that print the date are reproducible.
    pub date: Option<String>,
}

/// One record of a data file, prepared with a model's tokenizer and template.
#[derive(Debug, Clone)]
pub struct RecordRender {
    /// Model directory or `.gguf` file; only its tokenizer and chat template are read.
    pub model: PathBuf,
    /// The data file.
    pub data: PathBuf,
    /// 0-based record index.
    pub record: usize,
    /// What is supervised in chat data.
    pub train_on: TrainOn,
    /// Longest sample in tokens (as in training).
    pub max_seq_len: usize,
    /// Template variables.
    pub vars: serde_json::Map<String, serde_json::Value>,
    /// What `strftime_now` returns, `YYYY-MM-DD`.
    pub date: Option<String>,
}

/// A record as training sees it.
#[derive(Debug, Clone)]
pub struct RenderedRecord {
    /// 0-based record index.
    pub record: usize,
    /// Where it is in the data file (`file:line`).
    pub origin: String,
    /// The rendered text (chat records) or the text itself.
    pub text: String,
    /// The token ids of the prepared example.
    pub ids: Vec<u32>,
    /// Each token's text.
    pub pieces: Vec<String>,
    /// Whether each token is supervised.
    pub supervised: Vec<bool>,
    /// Each token's data weight as a target (the record's `weight` times its message's); empty when all are 1.
    pub weights: Vec<f32>,
}

impl RenderedRecord {
    /// How many tokens are supervised.
    pub fn n_supervised(&self) -> usize {
        self.supervised.iter().filter(|&&t| t).count()
    }

    /// Token `i`'s data weight (1 when the record carries none).
    pub fn weight(&self, i: usize) -> f32 {
        self.weights.get(i).copied().unwrap_or(1.0)
    }

    /// The JSON object `ytrainer render --format json` prints (tokens carry a `weight` when the data gives any).
    pub fn to_json(&self) -> serde_json::Value {
        let tokens: Vec<_> = self
            .ids
            .iter()
            .zip(&self.pieces)
            .zip(&self.supervised)
            .enumerate()
            .map(|(i, ((id, p), t))| {
                if self.weights.is_empty() {
                    json!({"id": id, "piece": p, "supervised": t})
                } else {
                    json!({"id": id, "piece": p, "supervised": t, "weight": self.weight(i)})
                }
            })
            .collect();
        json!({"record": self.record, "origin": self.origin, "text": self.text,
               "n_tokens": self.ids.len(), "n_supervised": self.n_supervised(), "tokens": tokens})
    }
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
            .ok_or_else(|| invalid!("--date `{d}`: expected YYYY-MM-DD, e.g. 2024-07-26"))?;
        t.set_fixed_time(secs);
    }
    Ok(())
}

/// The template's output for the messages.
pub fn render_template(s: &TemplateRender) -> Result<String> {
    let (tp, mp) = (&s.template, &s.messages);
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
    let mut t = ChatTemplate::new(&src, s.bos_token.clone(), s.eos_token.clone())
        .with_context(|| format!("compiling {}", tp.display()))?;
    fix_date(&mut t, s.date.as_deref())?;
    t.render(&messages, s.add_generation_prompt, &s.vars)
        .with_context(|| format!("rendering {}", tp.display()))
}

/// Record `s.record` of the data file, rendered and tokenized as training would.
pub fn render_record(s: &RecordRender) -> Result<RenderedRecord> {
    let (model, data) = (&s.model, &s.data);
    let (tok, mut template) = load_tokenizer(model)?;
    if let Some(t) = template.as_mut() {
        fix_date(t, s.date.as_deref())?;
    }
    let loaded = load_records(data)?;
    let n = loaded.records.len();
    let rec = loaded.records.get(s.record).with_context(|| {
        format!(
            "--record {}: {} has {n} records (indices 0..{})",
            s.record,
            data.display(),
            n.saturating_sub(1)
        )
    })?;
    let opts = DataOptions {
        max_seq_len: s.max_seq_len,
        overlong: Overlong::Truncate,
        train_on: s.train_on,
        cpt: false,
        template_vars: s.vars.clone(),
    };
    let text = match &rec.kind {
        RecordKind::Chat { messages } => {
            let t = template
                .as_ref()
                .with_context(|| format!("{}: the model has no chat template", model.display()))?;
            render_chat_spans(t, messages, s.train_on, &s.vars)?.text
        }
        RecordKind::Text { text } => text.clone(),
    };
    let prepared = prepare(std::slice::from_ref(rec), &tok, template.as_ref(), &opts)?;
    let Some(ex) = prepared.examples.first() else {
        bail!(
            "record {} ({}) yields no training example (no supervised tokens, or skipped)",
            s.record,
            rec.origin
        );
    };
    let pieces = ex
        .input_ids
        .iter()
        .map(|&id| tok.decode(&[id], false).unwrap_or_default())
        .collect();
    Ok(RenderedRecord {
        record: s.record,
        origin: rec.origin.to_string(),
        text,
        ids: ex.input_ids.clone(),
        pieces,
        supervised: ex.targets.clone(),
        weights: if ex.weights.is_uniform() {
            Vec::new()
        } else {
            (0..ex.len()).map(|i| ex.weights.get(i)).collect()
        },
    })
}
