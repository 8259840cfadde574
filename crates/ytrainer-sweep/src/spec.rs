//! The sweep file and its expansion into trials.
//!
//! ```toml
//! name = "forgetting"
//! base = "base.toml"              # a run config (or an inline [base] table); paths relative to their file
//! mode = "grid"                   # or "one-at-a-time"
//! seeds = [1, 2, 3]               # repetitions (sets train.seed)
//! output = "../../runs/forgetting"
//! learn = ["data/learn_eval.jsonl"]   # domain sets, evaluated before and after every trial
//! retain = ["data/retain.txt"]        # general sets
//!
//! [axes]                          # independent lists multiply (grid)
//! loss = ["ce", "nlirg"]          # `loss` is short for `loss.name`
//! "train.learning_rate" = [1e-4, 3e-4]
//!
//! [[groups]]                      # keys of one group vary together (equal-length lists)
//! "adapter.r" = [8, 16]
//! "adapter.alpha" = [16, 32]
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use toml::{Table, Value};

/// Every key of a run config that holds a path (made absolute against the file that names them): the one list
/// both a run config (`ytrainer_recipes::config`) and a sweep file resolve, so a trial config written elsewhere
/// (`configs/`, a trial folder) names the same files. `loss.plugins` is a list of paths.
pub const PATH_KEYS: &[&str] = &[
    "model.path",
    "data.train",
    "data.eval",
    "data.sources",
    "adapter.init_from",
    "preference.reference",
    "loss.reference_model",
    "loss.plugins",
    "output.dir",
];

/// Rewrites a path value with `f`: a string, or each string of a list (`loss.plugins`), or the `path` of each
/// table of a list (`[[data.sources]]`).
pub fn map_path_value(v: &mut Value, f: &dyn Fn(&str) -> String) {
    match v {
        Value::String(s) => *s = f(s),
        Value::Array(list) => {
            for item in list {
                match item {
                    Value::String(s) => *s = f(s),
                    Value::Table(t) => {
                        if let Some(Value::String(s)) = t.get_mut("path") {
                            *s = f(s);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// The most trials one sweep may expand to (a year of 50-minute trials).
pub const MAX_TRIALS: usize = 10_000;

/// How axes combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every combination of every axis (groups count as one axis).
    Grid,
    /// The base config once, then each axis value alone with everything else at the base.
    OneAtATime,
}

/// Evaluation settings of the sweep's learn/retain sets.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOptions {
    /// Window length (tokens) raw text is cut into; also the longest instruction sample.
    pub window: usize,
    /// At most this many windows / samples per set (0 = all).
    pub max_samples: usize,
}

/// A parsed sweep file.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// Name (default: the file stem).
    pub name: String,
    /// The base run config, paths made absolute.
    pub base: Table,
    /// Axis combination mode.
    pub mode: Mode,
    /// Seeds (empty: the base config's seed, one trial per combination).
    pub seeds: Vec<i64>,
    /// Sweep directory.
    pub output: PathBuf,
    /// Domain eval sets.
    pub learn: Vec<PathBuf>,
    /// General eval sets.
    pub retain: Vec<PathBuf>,
    /// Eval settings.
    pub eval: EvalOptions,
    /// Dimensions: each a list of alternatives, each alternative a list of `(key, value)` assignments.
    pub dims: Vec<Vec<Vec<(String, Value)>>>,
}

/// One trial: a normal run with some keys overridden.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    /// Folder name, stable under re-expansion (derived from the overrides and seed).
    pub id: String,
    /// Label of the configuration without the seed (what results are grouped by).
    pub strategy: String,
    /// Seed, when the sweep has `seeds`.
    pub seed: Option<i64>,
    /// Overridden keys (dotted paths), seed excluded.
    pub overrides: Vec<(String, Value)>,
}

fn canonical_key(k: &str) -> Result<String> {
    let k = k.trim();
    if k == "loss" {
        return Ok("loss.name".into());
    }
    if k == "seed" || k == "train.seed" {
        bail!("axis `{k}`: use the top-level `seeds = [..]` for repetitions");
    }
    if k.split('.').count() < 2 || k.split('.').any(str::is_empty) {
        bail!(
            "axis `{k}`: axes are config keys written `section.key` (e.g. \"train.learning_rate\", \
             \"loss.params.x0\"); `loss` alone stands for `loss.name`"
        );
    }
    Ok(k.to_string())
}

/// Makes relative paths under [`PATH_KEYS`] absolute against `dir`.
pub fn absolutize(table: &mut Table, dir: &Path) {
    for key in PATH_KEYS {
        let (sec, k) = key.split_once('.').unwrap_or(("", key));
        if let Some(Value::Table(t)) = table.get_mut(sec)
            && let Some(v) = t.get_mut(k)
        {
            map_path_value(v, &|s| abs(dir, s).to_string_lossy().to_string());
        }
    }
}

fn abs(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    };
    // Lexical normalisation (the path may not exist yet).
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Sets `a.b.c = value` in a TOML table, creating tables on the way.
pub fn set_path(doc: &mut Table, path: &str, value: Value) -> Result<()> {
    let parts: Vec<&str> = path.split('.').collect();
    let mut cur = doc;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| anyhow!("`{path}`: `{p}` is not a table"))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// Reads `a.b.c` from a TOML table.
pub fn get_path<'a>(doc: &'a Table, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut cur = doc.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_table()?.get(p)?;
    }
    Some(cur)
}

const TOP_KEYS: &[&str] = &[
    "name", "base", "mode", "seeds", "output", "learn", "retain", "eval", "axes", "groups",
];

impl Sweep {
    /// Reads a sweep file.
    pub fn load(path: &Path) -> Result<Sweep> {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let dir = std::env::current_dir()
            .unwrap_or_default()
            .join(path.parent().unwrap_or(Path::new(".")));
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "sweep".into());
        Sweep::parse(&text, &dir, &stem).with_context(|| format!("{}", path.display()))
    }

    /// Parses sweep text; relative paths are relative to `dir`.
    pub fn parse(text: &str, dir: &Path, stem: &str) -> Result<Sweep> {
        let doc: Table = toml::from_str(text).map_err(|e| anyhow!("{e}"))?;
        for k in doc.keys() {
            if !TOP_KEYS.contains(&k.as_str()) {
                bail!(
                    "unknown key `{k}` in the sweep file; valid keys: {}",
                    TOP_KEYS.join(", ")
                );
            }
        }
        let name = match doc.get("name") {
            Some(Value::String(s)) => s.clone(),
            None => stem.to_string(),
            Some(_) => bail!("`name` must be a string"),
        };
        let base = match doc.get("base") {
            Some(Value::String(p)) => {
                let file = abs(dir, p);
                let t = fs::read_to_string(&file)
                    .with_context(|| format!("base config {}", file.display()))?;
                let mut table: Table = toml::from_str(&t)
                    .map_err(|e| anyhow!("base config {}: {e}", file.display()))?;
                absolutize(&mut table, file.parent().unwrap_or(dir));
                table
            }
            Some(Value::Table(t)) => {
                let mut t = t.clone();
                absolutize(&mut t, dir);
                t
            }
            None => bail!("the sweep file needs `base = \"run.toml\"` or a [base] table"),
            Some(_) => bail!("`base` must be a file name or a table"),
        };
        let mode = match doc.get("mode").map(|v| v.as_str()) {
            None | Some(Some("grid")) => Mode::Grid,
            Some(Some("one-at-a-time")) => Mode::OneAtATime,
            _ => bail!("`mode` must be \"grid\" or \"one-at-a-time\""),
        };
        let seeds = match doc.get("seeds") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_integer()
                        .ok_or_else(|| anyhow!("`seeds` must be a list of integers"))
                })
                .collect::<Result<Vec<_>>>()?,
            Some(_) => bail!("`seeds` must be a list of integers"),
        };
        let output = match doc.get("output") {
            Some(Value::String(s)) => abs(dir, s),
            None => abs(&std::env::current_dir().unwrap_or_default(), "runs").join(&name),
            Some(_) => bail!("`output` must be a path"),
        };
        let paths = |key: &str| -> Result<Vec<PathBuf>> {
            match doc.get(key) {
                None => Ok(Vec::new()),
                Some(Value::String(s)) => Ok(vec![abs(dir, s)]),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(|s| abs(dir, s))
                            .ok_or_else(|| anyhow!("`{key}` must be a list of file names"))
                    })
                    .collect(),
                Some(_) => bail!("`{key}` must be a list of file names"),
            }
        };
        let (learn, retain) = (paths("learn")?, paths("retain")?);
        let mut eval = EvalOptions {
            window: 256,
            max_samples: 0,
        };
        if let Some(v) = doc.get("eval") {
            let t = v
                .as_table()
                .ok_or_else(|| anyhow!("[eval] must be a table"))?;
            for (k, v) in t {
                let n = v
                    .as_integer()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| anyhow!("eval.{k} must be a non-negative integer"))?
                    as usize;
                match k.as_str() {
                    "window" if n >= 2 => eval.window = n,
                    "max_samples" => eval.max_samples = n,
                    _ => bail!("[eval] takes `window` (>= 2) and `max_samples`; got `{k}`"),
                }
            }
        }
        let value_path = |key: &str, mut v: Value| -> Value {
            if PATH_KEYS.contains(&key) {
                map_path_value(&mut v, &|s| abs(dir, s).to_string_lossy().to_string());
            }
            v
        };
        let mut dims = Vec::new();
        let mut seen = Vec::new();
        if let Some(v) = doc.get("axes") {
            let t = v
                .as_table()
                .ok_or_else(|| anyhow!("[axes] must be a table of lists"))?;
            for (k, v) in t {
                let key = canonical_key(k)?;
                let list = v
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| anyhow!("axis `{k}` must be a non-empty list of values"))?;
                if seen.contains(&key) {
                    bail!("axis `{key}` is given twice");
                }
                seen.push(key.clone());
                dims.push(
                    list.iter()
                        .map(|v| vec![(key.clone(), value_path(&key, v.clone()))])
                        .collect(),
                );
            }
        }
        if let Some(v) = doc.get("groups") {
            let groups = v
                .as_array()
                .ok_or_else(|| anyhow!("`groups` must be written [[groups]] tables"))?;
            for (gi, g) in groups.iter().enumerate() {
                let t = g
                    .as_table()
                    .ok_or_else(|| anyhow!("`groups` must be written [[groups]] tables"))?;
                let mut len = None;
                let mut cols = Vec::new();
                for (k, v) in t {
                    let key = canonical_key(k)?;
                    let list = v.as_array().filter(|a| !a.is_empty()).ok_or_else(|| {
                        anyhow!("group {}: `{k}` must be a non-empty list", gi + 1)
                    })?;
                    if *len.get_or_insert(list.len()) != list.len() {
                        bail!(
                            "group {}: the lists of a group vary together and must have equal lengths \
                             (`{k}` has {}, an earlier key {})",
                            gi + 1,
                            list.len(),
                            len.unwrap_or(0)
                        );
                    }
                    if seen.contains(&key) {
                        bail!("axis `{key}` is given twice");
                    }
                    seen.push(key.clone());
                    cols.push((key, list.clone()));
                }
                let n = len.ok_or_else(|| anyhow!("group {} is empty", gi + 1))?;
                dims.push(
                    (0..n)
                        .map(|i| {
                            cols.iter()
                                .map(|(k, l)| (k.clone(), value_path(k, l[i].clone())))
                                .collect()
                        })
                        .collect(),
                );
            }
        }
        // A grid multiplies: count before expanding, so a typo'd 100-value axis times four more is an error,
        // not a 10^10-trial allocation that aborts (issue 21 item 5).
        if mode == Mode::Grid {
            let lens: Vec<usize> = dims.iter().map(Vec::len).collect();
            let n = lens
                .iter()
                .chain(std::iter::once(&seeds.len().max(1)))
                .try_fold(1usize, |a, &l| a.checked_mul(l));
            if n.is_none_or(|n| n > MAX_TRIALS) {
                bail!(
                    "the grid has {} trials (axis lengths {lens:?} x {} seed(s)); ytrainer runs at most {MAX_TRIALS} \
                     trials per sweep: shorten the axes, use `mode = \"one-at-a-time\"`, or split the sweep",
                    n.map(|n| n.to_string())
                        .unwrap_or_else(|| "more than 2^64".into()),
                    seeds.len().max(1)
                );
            }
        }
        Ok(Sweep {
            name,
            base,
            mode,
            seeds,
            output,
            learn,
            retain,
            eval,
            dims,
        })
    }

    /// The trials, in run order (seeds innermost).
    pub fn trials(&self) -> Vec<Trial> {
        let combos: Vec<Vec<(String, Value)>> = match self.mode {
            Mode::Grid => {
                let mut acc: Vec<Vec<(String, Value)>> = vec![Vec::new()];
                for dim in &self.dims {
                    let mut next = Vec::new();
                    for a in &acc {
                        for alt in dim {
                            let mut c = a.clone();
                            c.extend(alt.iter().cloned());
                            next.push(c);
                        }
                    }
                    acc = next;
                }
                acc
            }
            Mode::OneAtATime => {
                let mut v = vec![Vec::new()];
                for dim in &self.dims {
                    for alt in dim {
                        let same_as_base = alt
                            .iter()
                            .all(|(k, val)| get_path(&self.base, k) == Some(val));
                        if !same_as_base {
                            v.push(alt.clone());
                        }
                    }
                }
                v
            }
        };
        let n_keys = self.dims.iter().map(|d| d[0].len()).sum::<usize>();
        let seeds: Vec<Option<i64>> = if self.seeds.is_empty() {
            vec![None]
        } else {
            self.seeds.iter().copied().map(Some).collect()
        };
        let mut out = Vec::new();
        for c in combos {
            let strategy = label(&c, n_keys);
            for s in &seeds {
                let mut id = slug(&strategy);
                if let Some(s) = s {
                    id.push_str(&format!("_seed{s}"));
                }
                out.push(Trial {
                    id,
                    strategy: strategy.clone(),
                    seed: *s,
                    overrides: c.clone(),
                });
            }
        }
        out
    }

    /// The run config of one trial: the base with the trial's overrides, its seed and its output folder.
    pub fn trial_config(&self, trial: &Trial, dir: &Path) -> Result<Table> {
        let mut t = self.base.clone();
        for (k, v) in &trial.overrides {
            set_path(&mut t, k, v.clone())?;
        }
        if let Some(s) = trial.seed {
            set_path(&mut t, "train.seed", Value::Integer(s))?;
        }
        set_path(
            &mut t,
            "output.dir",
            Value::String(dir.to_string_lossy().to_string()),
        )?;
        Ok(t)
    }
}

fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `nlirg` when the sweep varies one key, else `name=nlirg, learning_rate=0.0003`; `base` for no overrides.
fn label(c: &[(String, Value)], n_keys: usize) -> String {
    if c.is_empty() {
        return "base".into();
    }
    if n_keys == 1 {
        return render(&c[0].1);
    }
    c.iter()
        .map(|(k, v)| {
            let short = if k == "loss.name" {
                "loss"
            } else {
                k.rsplit('.').next().unwrap_or(k)
            };
            format!("{short}={}", render(v))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn slug(s: &str) -> String {
    let mut out = String::new();
    for ch in s.chars() {
        if ch.is_ascii_alphanumeric() || ch == '.' || ch == '-' {
            out.push(ch);
        } else if ch == '=' {
            out.push('-');
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    let out = out.trim_matches('_').to_string();
    if out.len() > 80 {
        // Keep it short but unique: a prefix and a hash of the whole label.
        let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        format!("{}_{h:016x}", &out[..60])
    } else if out.is_empty() {
        "trial".into()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(extra: &str) -> Sweep {
        let text = format!(
            "base = {{ model = {{ preset = \"tiny\" }}, data = {{ train = \"d/train.jsonl\" }}, \
             loss = {{ name = \"nlirg\" }}, train = {{ learning_rate = 0.001 }} }}\n{extra}"
        );
        Sweep::parse(&text, Path::new("/sw"), "s").unwrap()
    }

    fn ids(s: &Sweep) -> Vec<String> {
        s.trials().into_iter().map(|t| t.id).collect()
    }

    #[test]
    fn an_absurd_grid_is_refused_before_expanding() {
        let vals: Vec<String> = (1..=100).map(|i| i.to_string()).collect();
        let axis = |k: &str| format!("\"{k}\" = [{}]\n", vals.join(", "));
        let text = format!(
            "base = {{ model = {{ preset = \"tiny\" }}, data = {{ train = \"d/train.jsonl\" }} }}\nseeds = [1, 2]\n[axes]\n{}{}{}{}{}",
            axis("train.max_steps"),
            axis("train.warmup_steps"),
            axis("adapter.r"),
            axis("adapter.alpha"),
            axis("train.epochs")
        );
        let e = match Sweep::parse(&text, Path::new("/tmp"), "huge") {
            Ok(_) => panic!("an absurd grid was accepted"),
            Err(e) => e.to_string(),
        };
        assert_eq!(
            e,
            "the grid has 20000000000 trials (axis lengths [100, 100, 100, 100, 100] x 2 seed(s)); ytrainer runs at \
             most 10000 trials per sweep: shorten the axes, use `mode = \"one-at-a-time\"`, or split the sweep"
        );
    }

    #[test]
    fn grid_multiplies_axes_and_seeds() {
        let s = sweep(
            "seeds = [1, 2]\n[axes]\nloss = [\"ce\", \"nlirg\"]\n\"train.learning_rate\" = [0.001, 0.003, 0.01]\n",
        );
        let t = s.trials();
        assert_eq!(t.len(), 2 * 3 * 2);
        assert_eq!(t[0].id, "loss-ce_learning_rate-0.001_seed1");
        assert_eq!(t[1].id, "loss-ce_learning_rate-0.001_seed2");
        assert_eq!(t[0].strategy, "loss=ce, learning_rate=0.001");
        assert_eq!(t[0].strategy, t[1].strategy);
        let mut uniq = ids(&s);
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), 12);
        let cfg = s.trial_config(&t[11], Path::new("/out/x")).unwrap();
        assert_eq!(get_path(&cfg, "loss.name").unwrap().as_str(), Some("nlirg"));
        assert_eq!(
            get_path(&cfg, "train.learning_rate").unwrap().as_float(),
            Some(0.01)
        );
        assert_eq!(get_path(&cfg, "train.seed").unwrap().as_integer(), Some(2));
        assert_eq!(
            get_path(&cfg, "output.dir").unwrap().as_str(),
            Some("/out/x")
        );
        // base paths are absolute against the sweep file's folder
        assert_eq!(
            get_path(&cfg, "data.train").unwrap().as_str(),
            Some("/sw/d/train.jsonl")
        );
    }

    #[test]
    fn single_axis_labels_are_the_values() {
        let s = sweep("seeds = [7]\n[axes]\nloss = [\"ce\", \"nlirg\"]\n");
        let t = s.trials();
        assert_eq!(
            t.iter().map(|t| t.strategy.as_str()).collect::<Vec<_>>(),
            ["ce", "nlirg"]
        );
        assert_eq!(ids(&s), ["ce_seed7", "nlirg_seed7"]);
    }

    #[test]
    fn groups_vary_together() {
        let s = sweep(
            "[axes]\nloss = [\"ce\", \"nlirg\"]\n[[groups]]\n\"adapter.r\" = [8, 16]\n\"adapter.alpha\" = [16, 32]\n",
        );
        let t = s.trials();
        assert_eq!(t.len(), 4, "2 losses x 1 group of 2 (not 2 x 2 x 2)");
        for tr in &t {
            let r = tr.overrides.iter().find(|(k, _)| k == "adapter.r").unwrap();
            let a = tr
                .overrides
                .iter()
                .find(|(k, _)| k == "adapter.alpha")
                .unwrap();
            assert_eq!(a.1.as_integer().unwrap(), 2 * r.1.as_integer().unwrap());
        }
        assert!(t.iter().all(|t| t.seed.is_none()));
        let bad = Sweep::parse(
            "base = { }\n[[groups]]\n\"adapter.r\" = [8, 16]\n\"adapter.alpha\" = [16]\n",
            Path::new("/"),
            "s",
        );
        assert!(
            format!("{:#}", bad.unwrap_err()).contains("equal lengths"),
            "unequal group lists are rejected"
        );
    }

    #[test]
    fn one_at_a_time_varies_each_knob_from_the_base() {
        let s = sweep(
            "mode = \"one-at-a-time\"\nseeds = [1, 2]\n[axes]\nloss = [\"ce\", \"nlirg\"]\n\
             \"train.learning_rate\" = [0.001, 0.01]\n",
        );
        let t = s.trials();
        // base + ce (nlirg is the base's value) + lr 0.01 (0.001 is the base's) = 3 configs x 2 seeds
        let strategies: Vec<&str> = t.iter().map(|t| t.strategy.as_str()).collect();
        assert_eq!(
            strategies,
            [
                "base",
                "base",
                "loss=ce",
                "loss=ce",
                "learning_rate=0.01",
                "learning_rate=0.01"
            ]
        );
        assert!(t.iter().all(|t| t.overrides.len() <= 1));
    }

    #[test]
    fn no_axes_is_one_trial_per_seed() {
        let s = sweep("seeds = [1, 2, 3]\n");
        assert_eq!(ids(&s), ["base_seed1", "base_seed2", "base_seed3"]);
        let s = sweep("");
        assert_eq!(ids(&s), ["base"]);
    }

    #[test]
    fn bad_files_are_explained() {
        let err = |t: &str| format!("{:#}", Sweep::parse(t, Path::new("/"), "s").unwrap_err());
        assert!(err("base = {}\nsed = [1]\n").contains("unknown key `sed`"));
        assert!(err("base = {}\n[axes]\nseed = [1]\n").contains("seeds = [..]"));
        assert!(err("base = {}\n[axes]\nlearning_rate = [1]\n").contains("section.key"));
        assert!(err("base = {}\nmode = \"random\"\n").contains("one-at-a-time"));
        assert!(err("mode = \"grid\"\n").contains("base"));
    }
}
