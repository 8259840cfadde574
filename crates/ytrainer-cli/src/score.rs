//! `ytrainer score`: per-token loss, entropy, rank and probability of every supervised token, through the
//! trainer's own code path (`ytrainer_core::step::{to_device, target_log_probs, token_ce, entropy}`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::tensor_to_vec;
use ytrainer_core::step::{entropy, target_log_probs, to_device, token_ce};
use ytrainer_data::{DataOptions, Example, MicroBatch, Overlong, TrainOn, load_records, prepare};

use crate::interop::parse_vars;
use ytrainer_recipes::source::{Loaded, inference_device, load_for_inference};

/// `ytrainer score`
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Hugging Face model directory or `.gguf` file.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory applied on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Data file (json, jsonl, csv, txt), prepared exactly as `run` prepares it.
    #[arg(
        long,
        conflicts_with = "ids_json",
        required_unless_present = "ids_json"
    )]
    pub data: Option<PathBuf>,
    /// JSON list of token-id lists; every position after the first of each list is a target.
    #[arg(long)]
    pub ids_json: Option<PathBuf>,
    /// Output file, one JSON object per sample (`-` for stdout).
    #[arg(long, default_value = "-")]
    pub out: PathBuf,
    /// What is supervised in chat data: all_assistant, last_assistant, everything.
    #[arg(long, default_value = "all_assistant")]
    pub train_on: String,
    /// Longest sample in tokens (longer ones are truncated).
    #[arg(long, default_value_t = 4096)]
    pub max_seq_len: usize,
    /// Also list the K most likely tokens at each position (`top`: [[id, logprob], ...]).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Template variable, repeatable: `--var enable_thinking=false`.
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
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
fn token_stats(l: &Loaded, batch: &ytrainer_core::step::DeviceBatch, top_k: usize) -> TokenStats {
    use ytrainer_core::model::CausalLm;
    use ytrainer_core::step::{HeadOut, head_out};
    let n = batch.n;
    let out = match l.model.lm_head_weight() {
        Some(head) => {
            let rows = ytrainer_core::step::target_hidden(&l.model, batch)
                .detach()
                .inner();
            let w = head.weight.detach().inner();
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

/// Scores one example; `None` when it has no targets.
fn score_example(
    l: &Loaded,
    ex: &Example,
    index: usize,
    top_k: usize,
    device: &Device,
) -> Result<serde_json::Value> {
    let mb = micro_batch(ex, index);
    let batch = to_device(&mb, device);
    if batch.n == 0 {
        return Ok(
            json!({"index": index, "mean_loss": null, "perplexity": null, "n_tokens": 0, "tokens": []}),
        );
    }
    let n = batch.n;
    let s = token_stats(l, &batch, top_k);
    let (ce, ent, rank) = (&s.ce, &s.entropy, &s.rank);
    let targets: Vec<u32> = mb
        .target_mask
        .iter()
        .enumerate()
        .filter(|&(p, &t)| t && p > 0)
        .map(|(p, _)| mb.input_ids[p])
        .collect();
    let mut tokens = Vec::with_capacity(n);
    let mut sum = 0f64;
    for i in 0..n {
        let id = targets[i];
        let mut t = json!({
            "id": id,
            "piece": l.tok.decode(&[id], false).unwrap_or_default(),
            "loss": ce[i],
            "entropy": ent[i],
            "rank": rank[i] + 1,
            "prob": (-ce[i]).exp(),
        });
        if let Some(top) = &s.top {
            t["top"] = json!(
                top[i]
                    .iter()
                    .map(|&(j, lp)| json!([j, lp]))
                    .collect::<Vec<_>>()
            );
        }
        sum += ce[i] as f64;
        tokens.push(t);
    }
    let mean = sum / n as f64;
    let mut out = json!({
        "index": index,
        "mean_loss": mean,
        "perplexity": mean.exp(),
        "n_tokens": n,
        "tokens": tokens,
    });
    if let Some(o) = &ex.origin {
        out["origin"] = json!(o.to_string());
    }
    Ok(out)
}

/// `ytrainer score`
pub fn score(a: ScoreArgs) -> Result<()> {
    let device = inference_device(&a.device)?;
    let examples: Vec<Example> = if let Some(p) = &a.ids_json {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        let lists: Vec<Vec<u32>> = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected a JSON list of token-id lists, e.g. [[1, 2, 3], [4, 5]]",
                p.display()
            )
        })?;
        lists
            .into_iter()
            .map(|ids| {
                let targets = vec![true; ids.len()];
                Example::single(ids, targets, None)
            })
            .collect()
    } else {
        Vec::new()
    };
    let l = load_for_inference(&a.model, a.adapter.as_deref(), &device)?;
    let vocab = l.model.spec.vocab_size;
    let examples = if a.ids_json.is_some() {
        for (i, ex) in examples.iter().enumerate() {
            if let Some(bad) = ex.input_ids.iter().find(|&&id| id as usize >= vocab) {
                bail!(
                    "--ids-json list {i}: token id {bad} is outside the model's vocabulary (size {vocab})"
                );
            }
        }
        examples
    } else {
        let data = a.data.as_ref().expect("clap requires --data or --ids-json");
        let loaded = load_records(data)?;
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
            template_vars: parse_vars(&a.vars)?,
        };
        prepare(&loaded.records, &l.tok, l.template.as_ref(), &opts)?.examples
    };
    let mut out: Box<dyn Write> = if a.out.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&a.out)
                .with_context(|| format!("cannot create {}", a.out.display()))?,
        ))
    };
    let (mut total, mut count) = (0f64, 0usize);
    for (i, ex) in examples.iter().enumerate() {
        let line = score_example(&l, ex, i, a.top_k, &device)?;
        if let (Some(m), Some(n)) = (line["mean_loss"].as_f64(), line["n_tokens"].as_u64()) {
            total += m * n as f64;
            count += n as usize;
        }
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    if count > 0 {
        eprintln!(
            "scored {} samples, {count} tokens: mean loss {:.5}, perplexity {:.3}",
            examples.len(),
            total / count as f64,
            (total / count as f64).exp()
        );
    }
    Ok(())
}
