//! Which files a request may reach: only those inside the folders given on the command line.
//!
//! A run is addressed by an id `N:rel/path` (root number, path relative to that root with `/` separators). An id
//! with an absolute path, `..`, `.`, an empty component, a backslash or a NUL is refused before the file system
//! is touched; what remains is resolved through symbolic links and must still lie inside the root's own
//! resolved path, so a link pointing out of the folder is refused as well. Files inside a run are opened the
//! same way ([`Root::read`]).

use std::path::{Component, Path, PathBuf};

use crate::{BoardError, Result};

/// A folder given on the command line.
#[derive(Debug, Clone)]
pub struct Root {
    /// As given (shown on the page).
    pub shown: PathBuf,
    /// Resolved (symbolic links followed): every path read must start with this.
    pub canon: PathBuf,
}

impl Root {
    /// Resolves a folder given on the command line.
    pub fn new(p: &Path) -> Result<Root> {
        let canon = p.canonicalize().map_err(|e| {
            BoardError::bad(format!(
                "RUNS_DIR {}: {e}; name an existing folder of runs (e.g. `runs`)",
                p.display()
            ))
        })?;
        if !canon.is_dir() {
            return Err(BoardError::bad(format!(
                "RUNS_DIR {}: not a folder; name the folder that holds the run folders",
                p.display()
            )));
        }
        Ok(Root {
            shown: p.to_path_buf(),
            canon,
        })
    }

    /// `path` resolved, if it lies inside this root; `Ok(None)` when it does not exist.
    pub fn contain(&self, path: &Path) -> Result<Option<PathBuf>> {
        let c = match path.canonicalize() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(BoardError::unusable(format!(
                    "cannot open {}: {e}",
                    path.display()
                )));
            }
        };
        if !c.starts_with(&self.canon) {
            return Err(BoardError::forbidden(format!(
                "{} leads outside {} (a symbolic link?): the board reads only inside the folders it was given",
                path.display(),
                self.shown.display()
            )));
        }
        Ok(Some(c))
    }

    /// The bytes of `dir/name` (`dir` already inside this root), `Ok(None)` when there is no such file.
    pub fn read(&self, dir: &Path, name: &str) -> Result<Option<Vec<u8>>> {
        let Some(p) = self.contain(&dir.join(name))? else {
            return Ok(None);
        };
        if !p.is_file() {
            return Ok(None);
        }
        std::fs::read(&p).map(Some).map_err(|e| {
            BoardError::unusable(format!("cannot read {}: {e}", dir.join(name).display()))
        })
    }
}

/// The id of the run folder `dir` found under root number `index`.
pub fn run_id(index: usize, root: &Root, dir: &Path) -> String {
    let rel = dir.strip_prefix(&root.canon).unwrap_or(Path::new(""));
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .collect();
    format!("{index}:{}", parts.join("/"))
}

/// Checks an id and returns its root and resolved folder. Refused: malformed ids (400), paths leading outside
/// the root (403); a folder that does not exist (any more) is 404.
pub fn resolve<'a>(roots: &'a [Root], id: &str) -> Result<(&'a Root, PathBuf)> {
    checked(roots, id, true)
}

/// [`resolve`] for any file or folder (a model, an adapter, a data file), with the same checks.
pub fn resolve_path<'a>(roots: &'a [Root], id: &str) -> Result<(&'a Root, PathBuf)> {
    checked(roots, id, false)
}

fn checked<'a>(roots: &'a [Root], id: &str, run: bool) -> Result<(&'a Root, PathBuf)> {
    let malformed = |why: &str| {
        BoardError::bad(format!(
            "id `{id}` refused: {why}; ids look like `0:my-run` (folder number, then a path inside it)"
        ))
    };
    let (n, rel) = id
        .split_once(':')
        .ok_or_else(|| malformed("no `:` after the folder number"))?;
    let index: usize = n
        .parse()
        .map_err(|_| malformed("the part before `:` is not a folder number"))?;
    let root = roots.get(index).ok_or_else(|| {
        malformed(&format!(
            "folder number {index} does not exist ({} given)",
            roots.len()
        ))
    })?;
    if rel.contains('\\') || rel.contains('\0') {
        return Err(malformed("backslashes and NUL are not allowed"));
    }
    if rel.starts_with('/') || Path::new(rel).is_absolute() {
        return Err(malformed("absolute paths are not allowed"));
    }
    let mut path = root.canon.clone();
    if !rel.is_empty() {
        for part in rel.split('/') {
            if part.is_empty() || part == "." || part == ".." {
                return Err(malformed(
                    "`..`, `.` and empty path components are not allowed",
                ));
            }
            let mut comps = Path::new(part).components();
            match (comps.next(), comps.next()) {
                (Some(Component::Normal(_)), None) => path.push(part),
                _ => return Err(malformed("each path component must be a plain name")),
            }
        }
    }
    match root.contain(&path)? {
        Some(p) if p.is_dir() || (!run && p.is_file()) => Ok((root, p)),
        _ if run => Err(BoardError::not_found(format!(
            "run `{id}` no longer exists: {} is gone (deleted or moved?); the runs list no longer shows it",
            root.shown.join(rel).display()
        ))),
        _ => Err(BoardError::not_found(format!(
            "`{id}`: {} does not exist",
            root.shown.join(rel).display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ytrainer-board-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn ids_stay_inside_the_root() {
        let base = tmp("paths");
        let root_dir = base.join("runs");
        std::fs::create_dir_all(root_dir.join("a/b")).unwrap();
        std::fs::create_dir_all(base.join("secret")).unwrap();
        std::os::unix::fs::symlink(base.join("secret"), root_dir.join("link")).unwrap();
        let roots = vec![Root::new(&root_dir).unwrap()];
        let (_, p) = resolve(&roots, "0:a/b").unwrap();
        assert_eq!(p, root_dir.canonicalize().unwrap().join("a/b"));
        assert_eq!(run_id(0, &roots[0], &p), "0:a/b");
        assert!(resolve(&roots, "0:").is_ok());
        for (id, status, needle) in [
            ("0:..", 400, "`..`"),
            ("0:a/../..", 400, "`..`"),
            ("0:a//b", 400, "empty path"),
            ("0:./a", 400, "`.`"),
            ("0:/etc", 400, "absolute"),
            ("0:a\\..\\..", 400, "backslash"),
            ("1:a", 400, "folder number 1 does not exist"),
            ("a", 400, "no `:`"),
            ("x:a", 400, "not a folder number"),
            ("0:link", 403, "leads outside"),
            ("0:gone", 404, "no longer exists"),
        ] {
            let e = resolve(&roots, id).unwrap_err();
            assert_eq!(e.status, status, "{id}: {e}");
            assert!(e.message.contains(needle), "{id}: {e}");
        }
        // A file inside a run that links outside is refused too.
        std::os::unix::fs::symlink("/etc/hostname", root_dir.join("a/metrics.jsonl")).unwrap();
        let (root, dir) = resolve(&roots, "0:a").unwrap();
        assert_eq!(root.read(&dir, "metrics.jsonl").unwrap_err().status, 403);
        let _ = std::fs::remove_dir_all(&base);
    }
}
