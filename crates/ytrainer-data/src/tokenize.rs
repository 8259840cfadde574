//! Tokenization and the supervision mask.
//!
//! A conversation is rendered once whole and once per assistant turn as two prefixes: the history
//! with the generation prompt (what the model sees at inference before answering) and the history
//! including the answer. The difference is the answer's character span. The text is then tokenized
//! as alternating unsupervised / supervised segments, each on its own, so that
//! - the prompt tokens are exactly the ones inference would see, and
//! - a BPE merge across the prompt/answer border can never move the mask by a token.
//!
//! Supervised: the answer and the end-of-turn token (`<|im_end|>`), not the assistant header and
//! not the whitespace the template writes after the end-of-turn token (inference stops at the
//! end-of-turn token, so the model never has to produce it).

use std::path::Path;

use serde_json::{Map, Value};
use tokenizers::Tokenizer;

use crate::error::DataError;
use crate::formats::{Message, Origin};
use crate::template::ChatTemplate;

/// Which assistant turns are supervised (`[data] train_on` in a run config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    /// Every assistant turn (default).
    #[default]
    AllAssistant,
    /// Only the final assistant turn (the seed's behaviour, without dropping the history).
    LastAssistant,
    /// Every token of the rendered conversation.
    Everything,
}

/// One tokenized training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// `targets[t]` is true when token `t` is supervised, i.e. predicted from position `t - 1`;
    /// `targets[0]` is always false.
    pub targets: Vec<bool>,
    /// Restart at 0 at each packed document; `0..len` for a single sequence.
    pub position_ids: Vec<u32>,
    /// 1, 2, 3, ... per packed document; all 1 for a single sequence. 0 is reserved for padding.
    pub segment_ids: Vec<u32>,
    pub origin: Option<Origin>,
    /// Data weight of each token as a target (the record's `weight` times its message's); empty = all 1.
    pub weights: crate::weights::Weights,
}

impl Example {
    /// A single (unpacked) sequence.
    pub fn single(input_ids: Vec<u32>, mut targets: Vec<bool>, origin: Option<Origin>) -> Self {
        if let Some(t) = targets.first_mut() {
            *t = false;
        }
        let n = input_ids.len();
        Example {
            input_ids,
            targets,
            position_ids: (0..n as u32).collect(),
            segment_ids: vec![1; n],
            origin,
            weights: Default::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    pub fn num_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t).count()
    }

    /// Cuts the sequence to `n` tokens (targets beyond are lost).
    pub fn truncate(&mut self, n: usize) {
        self.input_ids.truncate(n);
        self.targets.truncate(n);
        self.position_ids.truncate(n);
        self.segment_ids.truncate(n);
        self.weights.0.truncate(n);
    }
}

/// A `tokenizers` tokenizer plus the ids training needs. Never adds special tokens on its own:
/// a BOS appears only if the chat template renders it.
pub struct TokenizerWrapper {
    inner: Tokenizer,
    eos_id: Option<u32>,
}

impl std::fmt::Debug for TokenizerWrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerWrapper")
            .field("vocab_size", &self.vocab_size())
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer(e.to_string())
}

/// Used when no tokenizer_config.json names the EOS token.
const EOS_CANDIDATES: [&str; 5] = ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<eos>"];

impl TokenizerWrapper {
    /// Loads `tokenizer.json`; the EOS token is taken from a sibling tokenizer_config.json
    /// (`eos_token`) when there is one, else from well-known names.
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut w = TokenizerWrapper {
            inner,
            eos_id: None,
        };
        let cfg = path.with_file_name("tokenizer_config.json");
        let eos_name = std::fs::read_to_string(cfg)
            .ok()
            .and_then(|s| serde_json::from_str::<Map<String, Value>>(&s).ok())
            .and_then(|m| match m.get("eos_token") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Object(o)) => {
                    o.get("content").and_then(Value::as_str).map(str::to_string)
                }
                _ => None,
            });
        w.eos_id = eos_name
            .and_then(|n| w.token_to_id(&n))
            .or_else(|| w.guess_eos());
        Ok(w)
    }

    /// Builds from the text of a tokenizer.json (e.g. the output of [`crate::bpe::train_byte_level_bpe`]).
    pub fn from_json_str(json: &str) -> Result<Self, DataError> {
        let inner: Tokenizer = json.parse().map_err(tok_err)?;
        let mut w = TokenizerWrapper {
            inner,
            eos_id: None,
        };
        w.eos_id = w.guess_eos();
        Ok(w)
    }

    fn guess_eos(&self) -> Option<u32> {
        EOS_CANDIDATES.iter().find_map(|t| self.token_to_id(t))
    }

    /// Overrides the EOS token (e.g. `<|endoftext|>` for continued pretraining of a base model).
    pub fn set_eos_token(&mut self, token: &str) -> Result<(), DataError> {
        self.eos_id = Some(self.token_to_id(token).ok_or_else(|| {
            DataError::Tokenizer(format!("EOS token \"{token}\" is not in the vocabulary"))
        })?);
        Ok(())
    }

    /// The first tokens of `text`: a prefix of `encode(text)` at least `n` tokens long (or all of it), without
    /// encoding all of a huge text. A growing leading slice is encoded and only tokens ending well before the
    /// cut are kept: pre-tokenization splits on words, so those are the full text's tokens (a single
    /// "word" longer than the margin could still differ near the cut).
    pub fn encode_prefix(&self, text: &str, n: usize) -> Result<Vec<u32>, DataError> {
        const MARGIN: usize = 4096;
        let mut cut = n.saturating_mul(8).max(64 * 1024);
        while cut + MARGIN < text.len() {
            let mut c = cut;
            while !text.is_char_boundary(c) {
                c -= 1;
            }
            let enc = self.inner.encode(&text[..c], false).map_err(tok_err)?;
            let safe = enc
                .get_offsets()
                .iter()
                .take_while(|o| o.1 + MARGIN <= c)
                .count();
            if safe >= n {
                return Ok(enc.get_ids()[..safe].to_vec());
            }
            cut = cut.saturating_mul(4);
        }
        self.encode(text)
    }

    /// Ids of `text`; special-token strings in it (e.g. `<|im_end|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, DataError> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// A conversation's rendering, cut into spans: `(byte range, supervised)`, covering the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    pub text: String,
    pub spans: Vec<(std::ops::Range<usize>, bool)>,
    /// For each span, the message it supervises (`None` for unsupervised spans and `TrainOn::Everything`).
    pub span_messages: Vec<Option<usize>>,
}

/// Renders `messages` and locates the supervised character spans (see the module docs).
pub fn render_chat_spans(
    template: &ChatTemplate,
    messages: &[Message],
    train_on: TrainOn,
    vars: &Map<String, Value>,
) -> Result<RenderedChat, DataError> {
    let full = template.render(messages, false, vars)?;
    let mut spans = Vec::new();
    let mut span_messages = Vec::new();
    chat_spans(
        template,
        messages,
        train_on,
        vars,
        &full,
        &mut |r, sup, msg| {
            spans.push((r, sup));
            span_messages.push(msg);
            Ok(true)
        },
    )?;
    Ok(RenderedChat {
        text: full,
        spans,
        span_messages,
    })
}

/// A span of the rendering: its byte range, whether it is supervised, and the message it supervises.
type OnSpan<'a> =
    dyn FnMut(std::ops::Range<usize>, bool, Option<usize>) -> Result<bool, DataError> + 'a;

/// Feeds the spans of `full` (the whole conversation's rendering) to `on_span` in order, until it returns
/// `false`. Each assistant turn's span needs two renderings of the conversation up to it, so a caller that
/// keeps only the first tokens stops early instead of paying for every turn (quadratic in the turns).
fn chat_spans(
    template: &ChatTemplate,
    messages: &[Message],
    train_on: TrainOn,
    vars: &Map<String, Value>,
    full: &str,
    on_span: &mut OnSpan<'_>,
) -> Result<(), DataError> {
    if train_on == TrainOn::Everything {
        on_span(0..full.len(), true, None)?;
        return Ok(());
    }
    let last = messages.iter().rposition(|m| m.role == "assistant");
    let mut cursor = 0;
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" || (train_on == TrainOn::LastAssistant && Some(i) != last) {
            continue;
        }
        let mismatch = || DataError::PrefixMismatch {
            origin: "conversation".into(),
            turn: i,
        };
        let prompt = template.render(&messages[..i], true, vars)?;
        let upto = template.render(&messages[..=i], false, vars)?;
        if !upto.starts_with(&prompt) || !full.starts_with(&upto) {
            return Err(mismatch());
        }
        let start = prompt.len();
        let end = start + upto[start..].trim_end().len();
        if start < cursor {
            return Err(mismatch());
        }
        if start > cursor && !on_span(cursor..start, false, None)? {
            return Ok(());
        }
        if end > start && !on_span(start..end, true, Some(i))? {
            return Ok(());
        }
        cursor = end;
    }
    if cursor < full.len() {
        on_span(cursor..full.len(), false, None)?;
    }
    Ok(())
}

/// Tokenizes a conversation with its supervision mask.
pub fn tokenize_chat(
    tok: &TokenizerWrapper,
    template: &ChatTemplate,
    messages: &[Message],
    train_on: TrainOn,
    vars: &Map<String, Value>,
) -> Result<Example, DataError> {
    tokenize_chat_limited(tok, template, messages, train_on, vars, None)
}

/// [`tokenize_chat`], stopping once more than `keep` tokens are known: the caller keeps (or judges too long)
/// only the first `keep`, so neither the rest of a huge record nor the remaining turns are tokenized (issue 21:
/// a 10 MB record cost 2.3 GB, 8,000 turns 62 s). The first `keep` tokens equal the unlimited result's.
pub fn tokenize_chat_limited(
    tok: &TokenizerWrapper,
    template: &ChatTemplate,
    messages: &[Message],
    train_on: TrainOn,
    vars: &Map<String, Value>,
    keep: Option<usize>,
) -> Result<Example, DataError> {
    let none = crate::weights::RecordWeights::default();
    tokenize_chat_weighted(tok, template, messages, &none, train_on, vars, keep)
}

/// [`tokenize_chat_limited`] with data weights: each supervised token gets `record_weight` times its message's
/// weight (`message_weights[i]` for message `i`, 1 when missing); a message of weight 0 is not supervised at all.
pub fn tokenize_chat_weighted(
    tok: &TokenizerWrapper,
    template: &ChatTemplate,
    messages: &[Message],
    weights: &crate::weights::RecordWeights,
    train_on: TrainOn,
    vars: &Map<String, Value>,
    keep: Option<usize>,
) -> Result<Example, DataError> {
    let full = template.render(messages, false, vars)?;
    let mut ids = Vec::new();
    let mut targets = Vec::new();
    let mut w = Vec::new();
    chat_spans(
        template,
        messages,
        train_on,
        vars,
        &full,
        &mut |range, sup, msg| {
            let seg = match keep {
                Some(k) => tok.encode_prefix(&full[range], k + 1 - ids.len())?,
                None => tok.encode(&full[range])?,
            };
            let mw = msg.map_or(1.0, |i| weights.messages.get(i));
            let train = sup && mw > 0.0;
            targets.extend(std::iter::repeat_n(train, seg.len()));
            let tw = if train { weights.record() * mw } else { 1.0 };
            w.extend(std::iter::repeat_n(tw, seg.len()));
            ids.extend(seg);
            Ok(keep.is_none_or(|k| ids.len() <= k))
        },
    )?;
    let mut ex = Example::single(ids, targets, None);
    if w.iter().any(|&x| x != 1.0) {
        ex.weights = crate::weights::Weights(w);
    }
    Ok(ex)
}

/// Tokenizes a plain document; every token after the first is supervised.
pub fn tokenize_text(
    tok: &TokenizerWrapper,
    text: &str,
    add_eos: bool,
) -> Result<Example, DataError> {
    let mut ids = tok.encode(text)?;
    if add_eos {
        let eos = tok.eos_id().ok_or_else(|| {
            DataError::Tokenizer(
                "the tokenizer has no EOS token; set one with set_eos_token".into(),
            )
        })?;
        ids.push(eos);
    }
    let targets = vec![true; ids.len()];
    Ok(Example::single(ids, targets, None))
}
