//! Reading a TOML run config and applying overrides (`SECTION.KEY = value`, from command-line flags or a
//! sweep's axes).
//!
//! Overrides are applied to the TOML document *before* it is deserialised, so an override and the config key it
//! replaces go through exactly the same validation (unknown keys with a suggestion, types, ranges).

use std::path::Path;

use toml::{Table, Value};
use ytrainer_core::config::{RunConfig, fmt_num};
use ytrainer_core::loss::nearest;

use crate::RecipeError;
use crate::error::{Context, Result};
use crate::{bail, invalid};

/// Every valid key per section, for suggestions (kept in step with `ytrainer_core::config`; a test checks it).
pub const KEYS: &[(&str, &[&str])] = &[
    (
        "model",
        &[
            "path",
            "preset",
            "seed",
            "dequantize_base",
            "quantize_base",
            "base_model_id",
        ],
    ),
    (
        "adapter",
        &[
            "type",
            "r",
            "alpha",
            "dropout",
            "target_modules",
            "use_rslora",
            "use_dora",
            "modules_to_save",
            "init_from",
        ],
    ),
    (
        "data",
        &[
            "train",
            "eval",
            "eval_fraction",
            "training_type",
            "max_seq_len",
            "overlong",
            "train_on",
            "template_vars",
            "columns",
            "max_samples",
            "train_weight",
            "packing",
            "sources",
        ],
    ),
    (
        "loss",
        &[
            "name",
            "normalize",
            "params",
            "zone_borders",
            "plugins",
            "reference_model",
        ],
    ),
    (
        "train",
        &[
            "mode",
            "token_batch",
            "epochs",
            "max_steps",
            "learning_rate",
            "lr_scheduler",
            "warmup_steps",
            "warmup_ratio",
            "min_lr_ratio",
            "weight_decay",
            "adam_beta1",
            "adam_beta2",
            "adam_epsilon",
            "max_grad_norm",
            "tokens_per_step",
            "micro_batch_tokens",
            "max_micro_batch_size",
            "batch_size",
            "grad_accum",
            "seed",
            "shuffle",
            "device",
            "precision",
            "gradient_checkpointing",
            "memory_budget",
            "max_skipped_steps",
            "early_stopping_patience",
            "early_stopping_threshold",
            "loraplus_lr_ratio",
            "neftune_noise_alpha",
        ],
    ),
    (
        "eval",
        &[
            "every_steps",
            "max_samples",
            "metric_for_best_model",
            "greater_is_better",
        ],
    ),
    (
        "output",
        &[
            "dir",
            "save_every_steps",
            "save_total_limit",
            "load_best_model_at_end",
        ],
    ),
    (
        "preference",
        &[
            "reference",
            "precompute_reference",
            "sft_weight",
            "average_log_prob",
            "pairs_per_step",
            "micro_pairs",
        ],
    ),
];

/// Checks every key of the document against [`KEYS`], naming the file, line and nearest valid key.
fn check_keys(doc: &Table, file: &str, text: &str) -> Result<()> {
    let sections: Vec<&str> = KEYS.iter().map(|(s, _)| *s).collect();
    // Keys from `--set` have no line to point at.
    let at = |key: &str| {
        if text.is_empty() {
            file.to_string()
        } else {
            format!("{file}:{}", line_of(text, key))
        }
    };
    for (section, value) in doc {
        let Some((_, keys)) = KEYS.iter().find(|(s, _)| s == section) else {
            let hint = nearest(section, &sections)
                .map(|s| format!(" (did you mean `[{s}]`?)"))
                .unwrap_or_default();
            bail!(
                "{}: unknown section `[{section}]`{hint}; valid sections: {}",
                at(section),
                sections.join(", ")
            );
        };
        let Value::Table(t) = value else {
            bail!(
                "{}: `{section}` must be a table (`[{section}]`), not a value",
                at(section)
            );
        };
        for key in t.keys() {
            if !keys.contains(&key.as_str()) {
                let hint = nearest(key, keys)
                    .map(|k| format!(" (did you mean `{k}`?)"))
                    .unwrap_or_default();
                bail!(
                    "{}: unknown key `{key}` in [{section}]{hint}; valid keys in [{section}]: {}",
                    at(key),
                    keys.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// 1-based line of the first line that defines `key` (best effort, for error messages).
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.starts_with(key) && l[key.len()..].trim_start().starts_with('=')
                || l.trim() == format!("[{key}]")
        })
        .map(|i| i + 1)
        .unwrap_or(1)
}

pub fn set_path(doc: &mut Table, path: &str, value: Value) -> Result<()> {
    let parts: Vec<&str> = path.split('.').collect();
    if parts.len() < 2 {
        bail!("`--set {path}=...`: expected SECTION.KEY, e.g. `train.weight_decay`");
    }
    let mut table = doc;
    for p in &parts[..parts.len() - 1] {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| invalid!("`{path}`: `{p}` is not a table"))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// Parses `VALUE` as a TOML value, falling back to a string (so `--set data.train_on=everything` works).
pub fn parse_value(raw: &str) -> Value {
    let doc = format!("v = {raw}");
    match doc.parse::<Table>() {
        Ok(mut t) => t.remove("v").unwrap_or(Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    }
}

/// A path as a TOML string value.
pub fn path_value(p: &Path) -> Value {
    Value::String(p.to_string_lossy().to_string())
}

/// One `SECTION.KEY = value` override.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// Dotted key, e.g. `train.learning_rate` or `loss.params.x0`.
    pub key: String,
    /// The value, typed as it would be in the file.
    pub value: Value,
}

impl Override {
    /// An override of `key` with `value`.
    pub fn new(key: impl Into<String>, value: Value) -> Self {
        Override {
            key: key.into(),
            value,
        }
    }
}

/// Loads the config file (if any), applies `overrides` in order, validates, and returns the resolved config.
/// Relative paths in the file are relative to the file; relative paths in overrides stay as given (relative
/// to the working directory).
pub fn resolve(file: Option<&Path>, overrides: &[Override]) -> Result<RunConfig> {
    let (mut doc, file, text) = match file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config file {}", p.display()))?;
            let doc: Table = text.parse().map_err(|e: toml::de::Error| {
                let line = e
                    .span()
                    .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
                    .unwrap_or(1);
                invalid!("{}:{line}: invalid TOML: {}", p.display(), e.message())
            })?;
            // Relative paths in a config file are relative to the file, so configs can be run from anywhere.
            let base = p.parent().map(Path::to_path_buf).unwrap_or_default();
            let mut doc = doc;
            rebase_paths(&mut doc, &base);
            (doc, p.display().to_string(), text)
        }
        None => (Table::new(), "<command line>".to_string(), String::new()),
    };
    check_keys(&doc, &file, &text)?;
    for o in overrides {
        set_path(&mut doc, &o.key, o.value.clone())?;
    }
    check_keys(&doc, "--set", "")?;
    let cfg: RunConfig = serde_path_to_error::deserialize(Value::Table(doc)).map_err(
        |e: serde_path_to_error::Error<toml::de::Error>| {
            let path = e.path().to_string();
            let message = e
                .inner()
                .message()
                .replace("\n", " ")
                .trim_end()
                .trim_end_matches('.')
                .to_string();
            type_error(&file, &text, overrides, &path, &message)
        },
    )?;
    validate(&cfg)?;
    Ok(cfg)
}

/// A value of the wrong type, named by where it came from (the `--set` that gave it, or the file and line),
/// its key, and what the key takes: `sft.toml:7: [train] max_steps: invalid value: integer `-1`, expected
/// usize (a whole number >= 0)`.
fn type_error(
    file: &str,
    text: &str,
    overrides: &[Override],
    path: &str,
    message: &str,
) -> RecipeError {
    let (section, key) = path.split_once('.').unwrap_or((path, ""));
    let key_name = if key.is_empty() {
        format!("[{section}]")
    } else {
        format!("[{section}] {key}")
    };
    let origin = match overrides.iter().rev().find(|o| o.key == path) {
        Some(o) => format!("--set {}={}", o.key, o.value),
        None => match key_line(text, section, key) {
            Some(line) => format!("{file}:{line}"),
            None => file.to_string(),
        },
    };
    let takes = [
        ("expected usize", "a whole number >= 0"),
        ("expected u64", "a whole number >= 0"),
        ("expected u32", "a whole number >= 0"),
        ("expected i64", "a whole number"),
        ("expected f64", "a number"),
        ("expected f32", "a number"),
        ("expected a boolean", "true or false"),
        ("expected a string", "a quoted string"),
    ]
    .iter()
    .find(|(k, _)| message.contains(k))
    .map(|(_, t)| format!(" ({t})"))
    .unwrap_or_default();
    invalid!("{origin}: {key_name}: {message}{takes}")
}

/// The 1-based line of `key = ...` inside `[section]` of a TOML text, if it is written there plainly.
fn key_line(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            current = h.trim().to_string();
            continue;
        }
        if current == section
            && t.split_once('=')
                .is_some_and(|(k, _)| k.trim().trim_matches('"') == key)
        {
            return Some(i + 1);
        }
    }
    None
}

/// Makes the relative paths of a config file absolute against its folder: every key of
/// [`ytrainer_sweep::spec::PATH_KEYS`], the list sweeps resolve too.
fn rebase_paths(doc: &mut Table, base: &Path) {
    for key in ytrainer_sweep::spec::PATH_KEYS {
        let (section, key) = key.split_once('.').expect("section.key");
        if let Some(v) = doc
            .get_mut(section)
            .and_then(Value::as_table_mut)
            .and_then(|t| t.get_mut(key))
        {
            ytrainer_sweep::spec::map_path_value(v, &|s| {
                let p = Path::new(s);
                if p.is_relative() {
                    normalize(&base.join(p)).to_string_lossy().to_string()
                } else {
                    s.to_string()
                }
            });
        }
    }
}

/// Lexically removes `.` and `dir/..` so paths in messages read naturally (`runs/x`, not `examples/q/../../runs/x`).
fn normalize(p: &Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    if out.is_empty() {
        return std::path::PathBuf::from(".");
    }
    out.iter().collect()
}

fn validate(cfg: &RunConfig) -> Result<()> {
    if cfg.model.path.is_none() && cfg.model.preset.is_none() {
        bail!(
            "no model given: pass `--model DIR` (a Hugging Face model directory) or `--preset tiny`, \
             or set `[model] path` / `preset` in the config"
        );
    }
    if let Some(p) = &cfg.model.preset
        && cfg.model.path.is_none()
        && p != "tiny"
    {
        bail!("[model] preset = \"{p}\": unknown preset; the only preset is `tiny`");
    }
    if cfg.data.train.is_none() {
        bail!("no training data given: pass `--data FILE` or set `[data] train` in the config");
    }
    check_ranges(cfg)?;
    let t = &cfg.train;
    if t.mode == ytrainer_core::config::TrainMode::Windowed && t.token_batch == 0 {
        bail!("[train] token_batch = 0: windowed mode needs a window of at least 1 target token");
    }
    if t.tokens_per_step == 0 || t.micro_batch_tokens == 0 || t.max_micro_batch_size == 0 {
        bail!("[train] tokens_per_step, micro_batch_tokens and max_micro_batch_size must be >= 1");
    }
    if cfg.adapter.kind == ytrainer_core::config::AdapterKind::Lora && cfg.adapter.r == 0 {
        bail!("[adapter] r = 0: the LoRA rank must be >= 1 (or use `type = \"full\"`)");
    }
    check_best_model(cfg)?;
    check_mix(cfg)?;
    let a = cfg.train.neftune_noise_alpha;
    if !(a >= 0.0 && a.is_finite()) {
        bail!(
            "[train] neftune_noise_alpha = {}: must be >= 0 and finite",
            fmt_num(a)
        );
    }
    if let Some(r) = cfg.train.loraplus_lr_ratio {
        if !(r > 0.0 && r.is_finite()) {
            bail!(
                "[train] loraplus_lr_ratio = {}: must be > 0 and finite",
                fmt_num(r)
            );
        }
        if cfg.adapter.kind == ytrainer_core::config::AdapterKind::Full {
            bail!(
                "[train] loraplus_lr_ratio = {} sets the learning rate of LoRA's B matrices, but [adapter] type = \
                 \"full\" has none: remove it or train a LoRA adapter",
                fmt_num(r)
            );
        }
    }
    check_lora_variants(cfg)?;
    if cfg.data.max_seq_len < 2 {
        bail!(
            "[data] max_seq_len = {}: must be >= 2",
            cfg.data.max_seq_len
        );
    }
    Ok(())
}

/// The training mix: weights > 0, sources with a path, column maps naming fields ytrainer reads.
fn check_mix(cfg: &RunConfig) -> Result<()> {
    let d = &cfg.data;
    let columns = |at: &str, map: &std::collections::BTreeMap<String, String>| -> Result<()> {
        for (ours, theirs) in map {
            if !ytrainer_data::RECORD_FIELDS.contains(&ours.as_str()) {
                let hint = nearest(ours, ytrainer_data::RECORD_FIELDS)
                    .map(|k| format!(" (did you mean `{k}`?)"))
                    .unwrap_or_default();
                bail!(
                    "{at} columns: `{ours} = \"{theirs}\"`: `{ours}` is not a record field ytrainer reads{hint}; \
                     the keys are ytrainer's names ({}) and the values the file's",
                    ytrainer_data::RECORD_FIELDS.join(", ")
                );
            }
        }
        Ok(())
    };
    columns("[data]", &d.columns)?;
    let weight = |at: &str, w: f64| -> Result<()> {
        if !(w > 0.0 && w.is_finite()) {
            bail!("{at} = {}: must be > 0 and finite", fmt_num(w));
        }
        Ok(())
    };
    weight("[data] train_weight", d.train_weight)?;
    for (i, s) in d.sources.iter().enumerate() {
        let at = format!("[[data.sources]] #{}", i + 1);
        if s.path.as_os_str().is_empty() {
            bail!("{at} has no `path`: name the training file it adds");
        }
        weight(&format!("{at} ({}) weight", s.path.display()), s.weight)?;
        columns(&format!("{at} ({})", s.path.display()), &s.columns)?;
    }
    Ok(())
}

/// DoRA and `modules_to_save` belong to a LoRA adapter; `modules_to_save` names only the embeddings and the head
/// (the model crate checks the same list again when it builds the adapter; here the mistake shows at `--dry-run`).
fn check_lora_variants(cfg: &RunConfig) -> Result<()> {
    let a = &cfg.adapter;
    if a.kind == ytrainer_core::config::AdapterKind::Full {
        if a.use_dora {
            bail!(
                "[adapter] use_dora = true is a LoRA variant, but [adapter] type = \"full\" trains every weight \
                 directly: remove it or train a LoRA adapter"
            );
        }
        if !a.modules_to_save.is_empty() {
            bail!(
                "[adapter] modules_to_save is a LoRA variant, but [adapter] type = \"full\" trains every weight \
                 already: remove it or train a LoRA adapter"
            );
        }
    }
    for name in &a.modules_to_save {
        let last = name.rsplit('.').next().unwrap_or(name);
        if !ytrainer_models::decoder::MODULES_TO_SAVE.contains(&last) {
            bail!(
                "[adapter] modules_to_save: {name:?} cannot be trained beside LoRA; the accepted modules are \
                 \"embed_tokens\" and \"lm_head\" (projections are adapted through `target_modules`)"
            );
        }
    }
    Ok(())
}

/// Early stopping and the best model compare evaluations made during training: they need periodic ones.
fn check_best_model(cfg: &RunConfig) -> Result<()> {
    let (t, e) = (&cfg.train, &cfg.eval);
    let th = t.early_stopping_threshold;
    if !(th >= 0.0 && th.is_finite()) {
        bail!(
            "[train] early_stopping_threshold = {}: must be >= 0 and finite",
            fmt_num(th)
        );
    }
    if e.metric_for_best_model.trim().is_empty() {
        bail!(
            "[eval] metric_for_best_model is empty: name an eval.jsonl field such as \"eval_loss\" (the default)"
        );
    }
    if e.every_steps == 0 {
        if t.early_stopping_patience > 0 {
            bail!(
                "[train] early_stopping_patience = {} needs evaluations during training: set [eval] every_steps \
                 (`--eval-every N`) to a number of steps > 0",
                t.early_stopping_patience
            );
        }
        if cfg.output.load_best_model_at_end {
            bail!(
                "[output] load_best_model_at_end = true needs evaluations during training: set [eval] every_steps \
                 (`--eval-every N`) to a number of steps > 0 (with only the final evaluation the best model is \
                 the last one)"
            );
        }
    }
    Ok(())
}

/// The allowed range of a numeric key, checked and named in the message.
#[derive(Clone, Copy)]
enum Range {
    /// `> 0` and finite.
    Positive,
    /// `>= 0` and finite.
    NonNegative,
    /// `[0, hi]`.
    Closed(f64),
    /// `[0, 1)`.
    UnitOpen,
}

impl Range {
    fn contains(self, x: f64) -> bool {
        match self {
            Range::Positive => x > 0.0 && x.is_finite(),
            Range::NonNegative => x >= 0.0 && x.is_finite(),
            Range::Closed(hi) => (0.0..=hi).contains(&x),
            Range::UnitOpen => (0.0..1.0).contains(&x),
        }
    }
    fn describe(self) -> String {
        match self {
            Range::Positive => "must be > 0 and finite".into(),
            Range::NonNegative => "must be >= 0 and finite".into(),
            Range::Closed(hi) => format!("must be in [0, {}]", fmt_num(hi)),
            Range::UnitOpen => "must be in [0, 1)".into(),
        }
    }
}

/// Every numeric key's range: `[section] key = value: must be ...`.
fn check_ranges(cfg: &RunConfig) -> Result<()> {
    let (t, a, p) = (&cfg.train, &cfg.adapter, &cfg.preference);
    let floats: [(&str, &str, f64, Range, &str); 12] = [
        (
            "train",
            "learning_rate",
            t.learning_rate,
            Range::Positive,
            "",
        ),
        (
            "train",
            "min_lr_ratio",
            t.min_lr_ratio,
            Range::Closed(1.0),
            "",
        ),
        (
            "train",
            "warmup_ratio",
            t.warmup_ratio,
            Range::Closed(1.0),
            "",
        ),
        // Decoupled decay shrinks each weight by learning_rate * weight_decay per step; beyond 10 it only
        // destroys the model.
        (
            "train",
            "weight_decay",
            t.weight_decay,
            Range::Closed(10.0),
            "",
        ),
        ("train", "adam_beta1", t.adam_beta1, Range::UnitOpen, ""),
        ("train", "adam_beta2", t.adam_beta2, Range::UnitOpen, ""),
        ("train", "adam_epsilon", t.adam_epsilon, Range::Positive, ""),
        (
            "train",
            "max_grad_norm",
            t.max_grad_norm,
            Range::NonNegative,
            " (0 = no clipping)",
        ),
        ("adapter", "alpha", a.alpha, Range::Positive, ""),
        ("adapter", "dropout", a.dropout, Range::UnitOpen, ""),
        (
            "data",
            "eval_fraction",
            cfg.data.eval_fraction,
            Range::UnitOpen,
            "",
        ),
        (
            "preference",
            "sft_weight",
            p.sft_weight,
            Range::NonNegative,
            "",
        ),
    ];
    for (section, key, v, range, note) in floats {
        if !range.contains(v) {
            bail!(
                "[{section}] {key} = {}: {}{note}",
                fmt_num(v),
                range.describe()
            );
        }
    }
    for (key, v) in [
        ("pairs_per_step", p.pairs_per_step),
        ("micro_pairs", p.micro_pairs),
    ] {
        if v == 0 {
            bail!("[preference] {key} = 0: must be >= 1");
        }
    }
    for (k, v) in &cfg.loss.params {
        if !v.is_finite() {
            bail!(
                "[loss.params] {k} = {}: must be a finite number",
                fmt_num(*v)
            );
        }
    }
    let z = cfg.loss.zone_borders;
    if !(z.iter().all(|x| x.is_finite()) && z[0] < z[1] && z[1] < z[2]) {
        bail!(
            "[loss] zone_borders = [{}, {}, {}]: must be three finite, increasing losses",
            fmt_num(z[0]),
            fmt_num(z[1]),
            fmt_num(z[2])
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempFile(std::path::PathBuf);
    impl TempFile {
        fn new(text: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let d = std::env::temp_dir().join(format!(
                "ytrainer-cfg-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&d).unwrap();
            let p = d.join("c.toml");
            std::fs::write(&p, text).unwrap();
            TempFile(p)
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
        }
    }

    #[test]
    fn unknown_key_suggests_nearest() {
        let f = TempFile::new(
            "[model]\npreset = \"tiny\"\n[data]\ntrain = \"x.jsonl\"\n[train]\nlerning_rate = 1e-3\n",
        );
        let e = resolve(Some(&f.0), &[]).unwrap_err().to_string();
        assert!(e.ends_with(":6: unknown key `lerning_rate` in [train] (did you mean `learning_rate`?); valid keys in [train]: mode, token_batch, epochs, max_steps, learning_rate, lr_scheduler, warmup_steps, warmup_ratio, min_lr_ratio, weight_decay, adam_beta1, adam_beta2, adam_epsilon, max_grad_norm, tokens_per_step, micro_batch_tokens, max_micro_batch_size, batch_size, grad_accum, seed, shuffle, device, precision, gradient_checkpointing, memory_budget, max_skipped_steps, early_stopping_patience, early_stopping_threshold, loraplus_lr_ratio, neftune_noise_alpha"), "{e}");
    }

    #[test]
    fn unknown_section_suggests_nearest() {
        let f = TempFile::new("[trian]\nepochs = 1\n");
        let e = resolve(Some(&f.0), &[]).unwrap_err().to_string();
        assert!(
            e.contains(":1: unknown section `[trian]` (did you mean `[train]`?)"),
            "{e}"
        );
    }

    #[test]
    fn overrides_win_and_file_paths_are_relative_to_the_file() {
        let f = TempFile::new(
            "[model]\npreset = \"tiny\"\n[data]\ntrain = \"x.jsonl\"\n[train]\nlearning_rate = 1e-3\nmax_steps = 5\n",
        );
        let c = resolve(
            Some(&f.0),
            &[
                Override::new("train.learning_rate", Value::Float(5e-4)),
                Override::new("train.weight_decay", parse_value("0.1")),
                Override::new("data.train_on", parse_value("everything")),
            ],
        )
        .unwrap();
        assert_eq!(c.train.learning_rate, 5e-4);
        assert_eq!(c.train.max_steps, 5);
        assert_eq!(c.train.weight_decay, 0.1);
        assert_eq!(c.data.train_on, ytrainer_core::config::TrainOn::Everything);
        assert!(c.data.train.unwrap().starts_with(f.0.parent().unwrap()));
    }

    #[test]
    fn override_with_unknown_key_is_rejected() {
        let e = resolve(
            None,
            &[
                Override::new("model.path", parse_value("m")),
                Override::new("data.train", parse_value("d")),
                Override::new("train.wieght_decay", parse_value("0.1")),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("unknown key `wieght_decay` in [train] (did you mean `weight_decay`?)"),
            "{e}"
        );
    }

    #[test]
    fn keys_table_matches_config_structs() {
        // Serialising a config with every optional key set lists every field; KEYS must list the same ones.
        let mut c = RunConfig::default();
        c.model.dequantize_base = true;
        c.model.quantize_base = Some("nf4".into());
        c.loss.plugins = vec!["p".into()];
        c.loss.reference_model = Some("r".into());
        c.train.early_stopping_patience = 1;
        c.train.early_stopping_threshold = 0.1;
        c.train.loraplus_lr_ratio = Some(16.0);
        c.train.neftune_noise_alpha = 5.0;
        c.eval.greater_is_better = Some(true);
        c.output.load_best_model_at_end = true;
        c.data.packing = Some(true);
        c.data.max_samples = 1;
        c.data.train_weight = 2.0;
        c.data.columns.insert("a".into(), "b".into());
        c.data.sources.push(Default::default());
        let v = toml::Value::try_from(c).unwrap();
        for (section, keys) in KEYS {
            let t = v.get(section).and_then(|t| t.as_table()).unwrap();
            for k in t.keys() {
                assert!(keys.contains(&k.as_str()), "KEYS lacks {section}.{k}");
            }
        }
    }

    #[test]
    fn bad_value_type_is_reported() {
        let f = TempFile::new(
            "[model]\npreset = \"tiny\"\n[data]\ntrain = \"x\"\n[train]\nepochs = \"two\"\n",
        );
        let e = resolve(Some(&f.0), &[]).unwrap_err().to_string();
        assert!(
            e.ends_with(":6: [train] epochs: invalid type: string \"two\", expected usize (a whole number >= 0)"),
            "{e}"
        );
    }

    /// Early stopping and the best model need evaluations during training; the metric's name and direction
    /// follow transformers (`loss` = `eval_loss`, larger is better unless the name ends in `loss`).
    #[test]
    fn best_model_settings_are_checked_and_resolved() {
        let base = [
            Override::new("model.preset", parse_value("tiny")),
            Override::new("data.train", parse_value("d.jsonl")),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut o = base.to_vec();
            o.extend(extra.iter().map(|(k, v)| Override::new(*k, parse_value(v))));
            resolve(None, &o)
        };
        let e = with(&[("train.early_stopping_patience", "3")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "[train] early_stopping_patience = 3 needs evaluations during training: set [eval] every_steps \
             (`--eval-every N`) to a number of steps > 0"
        );
        let e = with(&[("output.load_best_model_at_end", "true")]).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "[output] load_best_model_at_end = true needs evaluations during training"
            ),
            "{e}"
        );
        let e = with(&[
            ("eval.every_steps", "5"),
            ("train.early_stopping_threshold", "-0.5"),
        ])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "[train] early_stopping_threshold = -0.5: must be >= 0 and finite"
        );
        let c = with(&[
            ("eval.every_steps", "5"),
            ("train.early_stopping_patience", "2"),
        ])
        .unwrap();
        assert_eq!(
            (c.eval.best_metric_key(), c.eval.best_is_greater()),
            ("eval_loss".to_string(), false)
        );
        let c = with(&[("eval.metric_for_best_model", "token_accuracy")]).unwrap();
        assert_eq!(
            (c.eval.best_metric_key(), c.eval.best_is_greater()),
            ("eval_token_accuracy".to_string(), true)
        );
        let c = with(&[
            ("eval.metric_for_best_model", "eval_perplexity"),
            ("eval.greater_is_better", "false"),
        ])
        .unwrap();
        assert!(!c.eval.best_is_greater());
    }

    /// The mix's settings are checked where they are written: weights, a source without a path, a column map
    /// key that is no record field (with the nearest one).
    #[test]
    fn mix_settings_are_checked() {
        let f = TempFile::new(
            "[model]\npreset = \"tiny\"\n[data]\ntrain = \"a.jsonl\"\ncolumns = { instruction = \"task\" }\n\
             [[data.sources]]\npath = \"b.csv\"\nweight = 2.5\nmax_samples = 10\n\
             [[data.sources]]\npath = \"c.json\"\ncolumns = { anwser = \"reply\" }\n",
        );
        let e = resolve(Some(&f.0), &[]).unwrap_err().to_string();
        let dir = f.0.parent().unwrap();
        assert_eq!(
            e,
            format!(
                "[[data.sources]] #2 ({}) columns: `anwser = \"reply\"`: `anwser` is not a record field ytrainer \
                 reads (did you mean `answer`?); the keys are ytrainer's names ({}) and the values the file's",
                dir.join("c.json").display(),
                ytrainer_data::RECORD_FIELDS.join(", ")
            )
        );
        let c = resolve(
            Some(&f.0),
            &[Override::new(
                "data.sources",
                parse_value("[{ path = \"b.csv\", weight = 2.5, max_samples = 10 }]"),
            )],
        )
        .unwrap();
        // Paths in the file are relative to it; an override's stay as given.
        assert_eq!(c.data.sources[0].path, std::path::PathBuf::from("b.csv"));
        assert_eq!(
            (c.data.sources[0].weight, c.data.sources[0].max_samples),
            (2.5, 10)
        );
        let e = resolve(
            Some(&f.0),
            &[Override::new("data.train_weight", parse_value("0"))],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "[data] train_weight = 0: must be > 0 and finite");
        let e = resolve(
            Some(&f.0),
            &[Override::new(
                "data.sources",
                parse_value("[{ weight = 2.0 }]"),
            )],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "[[data.sources]] #1 has no `path`: name the training file it adds"
        );
    }

    #[test]
    fn dora_and_modules_to_save_are_checked() {
        let base = [
            Override::new("model.preset", parse_value("tiny")),
            Override::new("data.train", parse_value("d.jsonl")),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut o = base.to_vec();
            o.extend(extra.iter().map(|(k, v)| Override::new(*k, parse_value(v))));
            resolve(None, &o)
        };
        let c = with(&[
            ("adapter.use_dora", "true"),
            (
                "adapter.modules_to_save",
                r#"["embed_tokens", "model.lm_head"]"#,
            ),
        ])
        .unwrap();
        assert!(c.adapter.use_dora);
        assert_eq!(c.adapter.modules_to_save, ["embed_tokens", "model.lm_head"]);
        assert_eq!(
            with(&[("adapter.modules_to_save", r#"["norm"]"#)])
                .unwrap_err()
                .to_string(),
            "[adapter] modules_to_save: \"norm\" cannot be trained beside LoRA; the accepted modules are \
             \"embed_tokens\" and \"lm_head\" (projections are adapted through `target_modules`)"
        );
        assert_eq!(
            with(&[("adapter.use_dora", "true"), ("adapter.type", "full")])
                .unwrap_err()
                .to_string(),
            "[adapter] use_dora = true is a LoRA variant, but [adapter] type = \"full\" trains every weight \
             directly: remove it or train a LoRA adapter"
        );
        assert!(
            with(&[
                ("adapter.modules_to_save", r#"["lm_head"]"#),
                ("adapter.type", "full")
            ])
            .unwrap_err()
            .to_string()
            .starts_with("[adapter] modules_to_save is a LoRA variant")
        );
    }

    #[test]
    fn lora_plus_and_neftune_are_checked() {
        let base = [
            Override::new("model.preset", parse_value("tiny")),
            Override::new("data.train", parse_value("d.jsonl")),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut o = base.to_vec();
            o.extend(extra.iter().map(|(k, v)| Override::new(*k, parse_value(v))));
            resolve(None, &o)
        };
        let c = with(&[
            ("train.loraplus_lr_ratio", "16"),
            ("train.neftune_noise_alpha", "5"),
        ])
        .unwrap();
        assert_eq!(
            (c.train.loraplus_lr_ratio, c.train.neftune_noise_alpha),
            (Some(16.0), 5.0)
        );
        assert_eq!(
            with(&[("train.loraplus_lr_ratio", "0")])
                .unwrap_err()
                .to_string(),
            "[train] loraplus_lr_ratio = 0: must be > 0 and finite"
        );
        assert_eq!(
            with(&[("train.loraplus_lr_ratio", "16"), ("adapter.type", "full")])
                .unwrap_err()
                .to_string(),
            "[train] loraplus_lr_ratio = 16 sets the learning rate of LoRA's B matrices, but [adapter] type = \
             \"full\" has none: remove it or train a LoRA adapter"
        );
        assert_eq!(
            with(&[("train.neftune_noise_alpha", "-1")])
                .unwrap_err()
                .to_string(),
            "[train] neftune_noise_alpha = -1: must be >= 0 and finite"
        );
    }
}
