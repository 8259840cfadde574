//! Trial outcomes, resumable execution, and the per-strategy result table.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::spec::{Sweep, Trial};

/// Evaluation of one data set (what `ytrainer eval` reports per file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatasetEval {
    /// The file.
    pub data: String,
    /// `instruction` (chat records) or `text` (raw text, cut into windows).
    pub kind: String,
    /// Mean cross-entropy over every predicted token (for instruction data: prompts and answers alike).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Argmax accuracy over the same tokens.
    pub token_accuracy: f64,
    /// Tokens scored.
    pub tokens: usize,
    /// Instruction data: mean cross-entropy over the supervised (assistant) tokens only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervised_loss: Option<f64>,
    /// Instruction data: token accuracy over the supervised tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervised_token_accuracy: Option<f64>,
    /// Instruction data: supervised tokens scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervised_tokens: Option<usize>,
    /// Examples (instruction samples or text windows).
    pub samples: usize,
}

impl DatasetEval {
    /// The loss the sweep compares: supervised-only for instruction data, all tokens for text.
    pub fn primary(&self) -> f64 {
        self.supervised_loss.unwrap_or(self.loss)
    }
}

/// What a trial runner measures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct TrialEvals {
    /// Learn (domain) sets before training.
    pub learn_before: Vec<DatasetEval>,
    /// Learn sets after training.
    pub learn_after: Vec<DatasetEval>,
    /// Retain (general) sets before training.
    pub retain_before: Vec<DatasetEval>,
    /// Retain sets after training.
    pub retain_after: Vec<DatasetEval>,
    /// Optimizer steps done.
    pub steps: usize,
    /// Seconds the trial took (training and evaluation).
    pub seconds: f64,
}

/// `trial.json`: written last, so its presence marks a finished trial.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrialResult {
    /// Trial folder name.
    pub id: String,
    /// Configuration label without the seed.
    pub strategy: String,
    /// Seed.
    pub seed: Option<i64>,
    /// Overridden keys as `key = value`.
    pub overrides: Vec<String>,
    /// Measurements.
    pub evals: TrialEvals,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Sample standard deviation (n - 1); 0 for a single value.
pub fn std(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

impl TrialResult {
    /// Mean primary loss over the learn sets before training.
    pub fn domain_before(&self) -> f64 {
        mean(
            &self
                .evals
                .learn_before
                .iter()
                .map(DatasetEval::primary)
                .collect::<Vec<_>>(),
        )
    }
    /// ... after training.
    pub fn domain_after(&self) -> f64 {
        mean(
            &self
                .evals
                .learn_after
                .iter()
                .map(DatasetEval::primary)
                .collect::<Vec<_>>(),
        )
    }
    /// Mean primary loss over the retain sets before training.
    pub fn general_before(&self) -> f64 {
        mean(
            &self
                .evals
                .retain_before
                .iter()
                .map(DatasetEval::primary)
                .collect::<Vec<_>>(),
        )
    }
    /// ... after training.
    pub fn general_after(&self) -> f64 {
        mean(
            &self
                .evals
                .retain_after
                .iter()
                .map(DatasetEval::primary)
                .collect::<Vec<_>>(),
        )
    }
    /// Domain loss drop (positive = learned).
    pub fn gain(&self) -> f64 {
        self.domain_before() - self.domain_after()
    }
    /// General loss rise (positive = forgot).
    pub fn forgetting(&self) -> f64 {
        self.general_after() - self.general_before()
    }
}

/// Runs one trial. The sweep crate knows nothing of models: the CLI implements this with the real trainer,
/// tests with a fake.
pub trait TrialRunner {
    /// Trains and evaluates `trial` with run config `config` in `dir`: freshly created and empty, or an
    /// interrupted trial's folder that [`TrialRunner::resumable`] accepted, to be continued.
    fn run(&mut self, trial: &Trial, config: &toml::Table, dir: &Path) -> Result<TrialEvals>;

    /// Whether an interrupted trial's folder holds a checkpoint `run` can continue from with run config
    /// `config` (the same settings). Such a folder is kept, so a long trial (hours on a CPU) loses only the steps
    /// since its last checkpoint, not the whole trial; one whose settings changed since is cleared and rerun.
    fn resumable(&self, _config: &toml::Table, _dir: &Path) -> bool {
        false
    }
}

/// Progress of a sweep.
pub trait SweepProgress {
    /// Before anything runs: how many trials, how many already finished.
    fn start(&mut self, _total: usize, _done: usize) {}
    /// A trial begins (`index` is 0-based over all trials).
    fn trial_start(&mut self, _index: usize, _trial: &Trial) {}
    /// A trial was finished before (skipped) or just now.
    fn trial_done(&mut self, _index: usize, _trial: &Trial, _skipped: bool) {}
}

/// A progress sink that ignores everything.
pub struct NoProgress;
impl SweepProgress for NoProgress {}

/// The folder of a trial.
pub fn trial_dir(out: &Path, trial: &Trial) -> PathBuf {
    out.join("trials").join(&trial.id)
}

/// Reads a finished trial's `trial.json`, if any.
pub fn finished(dir: &Path) -> Option<TrialResult> {
    let text = fs::read_to_string(dir.join("trial.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes a file atomically (temp file + rename), so an interrupted write never leaves half a result.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Runs every trial not finished yet, in order; a trial folder without `trial.json` (an interrupted trial)
/// continues from its checkpoint when the runner can resume it, and is otherwise removed and the trial restarts.
/// Returns the results of all trials.
pub fn run_all(
    sweep: &Sweep,
    trials: &[Trial],
    runner: &mut dyn TrialRunner,
    progress: &mut dyn SweepProgress,
) -> Result<Vec<TrialResult>> {
    let out = &sweep.output;
    fs::create_dir_all(out.join("trials"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    let done = trials
        .iter()
        .filter(|t| finished(&trial_dir(out, t)).is_some())
        .count();
    progress.start(trials.len(), done);
    let mut results = Vec::new();
    for (i, t) in trials.iter().enumerate() {
        let dir = trial_dir(out, t);
        if let Some(r) = finished(&dir) {
            progress.trial_done(i, t, true);
            results.push(r);
            continue;
        }
        let config = sweep.trial_config(t, &dir)?;
        if dir.exists() && !runner.resumable(&config, &dir) {
            fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear the interrupted trial {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        progress.trial_start(i, t);
        let evals = runner
            .run(t, &config, &dir)
            .with_context(|| format!("trial `{}` ({})", t.id, dir.display()))?;
        let r = TrialResult {
            id: t.id.clone(),
            strategy: t.strategy.clone(),
            seed: t.seed,
            overrides: t
                .overrides
                .iter()
                .map(|(k, v)| format!("{k} = {v}"))
                .collect(),
            evals,
        };
        write_atomic(
            &dir.join("trial.json"),
            serde_json::to_string_pretty(&r)?.as_bytes(),
        )?;
        progress.trial_done(i, t, false);
        results.push(r);
    }
    Ok(results)
}

/// Mean and standard deviation over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation.
    pub std: f64,
}

impl Stat {
    fn of(v: &[f64]) -> Stat {
        Stat {
            mean: mean(v),
            std: std(v),
        }
    }
    /// `mean ± std`; with a single seed there is no spread to show, so `mean ± n/a` (not `± 0.0000`).
    fn show(&self, n: usize) -> String {
        if n < 2 {
            format!("{:.4} ± n/a", self.mean)
        } else {
            format!("{:.4} ± {:.4}", self.mean, self.std)
        }
    }
}

/// One row of `results.md`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StrategyRow {
    /// Strategy label.
    pub strategy: String,
    /// Trials (seeds) aggregated.
    pub n: usize,
    /// Domain loss before training.
    pub domain_before: Stat,
    /// Domain loss after training.
    pub domain_after: Stat,
    /// Domain gain (before - after).
    pub domain_gain: Stat,
    /// General loss before.
    pub general_before: Stat,
    /// General loss after.
    pub general_after: Stat,
    /// General loss increase (after - before).
    pub general_increase: Stat,
    /// Mean gain / mean increase: domain loss gained per unit of general loss lost. Defined only when both are
    /// positive (`None` otherwise): with no gain, or with no forgetting, the quotient's sign and size say nothing
    /// (a domain loss that rose over a small increase would read as a large negative "ratio").
    pub gain_per_forgetting: Option<f64>,
}

impl StrategyRow {
    /// The `gain / forgetting` cell of `results.md`: the ratio, or why there is none.
    pub fn gain_per_forgetting_cell(&self) -> String {
        match self.gain_per_forgetting {
            Some(x) => format!("{x:.2}"),
            None if self.domain_gain.mean <= 0.0 => "n/a (no gain)".into(),
            None => "n/a (no forgetting)".into(),
        }
    }
}

/// Groups results by strategy (in order of first appearance) and aggregates over seeds.
pub fn aggregate(results: &[TrialResult]) -> Vec<StrategyRow> {
    let mut order: Vec<&str> = Vec::new();
    for r in results {
        if !order.contains(&r.strategy.as_str()) {
            order.push(&r.strategy);
        }
    }
    order
        .into_iter()
        .map(|s| {
            let rs: Vec<&TrialResult> = results.iter().filter(|r| r.strategy == s).collect();
            let col =
                |f: fn(&TrialResult) -> f64| Stat::of(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
            let gain = col(TrialResult::gain);
            let inc = col(TrialResult::forgetting);
            StrategyRow {
                strategy: s.to_string(),
                n: rs.len(),
                domain_before: col(TrialResult::domain_before),
                domain_after: col(TrialResult::domain_after),
                domain_gain: gain,
                general_before: col(TrialResult::general_before),
                general_after: col(TrialResult::general_after),
                general_increase: inc,
                gain_per_forgetting: (gain.mean > 0.0 && inc.mean > 0.0)
                    .then(|| gain.mean / inc.mean),
            }
        })
        .collect()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `results.csv`: one row per trial.
pub fn results_csv(results: &[TrialResult]) -> String {
    let mut s = String::from(
        "trial,strategy,seed,domain_before,domain_after,domain_gain,general_before,general_after,\
         general_increase,steps,seconds,overrides\n",
    );
    for r in results {
        s.push_str(&format!(
            "{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{},{:.1},{}\n",
            csv_field(&r.id),
            csv_field(&r.strategy),
            r.seed.map(|x| x.to_string()).unwrap_or_default(),
            r.domain_before(),
            r.domain_after(),
            r.gain(),
            r.general_before(),
            r.general_after(),
            r.forgetting(),
            r.evals.steps,
            r.evals.seconds,
            csv_field(&r.overrides.join("; ")),
        ));
    }
    s
}

/// `results.md`: the per-strategy table (mean ± std over seeds).
pub fn results_md(
    sweep_name: &str,
    rows: &[StrategyRow],
    learn: &[PathBuf],
    retain: &[PathBuf],
) -> String {
    let names = |v: &[PathBuf]| {
        v.iter()
            .map(|p| {
                format!(
                    "`{}`",
                    p.file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut s = format!(
        "# Sweep `{sweep_name}`\n\nDomain loss: mean token loss on the learn sets ({}; supervised tokens only for \
         instruction data). General loss: on the retain sets ({}). Values are mean ± sample std over seeds (n/a for \
         one seed); \
         gain = before - after on the domain, increase = after - before on general text; gain / forgetting is \
         mean gain divided by mean increase, shown only when both are positive (n/a (no gain) when the domain \
         loss did not fall, n/a (no forgetting) when the general loss did not rise).\n\n",
        names(learn),
        names(retain)
    );
    s.push_str(
        "| strategy | n | domain before | domain after | domain gain | general before | general after | \
         general increase | gain / forgetting |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.strategy,
            r.n,
            r.domain_before.show(r.n),
            r.domain_after.show(r.n),
            r.domain_gain.show(r.n),
            r.general_before.show(r.n),
            r.general_after.show(r.n),
            r.general_increase.show(r.n),
            r.gain_per_forgetting_cell(),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(loss: f64, sup: Option<f64>) -> DatasetEval {
        DatasetEval {
            data: "x".into(),
            kind: if sup.is_some() { "instruction" } else { "text" }.into(),
            loss,
            perplexity: loss.exp(),
            token_accuracy: 0.5,
            tokens: 100,
            supervised_loss: sup,
            supervised_token_accuracy: sup.map(|_| 0.5),
            supervised_tokens: sup.map(|_| 50),
            samples: 3,
        }
    }

    fn trial(strategy: &str, seed: i64, d: (f64, f64), g: (f64, f64)) -> TrialResult {
        TrialResult {
            id: format!("{strategy}_seed{seed}"),
            strategy: strategy.into(),
            seed: Some(seed),
            overrides: vec![format!("loss.name = \"{strategy}\"")],
            evals: TrialEvals {
                // two learn sets averaging to d.0 / d.1; the prompt loss (99) must not count
                learn_before: vec![ev(99.0, Some(d.0 - 0.5)), ev(99.0, Some(d.0 + 0.5))],
                learn_after: vec![ev(99.0, Some(d.1)), ev(99.0, Some(d.1))],
                retain_before: vec![ev(g.0, None)],
                retain_after: vec![ev(g.1, None)],
                steps: 10,
                seconds: 1.0,
            },
        }
    }

    #[test]
    fn aggregation_of_hand_made_trials() {
        let rs = vec![
            trial("ce", 1, (3.0, 2.0), (4.0, 4.5)),
            trial("ce", 2, (3.0, 1.0), (4.0, 4.3)),
            trial("nlirg", 1, (3.0, 2.5), (4.0, 4.1)),
            trial("nlirg", 2, (3.0, 2.5), (4.0, 4.1)),
            trial("noop", 1, (3.0, 3.0), (4.0, 3.9)),
        ];
        let rows = aggregate(&rs);
        assert_eq!(
            rows.iter().map(|r| r.strategy.as_str()).collect::<Vec<_>>(),
            ["ce", "nlirg", "noop"]
        );
        let ce = &rows[0];
        assert_eq!(ce.n, 2);
        assert!((ce.domain_before.mean - 3.0).abs() < 1e-12);
        assert!((ce.domain_after.mean - 1.5).abs() < 1e-12);
        assert!((ce.domain_gain.mean - 1.5).abs() < 1e-12);
        // sample std of {1, 2}
        assert!((ce.domain_gain.std - 0.5f64.sqrt()).abs() < 1e-12);
        assert!((ce.general_increase.mean - 0.4).abs() < 1e-12);
        assert!((ce.gain_per_forgetting.unwrap() - 1.5 / 0.4).abs() < 1e-9);
        let nl = &rows[1];
        assert_eq!(nl.domain_gain.std, 0.0);
        assert!((nl.gain_per_forgetting.unwrap() - 5.0).abs() < 1e-9);
        assert_eq!(rows[2].gain_per_forgetting, None, "no forgetting: n/a");

        let md = results_md(
            "t",
            &rows,
            &[PathBuf::from("/a/learn.jsonl")],
            &[PathBuf::from("/r.txt")],
        );
        assert!(
            md.contains("| ce | 2 | 3.0000 ± 0.0000 | 1.5000 ± 0.7071 | 1.5000 ± 0.7071 |"),
            "{md}"
        );
        assert!(md.contains("| 3.75 |"), "{md}");
        assert!(
            md.contains("| noop | 1 | 3.0000 ± n/a | 3.0000 ± n/a | 0.0000 ± n/a |"),
            "one seed has no spread: {md}"
        );
        // noop: no domain gain (and no forgetting either)
        assert!(md.contains("| n/a (no gain) |"), "{md}");
        assert!(md.contains("`learn.jsonl`"));
        let csv = results_csv(&rs);
        assert_eq!(csv.lines().count(), 6);
        assert!(csv.lines().nth(1).unwrap().starts_with(
            "ce_seed1,ce,1,3.000000,2.000000,1.000000,4.000000,4.500000,0.500000,10,"
        ));
    }

    /// A domain loss that rose is no gain: no ratio, whatever the forgetting (the old table showed -2.00 for a
    /// gain of -0.1 over an increase of 0.05, ranking it above a strategy that gained nothing and forgot a lot);
    /// never a negative ratio.
    #[test]
    fn the_ratio_is_never_negative_or_divided_by_nothing() {
        let rs = vec![
            trial("worse", 1, (3.0, 3.1), (4.0, 4.05)),
            trial("worse-and-no-forgetting", 1, (3.0, 3.1), (4.0, 3.9)),
            trial("free", 1, (3.0, 2.0), (4.0, 4.0)),
            trial("good", 1, (3.0, 2.0), (4.0, 4.5)),
        ];
        let rows = aggregate(&rs);
        let cells: Vec<String> = rows.iter().map(|r| r.gain_per_forgetting_cell()).collect();
        assert_eq!(
            cells,
            [
                "n/a (no gain)",
                "n/a (no gain)",
                "n/a (no forgetting)",
                "2.00"
            ]
        );
        assert!(
            rows.iter()
                .all(|r| r.gain_per_forgetting.is_none_or(|x| x > 0.0))
        );
        let md = results_md("t", &rows, &[], &[]);
        assert!(md.contains("| worse | 1 |"), "{md}");
        assert!(md.contains("| n/a (no gain) |\n"), "{md}");
        for row in md
            .lines()
            .filter(|l| l.starts_with("| worse") || l.starts_with("| free"))
        {
            let last = row.trim_end_matches(" |").rsplit("| ").next().unwrap();
            assert!(last.starts_with("n/a"), "{row}");
        }
    }
}
