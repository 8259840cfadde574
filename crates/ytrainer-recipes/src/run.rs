//! `run`: a resolved config in, a trained and exported model out. The loss plugin decides the objective (a
//! token plugin trains SFT / continued pretraining, a pairwise one preference training); both share
//! [`crate::common`] and the one loop of `ytrainer-core`.

use ytrainer_core::config::RunConfig;
use ytrainer_core::loss::LossFn;
use ytrainer_core::observe::Observer;

pub use crate::common::{
    PLUGIN_PATH_ENV, Ran, RunOptions, adapter_spec, copy_tokenizer_files, fingerprint,
    plugin_paths, registry, write_resolved_config,
};
use crate::error::Result;

/// What a run did.
#[derive(Debug)]
pub enum RunReport {
    /// `dry_run`: the config as it would run (defaults and the plugin's normalisation filled in).
    DryRun(Box<RunConfig>),
    /// A token-weighted run.
    Sft(Box<crate::sft::SftReport>),
    /// A preference run.
    Preference(Box<crate::preference::PrefReport>),
}

/// Runs a resolved config: trains, exports to `<output dir>/final`, writes `summary.json`.
pub fn run(cfg: RunConfig, opts: &RunOptions, observer: &mut dyn Observer) -> Result<RunReport> {
    // The loss plugin is checked first: a typo in its name or parameters must not cost a model load.
    let registry = registry(&opts.plugin_dirs, &cfg.loss.plugins)?;
    let (loss_fn, params) = registry.build(&cfg.loss.name, &cfg.loss.params)?;
    // Data-parallel ranks first agree that they run one config; nothing else is exchanged before.
    let dist = opts.group.get();
    ytrainer_core::dist::check_same_config(dist, &fingerprint(&cfg))
        .map_err(ytrainer_core::trainer::TrainError::from)?;
    if dist.world_size() > 1 && !opts.dry_run && cfg.model.path.is_none() {
        // A preset model is made once, by rank 0, in the run directory the ranks share.
        if dist.rank() == 0 {
            let (out, train_file) = crate::common::output_and_train_file(&cfg, opts)?;
            crate::source::resolve_model_dir(&cfg, &out, &train_file, &mut |m| observer.notice(m))?;
        }
        dist.barrier()
            .map_err(ytrainer_core::trainer::TrainError::from)?;
    }
    match loss_fn {
        LossFn::Token(plugin) => Ok(
            match crate::sft::run_sft(cfg, plugin, &params, opts, observer)? {
                Ran::DryRun(cfg) => RunReport::DryRun(cfg),
                Ran::Trained(r) => RunReport::Sft(r),
            },
        ),
        LossFn::Pairwise(objective) => Ok(
            match crate::preference::run_preference(cfg, objective, &params, opts, observer)? {
                Ran::DryRun(cfg) => RunReport::DryRun(cfg),
                Ran::Trained(r) => RunReport::Preference(r),
            },
        ),
    }
}
