//! Whether a token-weighted run packs its examples (`[data] packing`), and what packing saves: the padded
//! tokens (`rows x longest row` summed over an epoch's micro-batches, what every linear layer computes on) of
//! the plan with and without packing. Unset packs when that saves at least [`AUTO_SAVING`].

use ytrainer_core::config::{RunConfig, TrainMode};
use ytrainer_data::{BatchOptions, Example, pack_examples, plan_epoch};

use crate::bail;
use crate::error::Result;

/// The share of padded tokens packing must save to be switched on when `[data] packing` is unset.
pub const AUTO_SAVING: f64 = 0.10;

/// What packing did (or would have done) to an epoch.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PackingReport {
    /// Whether the run trains on packed rows.
    pub packed: bool,
    /// `true`, `false` or `auto` (unset).
    pub setting: String,
    /// Examples.
    pub examples: usize,
    /// Rows they pack into.
    pub rows: usize,
    /// Padded tokens of the first epoch's plan without packing.
    pub padded_tokens_unpacked: usize,
    /// The same with packing.
    pub padded_tokens_packed: usize,
}

impl PackingReport {
    /// The share of padded tokens packing saves (negative when it costs).
    pub fn saving(&self) -> f64 {
        1.0 - self.padded_tokens_packed as f64 / self.padded_tokens_unpacked.max(1) as f64
    }

    /// The plan's line.
    pub fn line(&self) -> String {
        format!(
            "  packing {} ({}): {} examples in {} rows; padded tokens per epoch {} unpacked, {} packed ({:.1}% {})",
            if self.packed { "on" } else { "off" },
            self.setting,
            self.examples,
            self.rows,
            self.padded_tokens_unpacked,
            self.padded_tokens_packed,
            self.saving().abs() * 100.0,
            if self.saving() >= 0.0 {
                "saved"
            } else {
                "more"
            }
        )
    }
}

fn padded_tokens(examples: &[Example], opts: &BatchOptions) -> Result<usize> {
    Ok(plan_epoch(examples, opts, 0)?
        .iter()
        .flat_map(|s| &s.micro_batches)
        .map(|mb| mb.batch * mb.seq)
        .sum())
}

/// Packs `examples` in place when `[data] packing` says so (or, unset, when it saves at least
/// [`AUTO_SAVING`] of the padded tokens); `None` when packing does not apply (continued pretraining, whose
/// rows are packed documents already, and windowed mode, which trains example by example).
pub fn apply(
    cfg: &RunConfig,
    examples: &mut Vec<Example>,
    opts: &BatchOptions,
) -> Result<Option<PackingReport>> {
    let setting = cfg.data.packing;
    let applies = cfg.data.training_type == ytrainer_core::config::TrainingType::Sft
        && cfg.train.mode == TrainMode::OnePass;
    if !applies {
        if setting == Some(true) {
            bail!(
                "[data] packing = true applies to SFT in one-pass mode: continued pretraining always packs its \
                 documents and windowed mode trains example by example; remove packing"
            );
        }
        return Ok(None);
    }
    if setting == Some(false) {
        return Ok(None);
    }
    let (rows, _) = pack_examples(examples, cfg.data.max_seq_len);
    let mut report = PackingReport {
        packed: false,
        setting: match setting {
            Some(true) => "true".into(),
            _ => "auto".into(),
        },
        examples: examples.len(),
        rows: rows.len(),
        padded_tokens_unpacked: padded_tokens(examples, opts)?,
        padded_tokens_packed: padded_tokens(&rows, opts)?,
    };
    report.packed = setting == Some(true) || report.saving() >= AUTO_SAVING;
    if report.packed {
        *examples = rows;
    }
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(lens: &[usize]) -> Vec<Example> {
        lens.iter()
            .map(|&n| Example::single(vec![7; n], vec![true; n], None))
            .collect()
    }

    /// Lengths 10, 2, 10, 2 in micro-batches of 2 rows, file order: unpacked 2 x 10 + 2 x 10 = 40 padded
    /// tokens, packed into rows of 12 (10 + 2 twice) one micro-batch of 2 x 12 = 24: 40% saved, so auto packs.
    /// Equal lengths that cannot share a row save nothing: auto leaves them; `false` never packs.
    #[test]
    fn auto_packs_when_it_saves_padded_tokens() {
        let mut cfg = RunConfig::default();
        cfg.data.max_seq_len = 12;
        let opts = BatchOptions {
            shuffle: false,
            micro_batch_tokens: 1 << 20,
            max_micro_batch_size: 2,
            ..BatchOptions::default()
        };
        let mut ex = examples(&[10, 2, 10, 2]);
        let r = apply(&cfg, &mut ex, &opts).unwrap().unwrap();
        assert_eq!(
            (
                r.packed,
                r.examples,
                r.rows,
                r.padded_tokens_unpacked,
                r.padded_tokens_packed
            ),
            (true, 4, 2, 40, 24)
        );
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].segment_ids, [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2]);
        assert_eq!(
            r.line(),
            "  packing on (auto): 4 examples in 2 rows; padded tokens per epoch 40 unpacked, 24 packed (40.0% saved)"
        );
        let mut same = examples(&[10, 10, 10]);
        let r = apply(&cfg, &mut same, &opts).unwrap().unwrap();
        assert_eq!((r.packed, r.rows, r.saving()), (false, 3, 0.0));
        assert_eq!(same.len(), 3);
        cfg.data.packing = Some(false);
        let mut ex = examples(&[10, 2, 10, 2]);
        assert!(apply(&cfg, &mut ex, &opts).unwrap().is_none());
        assert_eq!(ex.len(), 4);
        cfg.data.packing = Some(true);
        cfg.data.training_type = ytrainer_core::config::TrainingType::Cpt;
        assert!(
            apply(&cfg, &mut ex, &opts)
                .unwrap_err()
                .to_string()
                .starts_with("[data] packing = true applies to SFT in one-pass mode")
        );
    }
}
