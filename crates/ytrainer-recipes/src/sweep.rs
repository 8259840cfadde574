//! The sweep's trial runner: each trial is an ordinary run of this crate (the trial's config resolved like a
//! config file), followed by the evaluator on the sweep's learn / retain sets before and after training. The
//! sweep crate stays free of models; the CLI only adds progress bars.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ytrainer_core::config::AdapterKind;
use ytrainer_core::observe::Observer;
use ytrainer_sweep::{DatasetEval, Trial, TrialEvals, TrialRunner};

use crate::error::{Context, Result};
use crate::eval::{EvalSettings, Evaluator};
use crate::run::{RunOptions, run};

/// Runs trials in this process, one after another.
pub struct LibraryRunner {
    /// Instruction / text files whose loss should fall (the domain).
    pub learn: Vec<PathBuf>,
    /// Files whose loss should not rise (general ability).
    pub retain: Vec<PathBuf>,
    /// Eval window in tokens.
    pub window: usize,
    /// At most this many eval samples per file (0 = all).
    pub max_samples: usize,
    /// Overrides every trial's `train.device` (`--devices` with one device).
    pub device: Option<String>,
    /// External plugin directories named outside the configs.
    pub plugin_dirs: Vec<PathBuf>,
    /// Makes the observer of each trial's training loop (progress bars).
    pub observer: Box<dyn FnMut() -> Box<dyn Observer>>,
    /// Before-training evals by base model directory (a LoRA or full run starts from the base itself).
    before: HashMap<PathBuf, (Vec<DatasetEval>, Vec<DatasetEval>)>,
}

impl LibraryRunner {
    /// A runner evaluating on `learn` and `retain`.
    pub fn new(
        learn: Vec<PathBuf>,
        retain: Vec<PathBuf>,
        window: usize,
        max_samples: usize,
        observer: Box<dyn FnMut() -> Box<dyn Observer>>,
    ) -> Self {
        LibraryRunner {
            learn,
            retain,
            window,
            max_samples,
            device: None,
            plugin_dirs: Vec::new(),
            observer,
            before: HashMap::new(),
        }
    }

    fn eval(
        &self,
        model: &Path,
        adapter: Option<&Path>,
        device: &str,
    ) -> Result<(Vec<DatasetEval>, Vec<DatasetEval>)> {
        if self.learn.is_empty() && self.retain.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let ev = Evaluator::load(
            model,
            adapter,
            EvalSettings {
                window: self.window,
                max_samples: self.max_samples,
                device: device.to_string(),
            },
        )?;
        Ok((
            ev.evaluate_files(&self.learn)?,
            ev.evaluate_files(&self.retain)?,
        ))
    }

    /// The trial's config as this runner runs it (`--devices` sets the device).
    fn with_device(&self, config: &toml::Table) -> Result<toml::Table> {
        let mut config = config.clone();
        if let Some(d) = &self.device {
            crate::config::set_path(&mut config, "train.device", toml::Value::String(d.clone()))?;
        }
        Ok(config)
    }

    fn run_trial(&mut self, config: &toml::Table, dir: &Path) -> Result<TrialEvals> {
        let t0 = Instant::now();
        let config = self.with_device(config)?;
        // The trial's config is kept in its folder, so a trial can be rerun alone with `ytrainer run --config`.
        let path = dir.join("config.toml");
        fs::write(&path, toml::to_string_pretty(&config)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let cfg = crate::config::resolve(Some(&path), &[])?;
        // An interrupted trial continues from its latest checkpoint: run_all kept the folder only because
        // `resumable` found one written with these settings (otherwise the folder is new and empty).
        let opts = RunOptions {
            plugin_dirs: self.plugin_dirs.clone(),
            own_files: vec![path.clone()],
            resume: (!ytrainer_core::checkpoint::list(dir).is_empty()).then(|| dir.to_path_buf()),
            ..RunOptions::default()
        };
        let mut observer = (self.observer)();
        let report = run(cfg.clone(), &opts, observer.as_mut())?;
        drop(observer);
        let steps = match &report {
            crate::RunReport::Sft(r) => r.summary.steps,
            crate::RunReport::Preference(r) => r.summary.steps,
            crate::RunReport::DryRun(_) => 0,
        };
        let base = cfg
            .model
            .path
            .clone()
            .unwrap_or_else(|| dir.join("base-model"));
        let device = cfg.train.device.clone();
        let before = match self.before.get(&base) {
            Some(b) => b.clone(),
            None => {
                let b = self.eval(&base, None, &device)?;
                // Self-made presets live inside the trial folder: nothing to share with other trials.
                if cfg.model.path.is_some() {
                    self.before.insert(base.clone(), b.clone());
                }
                b
            }
        };
        let final_dir = dir.join("final");
        let after = match cfg.adapter.kind {
            AdapterKind::Lora => self.eval(&base, Some(&final_dir), &device)?,
            AdapterKind::Full => self.eval(&final_dir, None, &device)?,
        };
        Ok(TrialEvals {
            learn_before: before.0,
            retain_before: before.1,
            learn_after: after.0,
            retain_after: after.1,
            steps,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}

impl TrialRunner for LibraryRunner {
    fn run(
        &mut self,
        _trial: &Trial,
        config: &toml::Table,
        dir: &Path,
    ) -> anyhow::Result<TrialEvals> {
        Ok(self.run_trial(config, dir)?)
    }

    fn resumable(&self, config: &toml::Table, dir: &Path) -> bool {
        if ytrainer_core::checkpoint::list(dir).is_empty() {
            return false;
        }
        // Same settings as the interrupted attempt: the config it kept in its folder (the run's own fingerprint,
        // which `--resume` checks, also covers the data files' content).
        let Some(now) = self
            .with_device(config)
            .ok()
            .and_then(|c| toml::to_string_pretty(&c).ok())
        else {
            return false;
        };
        fs::read_to_string(dir.join("config.toml")).is_ok_and(|then| then == now)
    }
}
