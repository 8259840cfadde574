//! Scoring samples token by token: the loss, entropy, rank and probability of every supervised token (and the
//! most likely alternatives when asked), for data prepared exactly as training prepares it or for raw token-id
//! lists. The numbers come through the trainer's own code path (`ytrainer_core::step`), so a score here and a
//! training step's loss on the same tokens are one measurement.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::json;
use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{LossFn, Registry, TokenReweighter, tensor_from_slice, tensor_to_vec};
use ytrainer_core::step::{DeviceBatch, entropy, target_log_probs, to_device, token_ce};
use ytrainer_data::{DataOptions, Example, MicroBatch, Overlong, TrainOn, load_records, prepare};

use crate::bail;
use crate::error::{Context, Result};
use crate::source::{Loaded, inference_device, load_for_inference};

/// What is scored.
#[derive(Debug, Clone)]
pub enum ScoreInput {
    /// A data file, prepared as `run` prepares it (overlong samples truncated, never packed).
    Data {
        /// The file (json, jsonl, csv, txt).
        path: PathBuf,
        /// What is supervised in chat data.
        train_on: TrainOn,
        /// Longest sample in tokens.
        max_seq_len: usize,
        /// Variables handed to the chat template.
        template_vars: serde_json::Map<String, serde_json::Value>,
    },
    /// A JSON file holding a list of token-id lists; every position after the first is a target, so a caller
    /// can score exact tokens without a tokenizer round trip.
    Ids(PathBuf),
}

/// Everything `ytrainer score` needs.
#[derive(Debug, Clone)]
pub struct ScoreSettings {
    /// Hugging Face model directory or `.gguf` file.
    pub model: PathBuf,
    /// PEFT LoRA adapter applied on top.
    pub adapter: Option<PathBuf>,
    /// The samples.
    pub input: ScoreInput,
    /// How many most likely tokens to list per position (0 = none).
    pub top_k: usize,
    /// `cpu`, `cuda[:N]` or `wgpu[:N]`.
    pub device: String,
}

/// The statistics of one scored token.
#[derive(Debug, Clone)]
pub struct TokenScore {
    /// The target token.
    pub id: u32,
    /// Its text.
    pub piece: String,
    /// Cross-entropy of the target.
    pub loss: f32,
    /// Entropy of the predicted distribution.
    pub entropy: f32,
    /// 1 + the number of tokens with a strictly larger logit (1 = the argmax).
    pub rank: i64,
    /// `exp(-loss)`.
    pub prob: f32,
    /// The most likely `(id, log-probability)` pairs, best first, when they were asked for.
    pub top: Option<Vec<(usize, f32)>>,
    /// The weight a token strategy gives this token ([`StrategyWeights`]), when one was asked for.
    pub weight: Option<f32>,
}

/// The scores of one sample.
#[derive(Debug, Clone)]
pub struct SampleScore {
    /// 0-based index of the sample.
    pub index: usize,
    /// Mean token loss; `None` when the sample has no targets.
    pub mean_loss: Option<f64>,
    /// Where the sample came from (`file:line`), for data files.
    pub origin: Option<String>,
    /// One entry per target, in order.
    pub tokens: Vec<TokenScore>,
    /// Each target's position in its sample (what a strategy reading positions sees in training).
    pub positions: Vec<u32>,
}

impl SampleScore {
    /// The JSON line `ytrainer score` writes. Built from `serde_json::Value`s rather than derived so that
    /// losses keep the f32 -> f64 widening (and non-finite numbers their `null`) earlier output had.
    pub fn to_json(&self) -> serde_json::Value {
        let Some(mean) = self.mean_loss else {
            return json!({"index": self.index, "mean_loss": null, "perplexity": null, "n_tokens": 0,
                          "tokens": []});
        };
        let tokens: Vec<serde_json::Value> = self
            .tokens
            .iter()
            .map(|s| {
                let mut t = json!({
                    "id": s.id,
                    "piece": s.piece,
                    "loss": s.loss,
                    "entropy": s.entropy,
                    "rank": s.rank,
                    "prob": s.prob,
                });
                if let Some(w) = s.weight {
                    t["weight"] = json!(w);
                }
                if let Some(top) = &s.top {
                    t["top"] = json!(
                        top.iter()
                            .map(|&(j, lp)| json!([j, lp]))
                            .collect::<Vec<_>>()
                    );
                }
                t
            })
            .collect();
        let mut out = json!({
            "index": self.index,
            "mean_loss": mean,
            "perplexity": mean.exp(),
            "n_tokens": self.tokens.len(),
            "tokens": tokens,
        });
        if let Some(o) = &self.origin {
            out["origin"] = json!(o);
        }
        out
    }
}

/// Token-weighted totals over the scored samples.
#[derive(Debug, Clone, Default)]
pub struct ScoreSummary {
    /// Samples scored (with or without targets).
    pub samples: usize,
    /// Targets counted in the mean.
    pub tokens: usize,
    /// Sum of the counted targets' losses.
    pub total_loss: f64,
    /// Weighed targets and the sum of their strategy weights (when a strategy was asked for).
    pub weighed: usize,
    /// Sum of the weights.
    pub total_weight: f64,
}

impl ScoreSummary {
    /// Counts one sample. A non-finite mean is left out, as its JSON line shows it as `null`.
    pub fn add(&mut self, s: &SampleScore) {
        self.samples += 1;
        if let Some(m) = s.mean_loss.filter(|m| m.is_finite()) {
            self.total_loss += m * s.tokens.len() as f64;
            self.tokens += s.tokens.len();
        }
        for w in s.tokens.iter().filter_map(|t| t.weight) {
            self.weighed += 1;
            self.total_weight += f64::from(w);
        }
    }

    /// Mean strategy weight per weighed target (`None` when no strategy was asked for or nothing was weighed).
    pub fn mean_weight(&self) -> Option<f64> {
        (self.weighed > 0).then(|| self.total_weight / self.weighed as f64)
    }

    /// Mean loss per counted target (`None` when nothing was counted).
    pub fn mean_loss(&self) -> Option<f64> {
        (self.tokens > 0).then(|| self.total_loss / self.tokens as f64)
    }
}

/// A loaded model with its prepared samples. Loading and scoring are separate steps so a front end can open
/// its output only once the inputs are known to be good.
pub struct Scorer {
    loaded: Loaded,
    device: Device,
    examples: Vec<Example>,
    top_k: usize,
}

impl Scorer {
    /// Picks the device, reads the samples and loads the model. Token-id lists are read before the model so a
    /// malformed file fails fast, and checked against the vocabulary after it.
    pub fn load(s: &ScoreSettings) -> Result<Self> {
        let device = inference_device(&s.device)?;
        let ids = match &s.input {
            ScoreInput::Ids(p) => Some(read_id_lists(p)?),
            ScoreInput::Data { .. } => None,
        };
        let loaded = load_for_inference(&s.model, s.adapter.as_deref(), &device)?;
        let examples = match &s.input {
            ScoreInput::Ids(_) => {
                let examples = ids.unwrap_or_default();
                let vocab = loaded.model.spec.vocab_size;
                for (i, ex) in examples.iter().enumerate() {
                    if let Some(bad) = ex.input_ids.iter().find(|&&id| id as usize >= vocab) {
                        bail!(
                            "--ids-json list {i}: token id {bad} is outside the model's vocabulary (size {vocab})"
                        );
                    }
                }
                examples
            }
            ScoreInput::Data {
                path,
                train_on,
                max_seq_len,
                template_vars,
            } => {
                let records = load_records(path)?;
                let opts = DataOptions {
                    max_seq_len: *max_seq_len,
                    overlong: Overlong::Truncate,
                    train_on: *train_on,
                    cpt: false,
                    template_vars: template_vars.clone(),
                };
                prepare(
                    &records.records,
                    &loaded.tok,
                    loaded.template.as_ref(),
                    &opts,
                )?
                .examples
            }
        };
        Ok(Scorer {
            loaded,
            device,
            examples,
            top_k: s.top_k,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there is nothing to score.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Scores sample `index` with one forward pass.
    pub fn score(&self, index: usize) -> Result<SampleScore> {
        let ex = self
            .examples
            .get(index)
            .with_context(|| format!("sample {index} does not exist ({} samples)", self.len()))?;
        let mb = micro_batch(ex, index);
        let batch = to_device(&mb, &self.device);
        if batch.n == 0 {
            return Ok(SampleScore {
                index,
                mean_loss: None,
                origin: None,
                tokens: Vec::new(),
                positions: Vec::new(),
            });
        }
        let n = batch.n;
        let s = token_stats(&self.loaded, &batch, self.top_k);
        let positions: Vec<u32> = mb
            .target_mask
            .iter()
            .enumerate()
            .filter(|&(p, &t)| t && p > 0)
            .map(|(p, _)| p as u32)
            .collect();
        let targets: Vec<u32> = positions
            .iter()
            .map(|&p| mb.input_ids[p as usize])
            .collect();
        let mut tokens = Vec::with_capacity(n);
        let mut sum = 0f64;
        for i in 0..n {
            let id = targets[i];
            tokens.push(TokenScore {
                id,
                piece: self.loaded.tok.decode(&[id], false).unwrap_or_default(),
                loss: s.ce[i],
                entropy: s.entropy[i],
                rank: s.rank[i] + 1,
                prob: (-s.ce[i]).exp(),
                top: s.top.as_ref().map(|t| t[i].clone()),
                weight: None,
            });
            sum += s.ce[i] as f64;
        }
        Ok(SampleScore {
            index,
            mean_loss: Some(sum / n as f64),
            origin: ex.origin.as_ref().map(|o| o.to_string()),
            tokens,
            positions,
        })
    }

    /// Scores every sample in order, handing each to `on_sample` as soon as it is done (so output streams and
    /// memory stays at one sample), and returns the totals.
    pub fn score_all(
        &self,
        on_sample: &mut dyn FnMut(&SampleScore) -> Result<()>,
    ) -> Result<ScoreSummary> {
        self.score_all_with(&mut |_| Ok(()), on_sample)
    }

    /// [`Scorer::score_all`] with `amend` run on each sample before it is counted and handed on (e.g.
    /// [`StrategyWeights::weigh`]).
    pub fn score_all_with(
        &self,
        amend: &mut dyn FnMut(&mut SampleScore) -> Result<()>,
        on_sample: &mut dyn FnMut(&SampleScore) -> Result<()>,
    ) -> Result<ScoreSummary> {
        let mut summary = ScoreSummary::default();
        for i in 0..self.len() {
            let mut s = self.score(i)?;
            amend(&mut s)?;
            summary.add(&s);
            on_sample(&s)?;
        }
        Ok(summary)
    }
}

fn read_id_lists(p: &std::path::Path) -> Result<Vec<Example>> {
    let text =
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    let lists: Vec<Vec<u32>> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON list of token-id lists, e.g. [[1, 2, 3], [4, 5]]",
            p.display()
        )
    })?;
    Ok(lists
        .into_iter()
        .map(|ids| {
            let targets = vec![true; ids.len()];
            Example::single(ids, targets, None)
        })
        .collect())
}

fn micro_batch(ex: &Example, index: usize) -> MicroBatch {
    let n = ex.input_ids.len();
    MicroBatch {
        batch: 1,
        seq: n,
        input_ids: ex.input_ids.clone(),
        position_ids: ex.position_ids.clone(),
        segment_ids: ex.segment_ids.clone(),
        target_mask: ex.targets.clone(),
        examples: vec![index],
        weights: Default::default(),
    }
}

/// Per-target statistics of one batch.
struct TokenStats {
    ce: Vec<f32>,
    entropy: Vec<f32>,
    /// Logits strictly above the target's (0 = the target is the argmax).
    rank: Vec<i64>,
    /// The `top_k` most likely `(id, log-probability)` per target, best first (when asked for).
    top: Option<Vec<Vec<(usize, f32)>>>,
}

/// The `k` largest entries of `row` as `(index, value - shift)`, best first.
fn top_k_of(row: &[f32], k: usize, shift: f32) -> Vec<(usize, f32)> {
    let v = row.len();
    let k = k.min(v);
    if k == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..v).collect();
    order.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
    order.truncate(k);
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    order.into_iter().map(|j| (j, row[j] - shift)).collect()
}

/// One forward pass; the head's statistics come from [`ytrainer_core::step::head_out`], the function the
/// trainer's step uses (host kernel on the CPU, log-probabilities elsewhere).
fn token_stats(l: &Loaded, batch: &DeviceBatch, top_k: usize) -> TokenStats {
    use ytrainer_core::model::CausalLm;
    use ytrainer_core::step::{HeadOut, head_out};
    let n = batch.n;
    let out = match l.model.lm_head_weight() {
        Some(head) => {
            let rows = ytrainer_core::step::target_hidden(&l.model, batch)
                .detach()
                .inner();
            let w = head.weight.detach().inner();
            // Large batches go through the head a chunk of rows at a time, so no `[n, vocab]` buffer is whole.
            let vocab = l.model.vocab_size().max(1);
            let chunk = (ytrainer_core::step::HEAD_CHUNK_FLOATS / vocab).max(1);
            if n > chunk {
                let mut out = TokenStats {
                    ce: Vec::with_capacity(n),
                    entropy: Vec::with_capacity(n),
                    rank: Vec::with_capacity(n),
                    top: (top_k > 0).then(Vec::new),
                };
                let on_host = ytrainer_core::lm_loss::host_chunks(
                    &rows,
                    &w,
                    head.layout,
                    &batch.target_ids,
                    true,
                    chunk,
                    |start, host| {
                        for (i, s) in host.stats.iter().enumerate() {
                            let row = host.row(i);
                            let x = row[batch.target_ids[start + i]];
                            out.rank.push(row.iter().filter(|&&y| y > x).count() as i64);
                            if let Some(top) = out.top.as_mut() {
                                top.push(top_k_of(row, top_k, s.lse));
                            }
                            out.ce.push(s.ce);
                            out.entropy.push(s.entropy);
                        }
                    },
                );
                if on_host {
                    return out;
                }
            }
            head_out(rows, &w, head.layout, &batch.target_ids, true, true)
        }
        None => HeadOut::Tensor(target_log_probs(&l.model, batch)),
    };
    let lp = match out {
        HeadOut::Host(host) => {
            let rank = (0..n)
                .map(|i| {
                    let row = host.row(i);
                    let x = row[batch.target_ids[i]];
                    row.iter().filter(|&&y| y > x).count() as i64
                })
                .collect();
            let top = (top_k > 0).then(|| {
                (0..n)
                    .map(|i| top_k_of(host.row(i), top_k, host.stats[i].lse))
                    .collect()
            });
            return TokenStats {
                ce: host.stats.iter().map(|s| s.ce).collect(),
                entropy: host.stats.iter().map(|s| s.entropy).collect(),
                rank,
                top,
            };
        }
        HeadOut::Tensor(lp) => lp,
        HeadOut::Chunked { .. } => unreachable!("head_out never chunks"),
    };
    let ce = tensor_to_vec(token_ce(lp.clone(), batch.targets.clone()));
    let ent = tensor_to_vec(entropy(lp.clone()));
    let v = lp.dims()[1];
    let target_lp = lp
        .clone()
        .gather(1, batch.targets.clone().reshape([n, 1]))
        .expand([n, v]);
    let rank: Vec<i64> = lp
        .clone()
        .greater(target_lp)
        .int()
        .sum_dim(1)
        .reshape([n])
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .unwrap_or_default();
    let top = (top_k > 0).then(|| {
        let all = tensor_to_vec(lp.reshape([n * v]));
        (0..n)
            .map(|i| top_k_of(&all[i * v..(i + 1) * v], top_k, 0.0))
            .collect()
    });
    TokenStats {
        ce,
        entropy: ent,
        rank,
        top,
    }
}

/// Why a strategy could not weigh a scored sample.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WeighError {
    /// The strategy reads the top-k entropy and the sample was scored without its top-k list.
    #[error("needs the top-{0} log-probabilities, which were not scored")]
    MissingTopK(usize),
    /// The strategy reads a reference model's loss and none was given.
    #[error("weighs tokens by a reference model's loss, and there is none")]
    NoReference,
    /// The plugin failed or returned the wrong number of weights.
    #[error("{0}")]
    Plugin(String),
}

/// The weights `plugin` gives a scored sample's tokens, from the statistics the training step would hand it
/// (at step 0, progress 0: a strategy with a schedule shows its start). `reference` is the reference model's
/// loss on the same tokens, for strategies that read it.
pub fn token_weights(
    plugin: &dyn TokenReweighter,
    s: &SampleScore,
    reference: Option<&[f32]>,
) -> std::result::Result<Vec<f32>, WeighError> {
    // The weights are a function of host statistics: the CPU is where the training step's plugins run too.
    let device = ytrainer_core::device::select("cpu", 0).map_err(WeighError::Plugin)?;
    let n = s.tokens.len();
    let needs = plugin.needs();
    let loss: Vec<f32> = s.tokens.iter().map(|t| t.loss).collect();
    let mut stats = ytrainer_core::loss::TokenStats::from_loss(tensor_from_slice(&loss, &device));
    if needs.entropy {
        let e: Vec<f32> = s.tokens.iter().map(|t| t.entropy).collect();
        stats.entropy = Some(tensor_from_slice(&e, &device));
    }
    if needs.top_k_entropy > 0 {
        let k = needs.top_k_entropy;
        let mut lp = Vec::with_capacity(n * k);
        for t in &s.tokens {
            let top = t
                .top
                .as_ref()
                .filter(|top| top.len() >= k)
                .ok_or(WeighError::MissingTopK(k))?;
            lp.extend(top[..k].iter().map(|&(_, l)| l));
        }
        let lp: Tensor<2> = tensor_from_slice(&lp, &device).reshape([n, k]);
        stats.top_k_entropy = Some(ytrainer_core::step::top_k_entropy(lp, k));
    }
    if needs.reference_loss {
        stats.reference_loss = Some(tensor_from_slice(
            reference.ok_or(WeighError::NoReference)?,
            &device,
        ));
    }
    stats.position = needs.position.then(|| s.positions.clone());
    stats.sample = needs.sample.then(|| vec![s.index as u32; n]);
    let w = tensor_to_vec(plugin.try_weights(&stats).map_err(WeighError::Plugin)?);
    if w.len() != n {
        return Err(WeighError::Plugin(format!(
            "returned {} weights for {n} tokens",
            w.len()
        )));
    }
    Ok(w)
}

/// A token strategy applied to scored samples (`ytrainer score --loss`): each token's weight as the training
/// step computes it from that token's loss (and entropy, reference loss... as the strategy asks), one sample at
/// a time. This is how one measures what a strategy does to chosen tokens, e.g. the mean weight it puts on
/// corrupted answers against clean ones.
pub struct StrategyWeights {
    name: String,
    plugin: Box<dyn TokenReweighter>,
    /// The reference model's scorer (the base of a LoRA adapter), when the strategy reads reference losses.
    reference: Option<Scorer>,
}

impl StrategyWeights {
    /// Builds strategy `name` with `params` from the registry; `settings` are the scorer's, whose model without
    /// its adapter is the reference when the strategy needs one. Returns the top-k the scorer must list (the
    /// strategy's top-k entropy), so the caller can load its scorer with it.
    pub fn load(
        registry: &Registry,
        name: &str,
        params: &BTreeMap<String, f64>,
        settings: &ScoreSettings,
    ) -> Result<(Self, usize)> {
        let (f, _) = registry
            .build(name, params)
            .with_context(|| format!("--loss {name}"))?;
        let LossFn::Token(plugin) = f else {
            bail!(
                "--loss {name}: a pairwise (preference) objective scores pairs of answers, not tokens; pick a \
                 token strategy such as ce or nlirg (`ytrainer plugins list`)"
            );
        };
        let needs = plugin.needs();
        let reference = if needs.reference_loss {
            if settings.adapter.is_none() {
                bail!(
                    "--loss {name} weighs tokens by a reference model's loss: give the trained model as \
                     --model plus --adapter, and its base is the reference"
                );
            }
            Some(Scorer::load(&ScoreSettings {
                adapter: None,
                top_k: 0,
                ..settings.clone()
            })?)
        } else {
            None
        };
        Ok((
            StrategyWeights {
                name: name.to_string(),
                plugin,
                reference,
            },
            needs.top_k_entropy,
        ))
    }

    /// Fills in the weight of every token of `s` (scored by a scorer over the same input as the reference's).
    pub fn weigh(&self, s: &mut SampleScore) -> Result<()> {
        if s.tokens.is_empty() {
            return Ok(());
        }
        let reference = match &self.reference {
            Some(r) => Some(
                r.score(s.index)?
                    .tokens
                    .iter()
                    .map(|t| t.loss)
                    .collect::<Vec<f32>>(),
            ),
            None => None,
        };
        let w = token_weights(self.plugin.as_ref(), s, reference.as_deref()).map_err(|e| {
            crate::RecipeError::Invalid(format!("--loss {} on sample {}: {e}", self.name, s.index))
        })?;
        for (t, w) in s.tokens.iter_mut().zip(w) {
            t.weight = Some(w);
        }
        Ok(())
    }
}
