//! Sweeps: folders with a `trials/` folder of trial runs, each finished one holding `trial.json`
//! (`ytrainer_sweep::TrialResult`). Per trial: domain loss before / after and gain, general loss before / after
//! and forgetting, and the id of its run folder (for the click from the scatter to the run); per strategy the
//! table of `results.md` (`ytrainer_sweep::aggregate`).

use std::path::Path;

use serde_json::{Value, json};
use ytrainer_sweep::{TrialResult, aggregate};

use crate::paths::{Root, run_id};
use crate::runs::walk;

const MAX_DEPTH: usize = 3;

fn sweep_of(index: usize, root: &Root, dir: &Path) -> Value {
    let trials_dir = dir.join("trials");
    let mut names: Vec<_> = std::fs::read_dir(&trials_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    names.sort();
    let mut results = Vec::new();
    let mut trials = Vec::new();
    let mut warnings = Vec::new();
    for t in names {
        let id = run_id(index, root, &t);
        let name = t
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let bytes = match root.read(&t, "trial.json") {
            Ok(b) => b,
            Err(e) => {
                warnings.push(format!("trial {name}: {}", e.message));
                continue;
            }
        };
        let Some(bytes) = bytes else {
            trials.push(json!({"id": name, "run": id, "status": "unfinished"}));
            continue;
        };
        match serde_json::from_slice::<TrialResult>(&bytes) {
            Ok(r) => {
                trials.push(json!({
                    "id": r.id, "run": id, "status": "finished", "strategy": r.strategy, "seed": r.seed,
                    "overrides": r.overrides,
                    "domain_before": r.domain_before(), "domain_after": r.domain_after(), "gain": r.gain(),
                    "general_before": r.general_before(), "general_after": r.general_after(),
                    "forgetting": r.forgetting(), "steps": r.evals.steps, "seconds": r.evals.seconds,
                }));
                results.push(r);
            }
            Err(e) => warnings.push(format!(
                "{}: not a trial result ({e}); the trial is left out",
                trials_dir.join(&name).join("trial.json").display()
            )),
        }
    }
    json!({
        "id": run_id(index, root, dir),
        "name": dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        "path": dir.display().to_string(),
        "trials": trials,
        "strategies": aggregate(&results),
        "warnings": warnings,
    })
}

/// Every sweep under the roots.
pub fn list(roots: &[Root]) -> Value {
    let mut out = Vec::new();
    for (i, root) in roots.iter().enumerate() {
        walk(&root.canon, MAX_DEPTH, &mut |dir| {
            if dir.join("trials").is_dir() {
                out.push(sweep_of(i, root, dir));
                return false;
            }
            true
        });
    }
    Value::Array(out)
}
