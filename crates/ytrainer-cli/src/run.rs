//! `ytrainer run` and `ytrainer init`: flags -> [`ytrainer_recipes::run`] -> the summary printed.

use std::sync::OnceLock;

use anyhow::Result;
use ytrainer_core::device::Precision;
use ytrainer_core::dist::Group;
use ytrainer_recipes::preference::PrefReport;
use ytrainer_recipes::sft::SftReport;
use ytrainer_recipes::{RunOptions, RunReport};

use crate::cli::{InitArgs, RunArgs};
use crate::config_file;
use crate::progress::Bar;

/// `ytrainer init`
pub fn init_preset(a: InitArgs) -> Result<()> {
    ytrainer_recipes::preset::create_preset(&a.preset, &a.data, a.seed, &a.out, Precision::F32)?;
    println!("wrote {} model to {}", a.preset, a.out.display());
    Ok(())
}

static GROUP: OnceLock<Group> = OnceLock::new();

/// The data-parallel group `main` joined (under `mpirun` / `srun` with the `mpi` feature).
pub fn set_group(group: Group) {
    let _ = GROUP.set(group);
}

/// `ytrainer run`
pub fn run(args: RunArgs) -> Result<()> {
    let mut cfg = config_file::resolve(&args)?;
    let mut group = GROUP.get().cloned().unwrap_or_default();
    if group.get().world_size() > 1 {
        // `cuda` under a launcher is this rank's GPU on its node (the device is not part of the config
        // fingerprint the ranks compare).
        cfg.train.device =
            ytrainer_dist::rank_device(&cfg.train.device, ytrainer_dist::launcher_local_rank());
    }
    if !args.dry_run {
        let joined = group.clone();
        group = ytrainer_dist::transport_for(group, &cfg.train.device)?;
        // A transport of its own was set up (NCCL): say so once it has passed its check sum.
        if group.is_writer() && !std::sync::Arc::ptr_eq(&joined.0, &group.0) {
            eprintln!(
                "sums over {} ({} rank(s); its set-up check sum was right)",
                group.get().describe(),
                group.get().world_size()
            );
        }
    }
    let writer = group.is_writer();
    let opts = RunOptions {
        resume: args.resume.clone(),
        dry_run: args.dry_run,
        plugin_dirs: crate::plugins_cmd::cli_plugin_dirs(),
        overwrite: args.overwrite,
        own_files: Vec::new(),
        group,
    };
    // Rank 0 speaks for a data-parallel run; the other ranks only report errors.
    let report = if writer {
        let mut bar = Bar::new();
        let report = ytrainer_recipes::run(cfg, &opts, &mut bar);
        drop(bar);
        report
    } else {
        ytrainer_recipes::run(cfg, &opts, &mut ytrainer_core::observe::Silent)
    };
    let report = report?;
    if !writer {
        return Ok(());
    }
    match report {
        RunReport::DryRun(cfg) => println!("{}", toml::to_string_pretty(&cfg)?),
        RunReport::Sft(r) => print_sft(&r),
        RunReport::Preference(r) => print_preference(&r),
    }
    Ok(())
}

fn print_sft(r: &SftReport) {
    let (summary, s) = (&r.summary, &r.data);
    println!(
        "done: {} optimizer steps, {} supervised tokens trained in {:.1}s",
        summary.steps, summary.tokens_trained, summary.seconds
    );
    if summary.skipped_steps > 0 {
        println!(
            "  skipped updates (non-finite loss/gradient): {}",
            summary.skipped_steps
        );
    }
    let plan = &r.plan;
    if plan.max_steps > 0 && summary.steps < plan.max_steps {
        println!(
            "  note: max_steps {} not reached: the data ran out after {} steps ({} epoch(s)); raise --epochs for more",
            plan.max_steps, summary.steps, plan.epochs
        );
    }
    match (&summary.eval_before, &summary.eval_after) {
        (Some(b), Some(a)) => println!(
            "  eval loss: {:.4} -> {:.4} (token accuracy {:.3} -> {:.3})",
            b.eval_loss, a.eval_loss, b.eval_token_accuracy, a.eval_token_accuracy
        ),
        (None, Some(a)) => println!("  eval loss after: {:.4}", a.eval_loss),
        _ => {}
    }
    println!(
        "  data: {} examples; truncated {}, skipped (overlong) {}, skipped (no targets) {}, warnings {}",
        s.examples,
        s.truncated,
        s.skipped_overlong,
        s.skipped_no_targets,
        r.warnings.len()
    );
    for w in r.warnings.iter().take(5) {
        println!("    warning: {w}");
    }
    println!(
        "  metrics: {}",
        r.output_dir.join("metrics.jsonl").display()
    );
    if let Some(c) = &summary.last_checkpoint {
        println!("  checkpoint (resumable): {}", c.display());
    }
    println!("  exported model: {}", r.final_dir.display());
}

fn print_preference(r: &PrefReport) {
    let summary = &r.summary;
    println!(
        "done: {} optimizer steps on {} pairs in {:.1}s",
        summary.steps, r.pairs, summary.seconds
    );
    if summary.skipped_steps > 0 {
        println!(
            "  skipped updates (non-finite loss/gradient): {}",
            summary.skipped_steps
        );
    }
    match (&summary.eval_before, &summary.eval_after) {
        (Some(b), Some(a)) => println!(
            "  eval: loss {:.4} -> {:.4}, reward accuracy {:.3} -> {:.3}, margin {:.4} -> {:.4}",
            b.eval_loss, a.eval_loss, b.accuracy, a.accuracy, b.margin, a.margin
        ),
        (None, Some(a)) => println!(
            "  eval after: loss {:.4}, reward accuracy {:.3}, margin {:.4}",
            a.eval_loss, a.accuracy, a.margin
        ),
        _ => println!(
            "  eval: none ({} eval pairs; set [data] eval or eval_fraction)",
            r.eval_pairs
        ),
    }
    println!(
        "  pairs: {}; truncated {}, warnings {}",
        r.pairs,
        r.truncated,
        r.warnings.len()
    );
    for w in r.warnings.iter().take(5) {
        println!("    warning: {w}");
    }
    println!(
        "  metrics: {}",
        r.output_dir.join("metrics.jsonl").display()
    );
    if let Some(c) = &summary.last_checkpoint {
        println!("  checkpoint (resumable): {}", c.display());
    }
    println!("  exported model: {}", r.final_dir.display());
}
