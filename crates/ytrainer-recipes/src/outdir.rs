//! Directories a command writes: a run directory is claimed before anything is written to it, and exported
//! model directories are written beside their target and renamed into place. The rule: never delete or
//! overwrite what this run did not write. A non-empty directory that is not this run's is refused unless the
//! user asks for `--overwrite`, and then it is cleared completely first.

use std::fs;
use std::path::{Path, PathBuf};

use crate::common::RunOptions;
use crate::error::{Context, Result};
use crate::{bail, invalid};

/// The file that marks a run directory as ytrainer's, with the fingerprint of the settings it was written with.
pub const RUN_MARKER: &str = "ytrainer-run.json";

/// Names in `dir` (sorted), without the paths in `own`; empty when `dir` does not exist.
fn entries(dir: &Path, own: &[PathBuf]) -> Result<Vec<String>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let own: Vec<PathBuf> = own
        .iter()
        .filter_map(|p| std::path::absolute(p).ok())
        .collect();
    let mut names = Vec::new();
    for e in
        fs::read_dir(dir).with_context(|| format!("cannot read directory {}", dir.display()))?
    {
        let e = e.with_context(|| format!("cannot read directory {}", dir.display()))?;
        let p = std::path::absolute(e.path()).unwrap_or(e.path());
        if !own.contains(&p) {
            names.push(e.file_name().to_string_lossy().to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// `` `a`, `b`, `c` `` with at most five names and "and N more".
fn name_list(names: &[String]) -> String {
    let mut s: Vec<String> = names.iter().take(5).map(|n| format!("`{n}`")).collect();
    if names.len() > 5 {
        s.push(format!("and {} more", names.len() - 5));
    }
    s.join(", ")
}

fn remove(path: &Path) -> Result<()> {
    let r = if path.is_dir() && !path.is_symlink() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    r.with_context(|| format!("cannot remove {}", path.display()))
}

/// The fingerprint recorded in `dir`'s run marker, when `dir` is a ytrainer run directory.
fn marker_fingerprint(dir: &Path) -> Option<String> {
    let text = fs::read_to_string(dir.join(RUN_MARKER)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    if v.get("writer")?.as_str()? != ytrainer_core::checkpoint::WRITER {
        return None;
    }
    Some(v.get("fingerprint")?.as_str()?.to_string())
}

/// Makes `out` this run's directory before anything is written to it. Accepted: a missing or empty directory;
/// with `--overwrite` anything (cleared completely first); a ytrainer run directory with the same settings
/// when resuming, or when its earlier attempt stopped before writing a checkpoint. Everything else is refused
/// without touching a file.
pub(crate) fn claim_run_dir(out: &Path, fingerprint: &str, opts: &RunOptions) -> Result<()> {
    // A directory holding nothing but a run marker belongs to an attempt that stopped before writing anything
    // else (a setting refused after the claim): it counts as empty.
    let names: Vec<String> = entries(out, &opts.own_files)?
        .into_iter()
        .filter(|n| n != RUN_MARKER)
        .collect();
    let refuse = |what: String| {
        invalid!(
            "output directory {d} {what}; nothing in it was changed: pass `--overwrite` to clear it completely \
             and start again, `--resume {d}` to continue a ytrainer run with the same settings, or choose \
             another `--output-dir`",
            d = out.display()
        )
    };
    if !names.is_empty() {
        if opts.overwrite {
            if let Some(r) = &opts.resume
                && let (Ok(r), Ok(o)) = (std::path::absolute(r), std::path::absolute(out))
                && r.starts_with(&o)
            {
                bail!(
                    "--overwrite would delete the checkpoint that --resume {} names (it lies inside the output \
                     directory {}); drop --overwrite to continue that run, or resume into another --output-dir",
                    r.display(),
                    out.display()
                );
            }
            for n in &names {
                remove(&out.join(n))?;
            }
        } else {
            match marker_fingerprint(out) {
                None => {
                    return Err(refuse(format!(
                        "is not empty and was not written by ytrainer (it holds {})",
                        name_list(&names)
                    )));
                }
                Some(old) if old != fingerprint => {
                    let diff = ytrainer_core::trainer::config_diff(&old, fingerprint);
                    return Err(refuse(format!(
                        "holds a ytrainer run with other settings ({})",
                        diff.join(", ")
                    )));
                }
                Some(_) => {
                    let mut results: Vec<String> = ytrainer_core::checkpoint::list(out)
                        .iter()
                        .map(|(step, _)| format!("checkpoint-{step}"))
                        .collect();
                    if out.join("final").exists() {
                        results.push("final".to_string());
                    }
                    if opts.resume.is_none() && !results.is_empty() {
                        return Err(refuse(format!(
                            "holds a ytrainer run with the same settings and its results ({})",
                            name_list(&results)
                        )));
                    }
                }
            }
        }
    }
    fs::create_dir_all(out)
        .with_context(|| format!("cannot create output directory {}", out.display()))?;
    let marker = out.join(RUN_MARKER);
    let json = serde_json::json!({
        "writer": ytrainer_core::checkpoint::WRITER, "fingerprint": fingerprint,
    });
    fs::write(&marker, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("cannot write {}", marker.display()))
}

/// Refuses to replace a non-empty `target` (named by the flag `flag`, e.g. `--out`) unless `overwrite`: called
/// before the work starts, so a refusal costs nothing and changes nothing.
pub fn check_replaceable(target: &Path, overwrite: bool, flag: &str) -> Result<()> {
    if target.exists() && !target.is_dir() {
        bail!(
            "{flag} {}: a file is in the way; pass a directory path",
            target.display()
        );
    }
    let names = entries(target, &[])?;
    if !names.is_empty() && !overwrite {
        bail!(
            "{flag} {}: the directory is not empty (it holds {}); nothing was changed: pass `--overwrite` to \
             replace it completely, or choose another {flag}",
            target.display(),
            name_list(&names)
        );
    }
    Ok(())
}

/// An empty staging directory beside `target` (`.NAME.tmp`), to be moved into place by [`commit_dir`].
pub fn staging_dir(target: &Path) -> Result<PathBuf> {
    let tmp = sibling(target, "tmp");
    if tmp.exists() {
        remove(&tmp)?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    Ok(tmp)
}

fn sibling(target: &Path, suffix: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    target
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!(".{name}.{suffix}"))
}

/// Replaces `target` by the staged directory `tmp` as a whole: whatever `target` held before is gone, so no
/// stale file (an old `model.safetensors` beside new shards, an old adapter beside a full model) survives.
pub fn commit_dir(tmp: &Path, target: &Path) -> Result<()> {
    let old = sibling(target, "old");
    if old.exists() {
        remove(&old)?;
    }
    if target.exists() {
        fs::rename(target, &old)
            .with_context(|| format!("cannot move {} aside", target.display()))?;
    }
    fs::rename(tmp, target).with_context(|| {
        format!(
            "cannot move {} into place as {}",
            tmp.display(),
            target.display()
        )
    })?;
    if old.exists() {
        remove(&old)?;
    }
    Ok(())
}

/// `files` (paths inside `tmp`) as paths inside `target`.
pub fn rebase_files(files: Vec<PathBuf>, tmp: &Path, target: &Path) -> Vec<PathBuf> {
    files
        .into_iter()
        .map(|f| match f.strip_prefix(tmp) {
            Ok(rel) => target.join(rel),
            Err(_) => f,
        })
        .collect()
}
