//! `ytrainer sweep` and `ytrainer plot`: the sweep logic lives in `ytrainer-sweep`, the trial runner in
//! `ytrainer_recipes::sweep` (a library run per trial, then the evaluator on the learn / retain sets before and
//! after); this module parses flags, spreads trials over devices and draws the progress bars.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use ytrainer_recipes::sweep::LibraryRunner;
use ytrainer_sweep::{Sweep, SweepProgress, Trial};

use crate::cli::{PlotArgs, SweepArgs};
use crate::progress::Bar;

struct Bars {
    overall: Option<ProgressBar>,
}

impl SweepProgress for Bars {
    fn start(&mut self, total: usize, done: usize) {
        let bar = crate::progress::multi().add(ProgressBar::new(total as u64));
        bar.set_style(
            ProgressStyle::with_template(
                "sweep [{elapsed_precise}] {bar:30} {pos}/{len} trials {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(done as u64);
        if done > 0 {
            eprintln!("sweep: {done} of {total} trials already finished; continuing");
        }
        self.overall = Some(bar);
    }
    fn trial_start(&mut self, index: usize, trial: &Trial) {
        let total = self.overall.as_ref().and_then(|b| b.length()).unwrap_or(0);
        let seed = trial
            .seed
            .map(|s| format!(", seed {s}"))
            .unwrap_or_default();
        eprintln!(
            "sweep: trial {}/{total}: {}{seed} ({})",
            index + 1,
            trial.strategy,
            trial.id
        );
        if let Some(b) = &self.overall {
            b.set_message(format!("{}{seed}", trial.strategy));
        }
    }
    fn trial_done(&mut self, _index: usize, _trial: &Trial, skipped: bool) {
        if let (Some(b), false) = (&self.overall, skipped) {
            b.inc(1);
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        if let Some(b) = &self.overall {
            b.finish_and_clear();
        }
    }
}

/// `ytrainer sweep`
pub fn sweep(a: SweepArgs) -> Result<()> {
    let mut sw = Sweep::load(&a.file)?;
    if let Some(o) = &a.output_dir {
        sw.output = std::env::current_dir().unwrap_or_default().join(o);
    }
    let trials = sw.trials();
    if a.dry_run {
        // The same checks as before a real sweep (each trial's config resolved, its loss plugin loaded and built
        // with its parameters), on configs written to a scratch folder: a dry run leaves the sweep folder alone.
        let scratch =
            std::env::temp_dir().join(format!("ytrainer-sweep-dry-run-{}", std::process::id()));
        let checked = validate_trials(&sw, &trials, &scratch);
        let _ = fs::remove_dir_all(&scratch);
        checked?;
        println!(
            "sweep `{}`: {} trials -> {}",
            sw.name,
            trials.len(),
            sw.output.display()
        );
        for t in &trials {
            let ov: Vec<String> = t
                .overrides
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!(
                "  {:<40} seed {:<6} {}",
                t.id,
                t.seed.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                ov.join(" ")
            );
        }
        return Ok(());
    }
    for p in sw.learn.iter().chain(&sw.retain) {
        if !p.exists() {
            bail!(
                "{}: eval set named in the sweep file does not exist",
                p.display()
            );
        }
    }
    // Every trial's config is checked before the first one trains: a typo must not surface hours in. Workers of
    // `--devices` skip this: their parent has checked every trial, and concurrent workers rewriting the shared
    // `configs/` files would read each other's half-written files.
    if a.shard.is_none() {
        validate_trials(&sw, &trials, &sw.output.join("configs"))?;
    }
    let shard = match &a.shard {
        Some(s) => Some(parse_shard(s)?),
        None => None,
    };
    if shard.is_none() && a.devices.len() > 1 {
        spread(&a, &sw.output)?;
    }
    let mine: Vec<Trial> = match shard {
        Some((k, n)) => trials
            .iter()
            .enumerate()
            .filter(|(i, _)| i % n == k)
            .map(|(_, t)| t.clone())
            .collect(),
        None => trials.clone(),
    };
    let mut runner = LibraryRunner::new(
        sw.learn.clone(),
        sw.retain.clone(),
        sw.eval.window,
        sw.eval.max_samples,
        Box::new(|| Box::new(Bar::new())),
    );
    runner.device = (a.devices.len() == 1).then(|| a.devices[0].clone());
    runner.plugin_dirs = crate::plugins_cmd::cli_plugin_dirs();
    let results = {
        let mut bars = Bars { overall: None };
        ytrainer_sweep::run_all(&sw, &mine, &mut runner, &mut bars)?
    };
    if let Some((k, n)) = shard {
        println!(
            "sweep `{}`: shard {k}/{n} done ({} trials)",
            sw.name,
            results.len()
        );
        return Ok(());
    }
    let (files, plot_err) = ytrainer_sweep::write_reports(&sw, &results)?;
    if let Some(e) = plot_err {
        eprintln!("warning: plots not drawn: {e:#}");
    }
    println!("sweep `{}`: {} trials done", sw.name, results.len());
    println!(
        "{}",
        ytrainer_sweep::results_md(
            &sw.name,
            &ytrainer_sweep::aggregate(&results),
            &sw.learn,
            &sw.retain
        )
        .lines()
        .filter(|l| l.starts_with('|'))
        .collect::<Vec<_>>()
        .join("\n")
    );
    for f in files {
        println!("  {}", f.display());
    }
    Ok(())
}

/// Writes each trial's run config to `configs/<id>.toml` and checks that it resolves and its loss builds.
/// Writes each trial's config into `configs`, resolves it like `ytrainer run --config` and builds its loss plugin
/// (external plugins loaded) with its parameters.
fn validate_trials(sw: &Sweep, trials: &[Trial], configs: &Path) -> Result<()> {
    fs::create_dir_all(configs).with_context(|| format!("cannot create {}", configs.display()))?;
    for t in trials {
        let dir = ytrainer_sweep::results::trial_dir(&sw.output, t);
        let path = configs.join(format!("{}.toml", t.id));
        fs::write(&path, toml::to_string_pretty(&sw.trial_config(t, &dir)?)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let cfg = ytrainer_recipes::config::resolve(Some(&path), &[])
            .with_context(|| format!("trial `{}`", t.id))?;
        crate::plugins_cmd::registry(&cfg.loss.plugins)?
            .build(&cfg.loss.name, &cfg.loss.params)
            .map_err(|e| anyhow!("trial `{}`: {e}", t.id))?;
    }
    Ok(())
}

fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let parsed = s
        .split_once('/')
        .and_then(|(k, n)| Some((k.parse::<usize>().ok()?, n.parse::<usize>().ok()?)));
    match parsed {
        Some((k, n)) if n > 0 && k < n => Ok((k, n)),
        _ => bail!("--shard `{s}`: expected K/N with 0 <= K < N"),
    }
}

/// `--devices A,B,...`: one worker process per device (`ytrainer sweep FILE --shard K/N --devices D`), all at
/// once; trial `i` goes to worker `i mod N`. Workers share the sweep folder, so finished trials are skipped and an
/// interrupted sweep resumes the same way as a sequential one.
fn spread(a: &SweepArgs, output: &Path) -> Result<()> {
    let exe =
        std::env::current_exe().context("cannot find the ytrainer executable to start workers")?;
    let n = a.devices.len();
    let mut children = Vec::new();
    for (k, device) in a.devices.iter().enumerate() {
        let mut cmd = std::process::Command::new(&exe);
        for d in crate::plugins_cmd::cli_plugin_dirs() {
            cmd.arg("--plugin-dir").arg(d);
        }
        cmd.arg("sweep")
            .arg(&a.file)
            .arg("--output-dir")
            .arg(output)
            .arg("--shard")
            .arg(format!("{k}/{n}"))
            .arg("--devices")
            .arg(device);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start the sweep worker for device `{device}`"))?;
        children.push((device.clone(), child));
    }
    let mut failed = Vec::new();
    for (device, mut child) in children {
        let status = child
            .wait()
            .with_context(|| format!("waiting for the sweep worker on `{device}`"))?;
        if !status.success() {
            failed.push(format!("`{device}` ({status})"));
        }
    }
    if !failed.is_empty() {
        bail!(
            "sweep workers failed on {}: see their messages above; rerun the same command to resume (finished \
             trials are kept)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// `ytrainer plot`
pub fn plot(a: PlotArgs) -> Result<()> {
    let files = ytrainer_sweep::plot::run_plots(&a.run_dir)?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}
