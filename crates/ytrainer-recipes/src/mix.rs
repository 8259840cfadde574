//! Dataset mixing: `[data] train` and every `[[data.sources]]` file read with its column map, capped to its
//! first `max_samples` records, split for evaluation (`eval_fraction`, per file, before any record is
//! repeated so no eval record is also trained on), then weighted: a weight `w` uses each record `floor(w)`
//! times plus a seeded random `w - floor(w)` share of the records once more (0.5 = a half, 2 = twice,
//! 1.5 = all and a half). The order is file by file; the batch planner shuffles. Preference runs mix files of
//! pairs (or KTO's labelled completions) the same way ([`mix_files`]), without column maps.

use std::path::{Path, PathBuf};

use ytrainer_core::config::{DataSource, RunConfig};
use ytrainer_core::rng::SplitMix64;
use ytrainer_data::{Record, load_records_with};

use crate::error::Result;

/// What the mix took from one file.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceUse {
    /// The file.
    pub path: PathBuf,
    /// Its detected record layout (`alpaca`, `messages`, ..., or `pairs` / `kto` for preference files).
    pub format: String,
    /// Records read (after dropped ones).
    pub records: usize,
    /// Records kept by `max_samples`.
    pub capped: usize,
    /// Held out for evaluation.
    pub eval: usize,
    /// Its weight.
    pub weight: f64,
    /// Training records it contributes after the weight.
    pub train: usize,
}

impl SourceUse {
    /// `data: FILE (alpaca): 120 records, first 100 (max_samples), 10 held out, weight 0.5 -> 45 training records`.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "data: {} ({}): {} records",
            self.path.display(),
            self.format,
            self.records
        );
        if self.capped < self.records {
            s.push_str(&format!(", first {} (max_samples)", self.capped));
        }
        if self.eval > 0 {
            s.push_str(&format!(", {} held out for eval", self.eval));
        }
        if self.weight != 1.0 {
            s.push_str(&format!(", weight {}", self.weight));
        }
        s.push_str(&format!(" -> {} training records", self.train));
        s
    }
}

/// The training mix of a config: records (SFT, continued pretraining) or pairs (preference training).
#[derive(Debug, Clone)]
pub struct Mixed<T = Record> {
    /// Training records, file by file.
    pub train: Vec<T>,
    /// Records held out by `eval_fraction`.
    pub eval: Vec<T>,
    /// Dropped-record warnings of every file.
    pub warnings: Vec<String>,
    /// Per-file figures.
    pub sources: Vec<SourceUse>,
}

/// Every training file of `cfg` with its settings: `train` first, then the sources.
pub fn sources_of(cfg: &RunConfig, train_file: &Path) -> Vec<DataSource> {
    let d = &cfg.data;
    let mut v = vec![DataSource {
        path: train_file.to_path_buf(),
        weight: d.train_weight,
        max_samples: d.max_samples,
        columns: d.columns.clone(),
    }];
    v.extend(d.sources.iter().cloned());
    v
}

/// Records `floor(w)` times each, plus a seeded `frac(w)` share once more (in file order).
pub fn weighted<T: Clone>(records: Vec<T>, weight: f64, seed: u64) -> Vec<T> {
    let whole = weight.floor() as usize;
    let extra = ((weight - weight.floor()) * records.len() as f64).round() as usize;
    let mut out = Vec::with_capacity(whole * records.len() + extra);
    for _ in 0..whole {
        out.extend(records.iter().cloned());
    }
    if extra > 0 {
        // A seeded partial Fisher-Yates draw of `extra` distinct records, kept in file order.
        let mut idx: Vec<usize> = (0..records.len()).collect();
        let mut rng = SplitMix64::new(seed);
        for i in 0..extra {
            let j = i + (rng.next_u64() % (idx.len() - i) as u64) as usize;
            idx.swap(i, j);
        }
        let mut chosen = idx[..extra].to_vec();
        chosen.sort_unstable();
        out.extend(chosen.into_iter().map(|i| records[i].clone()));
    }
    out
}

/// Reads, caps, splits and weights every training file of `cfg` (see the module docs).
pub fn training_mix(cfg: &RunConfig, train_file: &Path) -> Result<Mixed> {
    mix_files(cfg, train_file, |s| {
        let loaded = load_records_with(&s.path, &s.columns)?;
        Ok((
            loaded.records,
            loaded.warnings.iter().map(|w| w.to_string()).collect(),
            loaded.format.to_string(),
        ))
    })
}

/// [`training_mix`] over any record type: `load` reads one file as (records, dropped-record warnings, layout).
pub fn mix_files<T: Clone>(
    cfg: &RunConfig,
    train_file: &Path,
    load: impl Fn(&DataSource) -> Result<(Vec<T>, Vec<String>, String)>,
) -> Result<Mixed<T>> {
    let mut mixed = Mixed {
        train: Vec::new(),
        eval: Vec::new(),
        warnings: Vec::new(),
        sources: Vec::new(),
    };
    for (i, s) in sources_of(cfg, train_file).iter().enumerate() {
        let (loaded, warnings, format) = load(s)?;
        mixed.warnings.extend(warnings);
        let records = loaded.len();
        let mut kept = loaded;
        if s.max_samples > 0 {
            kept.truncate(s.max_samples);
        }
        let capped = kept.len();
        let (train, eval) = crate::common::split_eval(kept, cfg.data.eval_fraction);
        let seed = cfg.train.seed ^ (i as u64 + 1).wrapping_mul(ytrainer_core::rng::GOLDEN);
        let train = weighted(train, s.weight, seed);
        mixed.sources.push(SourceUse {
            path: s.path.clone(),
            format,
            records,
            capped,
            eval: eval.len(),
            weight: s.weight,
            train: train.len(),
        });
        mixed.train.extend(train);
        mixed.eval.extend(eval);
    }
    Ok(mixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_repeat_and_subsample_deterministically() {
        let r: Vec<u32> = (0..10).collect();
        assert_eq!(weighted(r.clone(), 1.0, 7), r);
        assert_eq!(weighted(r.clone(), 2.0, 7).len(), 20);
        let half = weighted(r.clone(), 0.5, 7);
        assert_eq!(half.len(), 5);
        assert!(
            half.windows(2).all(|w| w[0] < w[1]),
            "distinct, in file order: {half:?}"
        );
        assert_eq!(half, weighted(r.clone(), 0.5, 7), "same seed, same draw");
        assert_ne!(
            half,
            weighted(r.clone(), 0.5, 8),
            "another seed, another draw"
        );
        let more = weighted(r.clone(), 1.5, 7);
        assert_eq!(more.len(), 15);
        assert_eq!(more[..10], r[..]);
        assert_eq!(
            weighted(r.clone(), 0.04, 7).len(),
            0,
            "0.4 of a record rounds to none"
        );
    }

    /// Two files: `train` (alpaca, 10 records, capped to 8, weight 0.5) and a source (question/answer under
    /// other names, 4 records, weight 2), every 4th record held out first.
    #[test]
    fn a_mix_caps_splits_then_weights_each_file() {
        let d = std::env::temp_dir().join(format!("ytrainer-mix-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let a = d.join("a.jsonl");
        let lines: Vec<String> = (0..10)
            .map(|i| format!("{{\"instruction\": \"q{i}\", \"output\": \"a{i}\"}}"))
            .collect();
        std::fs::write(&a, lines.join("\n")).unwrap();
        let b = d.join("b.csv");
        std::fs::write(&b, "Q,A\nx0,y0\nx1,y1\nx2,y2\nx3,y3\n").unwrap();
        let mut cfg = RunConfig::default();
        cfg.data.max_samples = 8;
        cfg.data.train_weight = 0.5;
        cfg.data.eval_fraction = 0.25;
        cfg.data.sources = vec![DataSource {
            path: b.clone(),
            weight: 2.0,
            columns: [("question", "Q"), ("answer", "A")]
                .iter()
                .map(|(x, y)| (x.to_string(), y.to_string()))
                .collect(),
            ..DataSource::default()
        }];
        let m = training_mix(&cfg, &a).unwrap();
        let _ = std::fs::remove_dir_all(&d);
        // a: 8 kept, 2 held out (the 4th and 8th), 6 * 0.5 = 3 trained; b: 1 held out, 3 * 2 = 6 trained.
        assert_eq!(
            m.sources
                .iter()
                .map(|s| (s.records, s.capped, s.eval, s.train))
                .collect::<Vec<_>>(),
            [(10, 8, 2, 3), (4, 4, 1, 6)]
        );
        assert_eq!((m.train.len(), m.eval.len()), (9, 3));
        let text = |r: &Record| match &r.kind {
            ytrainer_data::RecordKind::Chat { messages } => messages[0].content.clone(),
            ytrainer_data::RecordKind::Text { text } => text.clone(),
        };
        let eval: Vec<String> = m.eval.iter().map(text).collect();
        assert_eq!(eval, ["q3", "q7", "x3"]);
        let train: Vec<String> = m.train.iter().map(text).collect();
        assert!(
            train.iter().all(|t| !eval.contains(t)),
            "no eval record is trained on"
        );
        assert_eq!(train[3..], ["x0", "x1", "x2", "x0", "x1", "x2"]);
        assert_eq!(
            m.sources[0].describe(),
            format!(
                "data: {} (alpaca): 10 records, first 8 (max_samples), 2 held out for eval, weight 0.5 -> 3 training records",
                a.display()
            )
        );
    }
}
