//! Records the commit the binary was built from (`YTRAINER_COMMIT`), so every run's `summary.json` and
//! `ytrainer --version` say which code produced them: results that span sessions or machines stay traceable.
//! Outside a git checkout (a source tarball, a registry build) it is `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=YTRAINER_COMMIT={commit}");
    // Rebuilt when HEAD moves: the worktree's HEAD (a branch switch) and the branch's ref (a new commit), loose or
    // packed. Only existing files are named: a missing one would make cargo rerun this on every build.
    let mut watch = Vec::new();
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        watch.push(format!("{dir}/HEAD"));
    }
    if let (Some(common), Some(branch)) = (
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
        git(&["symbolic-ref", "-q", "HEAD"]),
    ) {
        watch.push(format!("{common}/{branch}"));
        watch.push(format!("{common}/packed-refs"));
    }
    for path in watch {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
