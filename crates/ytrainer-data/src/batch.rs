//! Records -> examples -> micro-batches -> optimizer steps.
//!
//! Alignment convention, used everywhere: `target_mask[t]` (like `Example::targets[t]`) is true when
//! token `input_ids[t]` is a label predicted from the hidden state at `t - 1` of the same row. So the
//! loss at a row is `CE(logits[t - 1], input_ids[t])` for every `t` with `target_mask[t]`; position 0
//! of a row and the first token of a packed document are never targets.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use crate::error::DataError;
use crate::formats::{Record, RecordKind};
use crate::template::ChatTemplate;
use crate::tokenize::{Example, TokenizerWrapper, TrainOn, tokenize_chat_weighted, tokenize_text};

/// What to do with a sequence longer than `max_seq_len` (`[data] overlong` in a run config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    /// Keep the first `max_seq_len` tokens (and whatever targets they hold).
    #[default]
    Truncate,
    /// Drop the example.
    Skip,
}

#[derive(Debug, Clone)]
pub struct DataOptions {
    pub max_seq_len: usize,
    pub overlong: Overlong,
    pub train_on: TrainOn,
    /// Continued pretraining: text records are packed into rows of exactly `max_seq_len` tokens.
    pub cpt: bool,
    /// Extra chat-template variables (e.g. `enable_thinking`).
    pub template_vars: Map<String, Value>,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            max_seq_len: 2048,
            overlong: Overlong::Truncate,
            train_on: TrainOn::AllAssistant,
            cpt: false,
            template_vars: Map::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataStats {
    /// Records given to `prepare`.
    pub records: usize,
    /// Examples produced (packed rows count once each).
    pub examples: usize,
    /// Examples cut to `max_seq_len`.
    pub truncated: usize,
    /// Examples dropped because they were too long (`Overlong::Skip`).
    pub skipped_overlong: usize,
    /// Examples dropped because no token was left to supervise.
    pub skipped_no_targets: usize,
    /// Documents packed (cpt only).
    pub documents: usize,
    /// Sum of the examples' lengths.
    pub total_tokens: usize,
    /// Sum of the examples' supervised tokens.
    pub supervised_tokens: usize,
    /// Longest example.
    pub max_len: usize,
}

#[derive(Debug, Clone)]
pub struct Prepared {
    pub examples: Vec<Example>,
    pub stats: DataStats,
}

/// Tokenizes and masks every record. Chat records need `template`; text records are either packed
/// (`cpt`) or kept one per example with every token after the first supervised.
pub fn prepare(
    records: &[Record],
    tok: &TokenizerWrapper,
    template: Option<&ChatTemplate>,
    opts: &DataOptions,
) -> Result<Prepared, DataError> {
    if opts.max_seq_len < 2 {
        return Err(DataError::InvalidOption(format!(
            "max_seq_len = {} is too small; it must be at least 2",
            opts.max_seq_len
        )));
    }
    let mut stats = DataStats {
        records: records.len(),
        ..Default::default()
    };
    let mut examples = Vec::new();
    let mut docs: Vec<Example> = Vec::new();
    for rec in records {
        let mut ex = match &rec.kind {
            RecordKind::Chat { messages } => {
                let Some(t) = template else {
                    return Err(DataError::Record {
                        origin: rec.origin.clone(),
                        message: "this is a chat record but no chat template is available; give the model's template (or use text records for continued pretraining)".into(),
                    });
                };
                // Only the first max_seq_len tokens are kept (or the record is skipped as too long), so
                // tokenizing stops after one more.
                tokenize_chat_weighted(
                    tok,
                    t,
                    messages,
                    &rec.weights,
                    opts.train_on,
                    &opts.template_vars,
                    Some(opts.max_seq_len),
                )
                .map_err(|e| match e {
                    DataError::PrefixMismatch { turn, .. } => DataError::PrefixMismatch {
                        origin: rec.origin.to_string(),
                        turn,
                    },
                    DataError::Template(m) => DataError::Template(format!("{}: {m}", rec.origin)),
                    other => other,
                })?
            }
            RecordKind::Text { text } if !opts.cpt => {
                // Supervised text records keep their first max_seq_len tokens, like chats.
                let ids = tok.encode_prefix(text, opts.max_seq_len + 1)?;
                let targets = vec![true; ids.len()];
                let mut ex = Example::single(ids, targets, None);
                let w = rec.weights.record();
                if w != 1.0 {
                    ex.weights = crate::weights::Weights(vec![w; ex.len()]);
                }
                ex
            }
            RecordKind::Text { text } => {
                let w = rec.weights.record();
                if w != 1.0 {
                    return Err(DataError::Record {
                        origin: rec.origin.clone(),
                        message: format!(
                            "field \"weight\" = {w}: continued-pretraining documents are packed into shared \
                             rows, so a per-document weight is not supported; remove the field (or drop the \
                             document)"
                        ),
                    });
                }
                let mut ex = tokenize_text(tok, text, true)?;
                ex.origin = Some(rec.origin.clone());
                docs.push(ex);
                continue;
            }
        };
        ex.origin = Some(rec.origin.clone());
        if ex.len() > opts.max_seq_len {
            match opts.overlong {
                Overlong::Skip => {
                    stats.skipped_overlong += 1;
                    continue;
                }
                Overlong::Truncate => {
                    ex.truncate(opts.max_seq_len);
                    stats.truncated += 1;
                }
            }
        }
        if ex.num_targets() == 0 {
            stats.skipped_no_targets += 1;
            continue;
        }
        examples.push(ex);
    }
    stats.documents = docs.len();
    examples.extend(pack_documents(&docs, opts.max_seq_len));
    for ex in &examples {
        stats.total_tokens += ex.len();
        stats.supervised_tokens += ex.num_targets();
        stats.max_len = stats.max_len.max(ex.len());
    }
    stats.examples = examples.len();
    if examples.is_empty() {
        return Err(DataError::EmptyDataset {
            file: "<prepared data>".into(),
            message: format!(
                "no example is left to train on ({} records: {} too long and skipped, {} without any supervised token); raise max_seq_len, use overlong = truncate, or check the train_on setting",
                stats.records, stats.skipped_overlong, stats.skipped_no_targets
            ),
        });
    }
    Ok(Prepared { examples, stats })
}

/// Concatenates documents (each already ending in EOS) and cuts the stream into rows of exactly
/// `row_len` tokens (the last row may be shorter). A document split across rows continues in the
/// next row as a new segment with positions from 0, since attention cannot reach the previous row.
pub fn pack_documents(docs: &[Example], row_len: usize) -> Vec<Example> {
    let mut rows = Vec::new();
    let mut cur = empty_row();
    for doc in docs {
        let mut off = 0;
        while off < doc.len() {
            if cur.len() == row_len {
                rows.push(std::mem::replace(&mut cur, empty_row()));
            }
            let take = (row_len - cur.len()).min(doc.len() - off);
            let seg = cur.segment_ids.last().copied().unwrap_or(0) + 1;
            for j in 0..take {
                cur.input_ids.push(doc.input_ids[off + j]);
                cur.targets.push(j > 0);
                cur.position_ids.push(j as u32);
                cur.segment_ids.push(seg);
            }
            if cur.origin.is_none() {
                cur.origin = doc.origin.clone();
            }
            off += take;
        }
    }
    if !cur.is_empty() {
        rows.push(cur);
    }
    rows.retain(|r| r.num_targets() > 0);
    rows
}

fn empty_row() -> Example {
    Example {
        input_ids: Vec::new(),
        targets: Vec::new(),
        position_ids: Vec::new(),
        segment_ids: Vec::new(),
        origin: None,
        weights: Default::default(),
    }
}

/// How an epoch's supervised tokens become optimizer steps (docs/losses.md, "One-pass and windowed training").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Every supervised token in one forward/backward; steps are filled up to `tokens_per_step`.
    #[default]
    OnePass,
    /// Each example's supervised tokens are cut into consecutive windows of `token_batch`
    /// targets; each window is its own step. Every target is trained exactly once per epoch and
    /// the tail window is kept.
    Windowed { token_batch: usize },
}

#[derive(Debug, Clone)]
pub struct BatchOptions {
    pub seed: u64,
    pub shuffle: bool,
    /// Most padded tokens (`batch * seq`) in one micro-batch; an example longer than this gets a
    /// micro-batch of its own.
    pub micro_batch_tokens: usize,
    pub max_micro_batch_size: usize,
    /// Supervised tokens per optimizer step: micro-batches are accumulated until the step holds
    /// at least this many (the last step of an epoch may hold fewer).
    pub tokens_per_step: usize,
    /// When > 0, every step is this many micro-batches (gradient accumulation by count, as
    /// `gradient_accumulation_steps` in transformers) and `tokens_per_step` is not used; the last step of an
    /// epoch may hold fewer. One-pass mode only.
    pub micro_batches_per_step: usize,
    pub mode: Mode,
    pub pad_id: u32,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            seed: 0,
            shuffle: true,
            micro_batch_tokens: 8192,
            max_micro_batch_size: 16,
            tokens_per_step: 4096,
            micro_batches_per_step: 0,
            mode: Mode::OnePass,
            pad_id: 0,
        }
    }
}

/// A rectangular batch, row-major `[batch, seq]`, right-padded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    pub batch: usize,
    pub seq: usize,
    /// Padded with `pad_id`.
    pub input_ids: Vec<u32>,
    /// 0 at padding.
    pub position_ids: Vec<u32>,
    /// 0 = padding; tokens may attend only to earlier tokens of the same segment id.
    pub segment_ids: Vec<u32>,
    /// True at `t` if `input_ids[t]` is a target predicted from hidden state `t - 1` (same row).
    pub target_mask: Vec<bool>,
    /// Indices into the example slice, one per row.
    pub examples: Vec<usize>,
    /// Data weight of each position as a target (`batch * seq`, row-major); empty = every weight 1.
    pub weights: crate::weights::Weights,
}

impl MicroBatch {
    pub fn num_targets(&self) -> usize {
        self.target_mask.iter().filter(|&&t| t).count()
    }

    /// Builds the padded rectangle; `masks[i]`, when given, replaces example i's targets.
    fn build(
        examples: &[Example],
        rows: &[usize],
        masks: Option<Vec<Vec<bool>>>,
        seq: usize,
        pad_id: u32,
    ) -> Self {
        let batch = rows.len();
        let mut mb = MicroBatch {
            batch,
            seq,
            input_ids: vec![pad_id; batch * seq],
            position_ids: vec![0; batch * seq],
            segment_ids: vec![0; batch * seq],
            target_mask: vec![false; batch * seq],
            examples: rows.to_vec(),
            weights: Default::default(),
        };
        if rows.iter().any(|&i| !examples[i].weights.is_uniform()) {
            mb.weights = crate::weights::Weights(vec![1.0; batch * seq]);
        }
        for (r, &i) in rows.iter().enumerate() {
            let ex = &examples[i];
            let n = ex.len().min(seq);
            let o = r * seq;
            mb.input_ids[o..o + n].copy_from_slice(&ex.input_ids[..n]);
            mb.position_ids[o..o + n].copy_from_slice(&ex.position_ids[..n]);
            mb.segment_ids[o..o + n].copy_from_slice(&ex.segment_ids[..n]);
            let t = masks.as_ref().map(|m| &m[r]).unwrap_or(&ex.targets);
            mb.target_mask[o..o + n].copy_from_slice(&t[..n]);
            if !mb.weights.0.is_empty() {
                for j in 0..n {
                    mb.weights.0[o + j] = ex.weights.get(j);
                }
            }
        }
        mb
    }
}

/// One optimizer step: gradients of all its micro-batches are accumulated, normalised over the
/// whole step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub micro_batches: Vec<MicroBatch>,
}

impl Step {
    pub fn num_targets(&self) -> usize {
        self.micro_batches.iter().map(MicroBatch::num_targets).sum()
    }
}

fn epoch_rng(seed: u64, epoch: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

impl BatchOptions {
    pub fn validate(&self) -> Result<(), DataError> {
        if let Mode::Windowed { token_batch: 0 } = self.mode {
            return Err(DataError::InvalidOption(
                "token_batch = 0: windowed mode needs at least 1 target token per window (the seed crashed here); use token_batch >= 1 or mode = \"one-pass\"".into(),
            ));
        }
        if self.max_micro_batch_size == 0 {
            return Err(DataError::InvalidOption(
                "max_micro_batch_size must be at least 1".into(),
            ));
        }
        if self.micro_batches_per_step > 0 && matches!(self.mode, Mode::Windowed { .. }) {
            return Err(DataError::InvalidOption(
                "grad_accum / batch_size apply to one-pass mode; windowed mode makes one step per window of \
                 token_batch targets: remove them or use mode = \"one-pass\""
                    .into(),
            ));
        }
        if self.micro_batch_tokens == 0 {
            return Err(DataError::InvalidOption(
                "micro_batch_tokens must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Plans one epoch. Deterministic for `(examples, opts, epoch)`: the order comes from a ChaCha8
/// generator seeded with `seed` and `epoch`, pinned so plans stay stable across `rand` upgrades.
pub fn plan_epoch(
    examples: &[Example],
    opts: &BatchOptions,
    epoch: usize,
) -> Result<Vec<Step>, DataError> {
    opts.validate()?;
    let mut rng = epoch_rng(opts.seed, epoch);
    let mut order: Vec<usize> = (0..examples.len())
        .filter(|&i| examples[i].num_targets() > 0)
        .collect();
    if opts.shuffle {
        order.shuffle(&mut rng);
    }
    match opts.mode {
        Mode::Windowed { token_batch } => {
            Ok(plan_windowed(examples, &order, token_batch, opts.pad_id))
        }
        Mode::OnePass => Ok(plan_one_pass(examples, order, opts, &mut rng)),
    }
}

fn plan_windowed(examples: &[Example], order: &[usize], n: usize, pad_id: u32) -> Vec<Step> {
    let mut steps = Vec::new();
    for &i in order {
        let ex = &examples[i];
        let positions: Vec<usize> = (0..ex.len()).filter(|&t| ex.targets[t]).collect();
        for window in positions.chunks(n) {
            // Tokens after the window's last target cannot influence its logits (causal attention),
            // so the row ends there.
            let seq = window[window.len() - 1] + 1;
            let mut mask = vec![false; seq];
            for &t in window {
                mask[t] = true;
            }
            steps.push(Step {
                micro_batches: vec![MicroBatch::build(
                    examples,
                    &[i],
                    Some(vec![mask]),
                    seq,
                    pad_id,
                )],
            });
        }
    }
    steps
}

/// Length bucketing: the shuffled order is cut into pools of a few dozen micro-batches' worth of
/// examples, each pool is sorted by length and cut greedily into micro-batches, and (when
/// shuffling) the micro-batches are shuffled again so steps mix lengths. Without shuffling the
/// dataset order is kept as is.
fn plan_one_pass(
    examples: &[Example],
    mut order: Vec<usize>,
    opts: &BatchOptions,
    rng: &mut ChaCha8Rng,
) -> Vec<Step> {
    if opts.shuffle {
        let pool = opts.max_micro_batch_size * 32;
        for chunk in order.chunks_mut(pool) {
            chunk.sort_by_key(|&i| (std::cmp::Reverse(examples[i].len()), i));
        }
    }
    let mut mbs: Vec<MicroBatch> = Vec::new();
    let mut rows: Vec<usize> = Vec::new();
    let mut seq = 0;
    let flush = |rows: &mut Vec<usize>, seq: &mut usize, mbs: &mut Vec<MicroBatch>| {
        if !rows.is_empty() {
            mbs.push(MicroBatch::build(examples, rows, None, *seq, opts.pad_id));
            rows.clear();
            *seq = 0;
        }
    };
    for i in order {
        let len = examples[i].len();
        let new_seq = seq.max(len);
        if !rows.is_empty()
            && (rows.len() == opts.max_micro_batch_size
                || new_seq * (rows.len() + 1) > opts.micro_batch_tokens)
        {
            flush(&mut rows, &mut seq, &mut mbs);
        }
        seq = seq.max(len);
        rows.push(i);
    }
    flush(&mut rows, &mut seq, &mut mbs);
    if opts.shuffle {
        mbs.shuffle(rng);
    }
    let mut steps = Vec::new();
    let mut cur: Vec<MicroBatch> = Vec::new();
    let mut cur_targets = 0;
    for mb in mbs {
        cur_targets += mb.num_targets();
        cur.push(mb);
        let full = if opts.micro_batches_per_step > 0 {
            cur.len() == opts.micro_batches_per_step
        } else {
            cur_targets >= opts.tokens_per_step
        };
        if full {
            steps.push(Step {
                micro_batches: std::mem::take(&mut cur),
            });
            cur_targets = 0;
        }
    }
    if !cur.is_empty() {
        steps.push(Step { micro_batches: cur });
    }
    steps
}
