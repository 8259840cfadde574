//! The memory plan of a training run: how large a micro-batch may be and whether activations are recomputed,
//! chosen from a memory budget before the first step instead of discovered by the kernel's OOM killer.
//!
//! The estimate is a model of what the CPU path keeps alive at its peak (the backward pass of a micro-batch):
//! the weights as they are held (f32, or quantised blocks), the trainable parameters with their gradients and
//! Adam moments, the activations the backward pass needs (every decoder layer's, or with recomputation only
//! each layer's input plus one layer's), and the LM head's logits. Its per-token constants were fitted to
//! peak RSS measured with `/usr/bin/time -v` (docs/performance.md, "Memory plan"); it errs on the high side.

use ytrainer_core::config::RunConfig;
use ytrainer_data::Example;
use ytrainer_models::Decoder;

use crate::bail;
use crate::error::Result;

/// Bytes the process holds before any model or data: the binary, the allocator's arenas, the thread pool,
/// the tokenizer.
const BASE_BYTES: f64 = 160e6;
/// Fraction of the textbook activation count that is live at the backward's peak (Burn frees some saved
/// tensors as soon as their node's backward ran, and the fused kernels save less than the op-by-op graph).
/// Measured: ~0.6 on SmolLM2-135M, ~0.86 on a Qwen2.5-1.5B shape (its MLP is 5.8x the hidden size).
const ACTIVATION_FRACTION: f64 = 0.9;
/// Of the memory available when the run starts, the share an unset budget takes: the rest is left to the
/// page cache, the data, and whatever else runs on the machine.
const AUTO_FRACTION: f64 = 0.5;
/// Logits (floats) the head holds at once: larger micro-batches are run through the head in chunks of rows
/// (`ytrainer_core::step`), so no `[tokens, vocab]` buffer grows with the micro-batch.
pub const HEAD_CHUNK_FLOATS: usize = 16 << 20;

/// `5GB`, `500MB`, `2GiB`, `1000000` -> bytes (decimal units as transformers writes them, binary with `i`).
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_uppercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "K" => 1e3,
        "MB" | "M" => 1e6,
        "GB" | "G" => 1e9,
        "TB" | "T" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        "TIB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = n * mult;
    (v.is_finite() && v >= 1.0).then_some(v as u64)
}

/// `1234567890` -> `1.23 GB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else {
        format!("{:.0} MB", b / 1e6)
    }
}

/// `MemAvailable` of `/proc/meminfo` (Linux); `None` elsewhere, where an unset budget then limits nothing.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The shapes the estimate needs, read off the loaded model.
#[derive(Debug, Clone)]
pub struct ModelFootprint {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub q_dim: usize,
    pub kv_dim: usize,
    pub vocab: usize,
    /// Embeddings, norms and an untied head as held (f32), plus the projections as held (f32 or blocks).
    pub weight_bytes: u64,
    /// Trainable parameters (each costs its value, its gradient and two Adam moments, f32).
    pub trainable: u64,
    /// Whether the projections are held quantised (QLoRA).
    pub quantized: bool,
}

impl ModelFootprint {
    pub fn of(model: &Decoder) -> Self {
        let c = &model.config;
        let head_dim = c
            .head_dim
            .unwrap_or(c.hidden_size / c.num_attention_heads.max(1));
        let kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        let mut weight_bytes = 0u64;
        let mut quantized = false;
        for (_, lin) in model.named_linears() {
            quantized |= lin.quant.is_some();
            weight_bytes += match &lin.quant {
                Some(q) => q.encoded_len() as u64,
                None => (lin.d_in() * lin.d_out() * 4) as u64,
            };
        }
        let tables = if model.lm_head.is_some() { 2 } else { 1 };
        weight_bytes += (tables * c.vocab_size * c.hidden_size * 4) as u64;
        let trainable = ytrainer_core::checkpoint::trainable_params(model)
            .values()
            .map(|(_, v)| v.len() as u64)
            .sum();
        Self {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            q_dim: c.num_attention_heads * head_dim,
            kv_dim: kv_heads * head_dim,
            vocab: c.vocab_size,
            weight_bytes,
            trainable,
            quantized,
        }
    }

    /// Floats one token keeps alive in one decoder layer for the backward pass: the residual stream and its
    /// norms (6 hidden-sized), q/k/v before and after RoPE, the attention output, and the MLP's gate, up and
    /// SwiGLU (3 intermediate-sized).
    fn layer_floats(&self) -> f64 {
        (6 * self.hidden + 2 * (self.q_dim + self.kv_dim) + self.kv_dim + 3 * self.intermediate)
            as f64
    }

    /// Estimated peak bytes of one micro-batch of `tokens` padded tokens of which `targets` are supervised.
    pub fn peak(&self, tokens: usize, targets: usize, recompute: bool) -> u64 {
        let t = tokens as f64;
        let fixed = BASE_BYTES + self.weight_bytes as f64 + self.trainable as f64 * 16.0;
        let activations = if recompute {
            // Each layer's input, plus one layer's full set while it is recomputed.
            t * 4.0 * (self.layers as f64 * self.hidden as f64 + self.layer_floats())
        } else {
            t * 4.0 * self.layers as f64 * self.layer_floats() * ACTIVATION_FRACTION
        };
        // The logits (f32) of the supervised rows, at most a chunk of them, and the head's input rows.
        let head_rows = targets.min((HEAD_CHUNK_FLOATS / self.vocab.max(1)).max(1));
        let head = 4.0 * (head_rows * self.vocab) as f64 + 4.0 * t * self.hidden as f64;
        (fixed + activations + head) as u64
    }
}

/// What the plan decided.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// Padded tokens per micro-batch to use (never above the configured `micro_batch_tokens`).
    pub micro_batch_tokens: usize,
    /// Whether activations are recomputed.
    pub gradient_checkpointing: bool,
    /// The estimate for that choice.
    pub estimated_peak: u64,
    /// The budget, and where it came from (`--memory-budget` or a share of available memory).
    pub budget: Option<(u64, String)>,
    /// What the plan changed against the config, in words (empty when nothing).
    pub changes: Vec<String>,
}

impl MemoryPlan {
    /// One line for the run's log.
    pub fn describe(&self) -> String {
        self.describe_as(&format!(
            "micro-batches of up to {} padded tokens",
            self.micro_batch_tokens
        ))
    }

    /// [`MemoryPlan::describe`] with the micro-batch said in the run's own unit (`micro_batch` names it).
    pub fn describe_as(&self, micro_batch: &str) -> String {
        let budget = match &self.budget {
            Some((b, why)) => format!(" of a {} budget ({why})", human(*b)),
            None => String::new(),
        };
        let mut s = format!(
            "memory plan: {micro_batch}, gradient checkpointing {}, estimated peak {}{budget}",
            if self.gradient_checkpointing {
                "on"
            } else {
                "off"
            },
            human(self.estimated_peak),
        );
        if !self.changes.is_empty() {
            s.push_str(&format!(" ({})", self.changes.join("; ")));
        }
        s
    }
}

/// The budget of a config: `[train] memory_budget` (a size, or `"auto"`), else `auto`: half of the memory
/// available now.
pub fn budget(cfg: &RunConfig) -> Result<Option<(u64, String)>> {
    match cfg.train.memory_budget.as_deref().map(str::trim) {
        None | Some("auto") => Ok(available_memory().map(|a| {
            (
                (a as f64 * AUTO_FRACTION) as u64,
                format!("half of the {} available", human(a)),
            )
        })),
        Some(s) => match parse_size(s) {
            Some(b) => Ok(Some((b, "--memory-budget".into()))),
            None => bail!(
                "[train] memory_budget = {s:?}: expected a size such as \"700MB\", \"8GB\" or \"2GiB\", or \"auto\""
            ),
        },
    }
}

/// Chooses the micro-batch and recomputation for `examples` on `model` within `budget`.
///
/// The configured `micro_batch_tokens` is an upper bound that is only ever lowered; recomputation that the
/// config turned on stays on. Without recomputation the plan keeps the largest micro-batch that fits if it
/// still holds at least two of the longest sequences (or all the configured size asks); otherwise it switches
/// recomputation on, which costs about one more forward pass but frees almost all activations.
pub fn plan(
    cfg: &RunConfig,
    fp: &ModelFootprint,
    examples: &[Example],
    budget: Option<(u64, String)>,
) -> Result<MemoryPlan> {
    let rows = examples
        .iter()
        .map(|e| (e.input_ids.len(), e.targets.iter().filter(|&&t| t).count()));
    plan_rows(cfg, fp, rows, budget, "sequence")
}

/// [`plan`] over `(tokens, supervised tokens)` per row: a row is what the batcher never splits (an example, or
/// for preference training a pair's two completions padded alike).
pub fn plan_rows(
    cfg: &RunConfig,
    fp: &ModelFootprint,
    rows: impl Iterator<Item = (usize, usize)>,
    budget: Option<(u64, String)>,
    row: &str,
) -> Result<MemoryPlan> {
    let (mut longest, mut tokens, mut targets) = (1usize, 0usize, 0usize);
    for (n, t) in rows {
        longest = longest.max(n);
        tokens += n;
        targets += t;
    }
    let target_share = if tokens == 0 {
        1.0
    } else {
        targets as f64 / tokens as f64
    };
    // The batcher never puts more than `max_micro_batch_size` rows of at most `longest` tokens together.
    let wanted = cfg
        .train
        .micro_batch_tokens
        .min(cfg.train.max_micro_batch_size.max(1) * longest)
        .max(longest);
    let peak =
        |mb: usize, gc: bool| fp.peak(mb, ((mb as f64 * target_share).ceil() as usize).max(1), gc);
    let configured_gc = cfg.train.gradient_checkpointing;
    // An unset budget on a quantised base (QLoRA) plans lean: whoever quantises the base trades speed for memory,
    // as QLoRA recipes do (axolotl's and unsloth's turn recomputation on), so the budget is what two of the
    // longest rows need with recomputation; `--memory-budget auto` plans for speed within half of what is
    // available, as for an f32 base.
    let lean = peak(wanted.min(2 * longest), true);
    let budget = match budget {
        Some((auto, _)) if fp.quantized && cfg.train.memory_budget.is_none() && lean < auto => {
            Some((
                lean,
                format!(
                    "the lean default of a quantised base: room for two of the longest rows ({row}, {longest} \
                 tokens) with recomputation; --memory-budget auto plans for speed"
                ),
            ))
        }
        other => other,
    };
    let Some((limit, why)) = budget.clone() else {
        return Ok(MemoryPlan {
            micro_batch_tokens: cfg.train.micro_batch_tokens,
            gradient_checkpointing: configured_gc,
            estimated_peak: peak(wanted, configured_gc),
            budget,
            changes: Vec::new(),
        });
    };
    // The largest micro-batch (a multiple of nothing: the batcher packs rows up to this many padded tokens)
    // whose estimate fits, by bisection on the monotone estimate.
    let fit = |gc: bool| -> Option<usize> {
        if peak(longest, gc) > limit {
            return None;
        }
        let (mut lo, mut hi) = (longest, wanted);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if peak(mid, gc) <= limit {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Some(lo)
    };
    let mut changes = Vec::new();
    let without = (!configured_gc).then(|| fit(false)).flatten();
    let (mb, gc) = match without {
        Some(mb) if mb >= wanted.min(2 * longest) => (mb, false),
        _ => match fit(true) {
            Some(mb) => {
                if !configured_gc {
                    changes.push(
                        "gradient checkpointing switched on: the activations of a micro-batch would not fit the budget"
                            .to_string(),
                    );
                }
                (mb, true)
            }
            None => bail!(
                "the memory budget {} ({why}) is too small: one {row} of {longest} tokens needs about {} even \
                 with gradient checkpointing ({} of it the model's weights); raise --memory-budget or lower \
                 --max-seq-len{}",
                human(limit),
                human(peak(longest, true)),
                human(fp.weight_bytes),
                if fp.quantized {
                    ""
                } else {
                    ", or train LoRA on a quantised base (--quantize-base q4_0, or a GGUF file)"
                },
            ),
        },
    };
    if mb < wanted {
        changes.push(format!(
            "micro-batch lowered from {wanted} to {mb} padded tokens to fit the budget"
        ));
    }
    Ok(MemoryPlan {
        // Unchanged: the configured value (the batcher never reaches `wanted` anyway).
        micro_batch_tokens: if mb < wanted {
            mb
        } else {
            cfg.train.micro_batch_tokens
        },
        gradient_checkpointing: gc,
        estimated_peak: peak(mb, gc),
        budget,
        changes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm() -> ModelFootprint {
        ModelFootprint {
            hidden: 576,
            intermediate: 1536,
            layers: 30,
            q_dim: 576,
            kv_dim: 192,
            vocab: 49152,
            weight_bytes: 66_400_000 + 49152 * 576 * 4,
            trainable: 4_884_480,
            quantized: true,
        }
    }

    fn examples(n: usize, len: usize, targets: usize) -> Vec<Example> {
        (0..n)
            .map(|_| {
                let t: Vec<bool> = (0..len).map(|i| i >= len - targets).collect();
                Example::single(vec![1; len], t, None)
            })
            .collect()
    }

    #[test]
    fn sizes_parse_in_decimal_and_binary_units() {
        assert_eq!(parse_size("700MB"), Some(700_000_000));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size(" 1.5 gb "), Some(1_500_000_000));
        assert_eq!(parse_size("8G"), Some(8_000_000_000));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("0"), None);
    }

    /// A generous budget keeps the config; a tight one first lowers the micro-batch, then switches
    /// recomputation on, then refuses with what one sequence would need.
    #[test]
    fn tighter_budgets_shrink_then_recompute_then_refuse() {
        let fp = smollm();
        let ex = examples(64, 512, 100);
        let mut cfg = RunConfig::default();
        cfg.train.micro_batch_tokens = 4096;
        // A budget given (the lean default of a quantised base applies only to an unset one).
        cfg.train.memory_budget = Some("given".into());
        let roomy = plan(&cfg, &fp, &ex, Some((64_000_000_000, "test".into()))).unwrap();
        assert_eq!(roomy.micro_batch_tokens, 4096);
        assert_eq!(roomy.estimated_peak, fp.peak(4096, 800, false));
        assert!(!roomy.gradient_checkpointing && roomy.changes.is_empty());

        let mid_budget = fp.peak(2048, 400, false) + 1;
        let mid = plan(&cfg, &fp, &ex, Some((mid_budget, "test".into()))).unwrap();
        assert!(!mid.gradient_checkpointing);
        assert!(mid.micro_batch_tokens >= 2048 && mid.micro_batch_tokens < 4096);
        assert!(mid.estimated_peak <= mid_budget);

        let tight = plan(&cfg, &fp, &ex, Some((700_000_000, "test".into()))).unwrap();
        assert!(tight.gradient_checkpointing, "{tight:?}");
        assert!(tight.estimated_peak <= 700_000_000);
        assert!(tight.micro_batch_tokens >= 512);
        assert!(
            tight
                .describe()
                .contains("gradient checkpointing switched on")
        );

        let e = plan(&cfg, &fp, &ex, Some((200_000_000, "test".into())))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("the memory budget 200 MB (test) is too small: one sequence of 512 tokens needs about"),
            "{e}"
        );
    }

    /// An unset budget on a quantised base plans lean: recomputation on, two of the longest sequences per
    /// micro-batch, the budget being their estimate; `auto` (or an f32 base) plans for speed in the same room.
    #[test]
    fn a_quantised_base_plans_lean_by_default() {
        let fp = smollm();
        let ex = examples(64, 512, 100);
        let mut cfg = RunConfig::default();
        cfg.train.micro_batch_tokens = 4096;
        let room = Some((11_000_000_000, "half of the memory available".to_string()));
        let lean = plan(&cfg, &fp, &ex, room.clone()).unwrap();
        assert!(lean.gradient_checkpointing, "{lean:?}");
        assert_eq!(lean.micro_batch_tokens, 1024);
        assert_eq!(lean.estimated_peak, fp.peak(1024, 200, true));
        assert!(
            lean.describe().contains(
                "budget (the lean default of a quantised base: room for two of the longest rows (sequence, 512 \
                 tokens) with recomputation; --memory-budget auto plans for speed)"
            ),
            "{}",
            lean.describe()
        );
        cfg.train.memory_budget = Some("auto".into());
        let fast = plan(&cfg, &fp, &ex, room.clone()).unwrap();
        assert!(
            !fast.gradient_checkpointing && fast.micro_batch_tokens == 4096,
            "{fast:?}"
        );
        cfg.train.memory_budget = None;
        let f32_base = ModelFootprint {
            quantized: false,
            ..smollm()
        };
        let fast = plan(&cfg, &f32_base, &ex, room).unwrap();
        assert!(
            !fast.gradient_checkpointing && fast.micro_batch_tokens == 4096,
            "{fast:?}"
        );
    }

    /// Without a budget (no /proc/meminfo) the configured sizes stand.
    #[test]
    fn no_budget_changes_nothing() {
        let cfg = RunConfig::default();
        let p = plan(&cfg, &smollm(), &examples(4, 100, 10), None).unwrap();
        assert_eq!(p.micro_batch_tokens, cfg.train.micro_batch_tokens);
        assert_eq!(p.estimated_peak, smollm().peak(1600, 160, false)); // 16 rows x 100 tokens
        assert_eq!(p.gradient_checkpointing, cfg.train.gradient_checkpointing);
    }
}
