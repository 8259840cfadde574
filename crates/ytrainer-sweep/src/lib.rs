//! Sweeps for ytrainer: a sweep file (a base run config plus axes) expands into trials ([`spec`]); trials run
//! one after another, resumably, through a [`results::TrialRunner`] the CLI provides ([`results::run_all`]);
//! results aggregate into `results.csv` / `results.md` ([`results`]) and plots ([`plot`]).
//!
//! Nothing here needs Burn or a model, so expansion, resume and aggregation are tested with a fake runner.

pub mod plot;
pub mod results;
pub mod spec;

pub use results::{
    DatasetEval, NoProgress, StrategyRow, SweepProgress, TrialEvals, TrialResult, TrialRunner,
    aggregate, results_csv, results_md, run_all,
};
pub use spec::{EvalOptions, Mode, Sweep, Trial};

/// Writes `results.csv`, `results.md` and the plots of a finished sweep; returns the files written. A plot
/// failure (e.g. no font) is returned as the second element, the tables are still written.
pub fn write_reports(
    sweep: &Sweep,
    results: &[TrialResult],
) -> anyhow::Result<(Vec<std::path::PathBuf>, Option<anyhow::Error>)> {
    let out = &sweep.output;
    let csv = out.join("results.csv");
    results::write_atomic(&csv, results_csv(results).as_bytes())?;
    let md = out.join("results.md");
    let rows = aggregate(results);
    results::write_atomic(
        &md,
        results_md(&sweep.name, &rows, &sweep.learn, &sweep.retain).as_bytes(),
    )?;
    let mut files = vec![csv, md];
    match plot::sweep_plots(out, results) {
        Ok(p) => files.extend(p),
        Err(e) => return Ok((files, Some(e))),
    }
    Ok((files, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    struct Fake {
        ran: Vec<String>,
        fail_on: Option<String>,
    }

    impl TrialRunner for Fake {
        fn run(
            &mut self,
            t: &Trial,
            config: &toml::Table,
            dir: &Path,
        ) -> anyhow::Result<TrialEvals> {
            assert!(dir.exists());
            assert_eq!(
                spec::get_path(config, "output.dir").and_then(|v| v.as_str()),
                Some(dir.to_str().unwrap())
            );
            std::fs::write(dir.join("partial"), "x").unwrap();
            if self.fail_on.as_deref() == Some(t.id.as_str()) {
                anyhow::bail!("killed");
            }
            self.ran.push(t.id.clone());
            let seed = t.seed.unwrap_or(0) as f64;
            let mk = |loss: f64| DatasetEval {
                data: "d".into(),
                kind: "text".into(),
                loss,
                perplexity: loss.exp(),
                token_accuracy: 0.1,
                tokens: 10,
                supervised_loss: None,
                supervised_token_accuracy: None,
                supervised_tokens: None,
                samples: 1,
            };
            let steps: Vec<String> = (1..=5)
                .map(|s| {
                    format!(
                        "{{\"step\":{s},\"ce\":{},\"zone_learned\":0.1,\"zone_learning\":0.6,\"zone_hard\":0.2,\"zone_noise\":0.1}}",
                        5.0 - s as f64 * 0.3 - seed * 0.01
                    )
                })
                .collect();
            std::fs::write(dir.join("metrics.jsonl"), steps.join("\n")).unwrap();
            std::fs::write(
                dir.join("eval.jsonl"),
                "{\"step\":0,\"eval_loss\":5.0}\n{\"step\":5,\"eval_loss\":3.0}\n",
            )
            .unwrap();
            Ok(TrialEvals {
                learn_before: vec![mk(5.0)],
                learn_after: vec![mk(3.0 - seed * 0.1)],
                retain_before: vec![mk(4.0)],
                retain_after: vec![mk(4.2 + seed * 0.1)],
                steps: 5,
                seconds: 0.1,
            })
        }
    }

    #[test]
    fn resume_skips_finished_trials_and_restarts_the_interrupted_one() {
        let out =
            std::env::temp_dir().join(format!("ytrainer-sweep-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let text = format!(
            "base = {{ model = {{ preset = \"tiny\" }} }}\nseeds = [1, 2]\noutput = \"{}\"\n[axes]\nloss = [\"ce\", \"nlirg\"]\n",
            out.display()
        );
        let sweep = Sweep::parse(&text, Path::new("/"), "s").unwrap();
        let trials = sweep.trials();
        assert_eq!(trials.len(), 4);
        // First attempt dies in the third trial.
        let mut r1 = Fake {
            ran: vec![],
            fail_on: Some("nlirg_seed1".into()),
        };
        let err = run_all(&sweep, &trials, &mut r1, &mut NoProgress).unwrap_err();
        assert!(format!("{err:#}").contains("killed"));
        assert_eq!(r1.ran, ["ce_seed1", "ce_seed2"]);
        assert!(out.join("trials/nlirg_seed1/partial").exists());
        assert!(!out.join("trials/nlirg_seed1/trial.json").exists());
        // Second attempt: the two finished trials are skipped, the interrupted one starts from an empty folder.
        struct Count<'a>(&'a mut Vec<(usize, bool)>);
        impl SweepProgress for Count<'_> {
            fn trial_done(&mut self, i: usize, _t: &Trial, skipped: bool) {
                self.0.push((i, skipped));
            }
        }
        let mut seen = Vec::new();
        let mut r2 = Fake {
            ran: vec![],
            fail_on: None,
        };
        let results = run_all(&sweep, &trials, &mut r2, &mut Count(&mut seen)).unwrap();
        assert_eq!(r2.ran, ["nlirg_seed1", "nlirg_seed2"]);
        assert_eq!(seen, [(0, true), (1, true), (2, false), (3, false)]);
        assert_eq!(results.len(), 4);
        // Third attempt runs nothing.
        let mut r3 = Fake {
            ran: vec![],
            fail_on: None,
        };
        let again = run_all(&sweep, &trials, &mut r3, &mut NoProgress).unwrap();
        assert!(r3.ran.is_empty());
        let key = |v: &[TrialResult]| {
            v.iter()
                .map(|r| (r.id.clone(), r.evals.steps))
                .collect::<Vec<_>>()
        };
        assert_eq!(key(&again), key(&results));

        let (files, plot_err) = write_reports(&sweep, &results).unwrap();
        assert!(plot_err.is_none(), "{plot_err:?}");
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() > 100, "{}", f.display());
        }
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().to_string())
            .collect();
        for n in [
            "results.csv",
            "results.md",
            "curves.png",
            "curves.svg",
            "forgetting.png",
            "forgetting.svg",
            "zones.png",
            "zones.svg",
        ] {
            assert!(names.contains(&n.to_string()), "{n} missing from {names:?}");
        }
        let md = std::fs::read_to_string(out.join("results.md")).unwrap();
        assert!(
            md.contains("| ce | 2 |") && md.contains("| nlirg | 2 |"),
            "{md}"
        );
        let _ = std::fs::remove_dir_all(&out);
    }

    /// A runner that can continue an interrupted trial gets its folder back untouched (its checkpoint
    /// survives), while one that cannot gets an empty folder.
    #[test]
    fn an_interrupted_trial_the_runner_can_resume_keeps_its_folder() {
        struct Resuming {
            inner: Fake,
            found_partial: Vec<String>,
        }
        impl TrialRunner for Resuming {
            fn run(
                &mut self,
                t: &Trial,
                config: &toml::Table,
                dir: &Path,
            ) -> anyhow::Result<TrialEvals> {
                if dir.join("partial").exists() {
                    self.found_partial.push(t.id.clone());
                }
                self.inner.run(t, config, dir)
            }
            fn resumable(&self, _config: &toml::Table, dir: &Path) -> bool {
                dir.join("partial").exists()
            }
        }
        let out =
            std::env::temp_dir().join(format!("ytrainer-sweep-continue-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let text = format!(
            "base = {{ model = {{ preset = \"tiny\" }} }}\nseeds = [1]\noutput = \"{}\"\n[axes]\nloss = [\"ce\", \"nlirg\"]\n",
            out.display()
        );
        let sweep = Sweep::parse(&text, Path::new("/"), "s").unwrap();
        let trials = sweep.trials();
        let mut r = Resuming {
            inner: Fake {
                ran: vec![],
                fail_on: Some("nlirg_seed1".into()),
            },
            found_partial: vec![],
        };
        assert!(run_all(&sweep, &trials, &mut r, &mut NoProgress).is_err());
        assert!(r.found_partial.is_empty());
        r.inner.fail_on = None;
        let results = run_all(&sweep, &trials, &mut r, &mut NoProgress).unwrap();
        assert_eq!(results.len(), 2);
        assert_eq!(r.inner.ran, ["ce_seed1", "nlirg_seed1"]);
        assert_eq!(r.found_partial, ["nlirg_seed1"]);
        let _ = std::fs::remove_dir_all(&out);
    }
}
