//! `ytrainer plugins list | describe`, and the one place the plugin registry of a command is built: built-ins
//! plus external libraries from `--plugin-dir`, `YTRAINER_PLUGIN_PATH` and `[loss] plugins`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::Result;
use ytrainer_core::loss::{LossFn, PluginKind, PluginSource, Registry};

use crate::cli::Format;

static CLI_DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();

/// Records the global `--plugin-dir` flags (called once by `main`).
pub fn set_cli_plugin_dirs(dirs: Vec<PathBuf>) {
    let _ = CLI_DIRS.set(dirs);
}

/// The global `--plugin-dir` flags (handed on to worker processes).
pub fn cli_plugin_dirs() -> Vec<PathBuf> {
    CLI_DIRS.get().cloned().unwrap_or_default()
}

/// The registry of a command: built-ins plus external plugins from every plugin path.
pub fn registry(config: &[PathBuf]) -> Result<Registry> {
    Ok(ytrainer_recipes::run::registry(&cli_plugin_dirs(), config)?)
}

fn kind_str(k: PluginKind) -> &'static str {
    match k {
        PluginKind::Token => "token",
        PluginKind::Pairwise => "pairwise",
    }
}

fn source_str(s: &PluginSource) -> String {
    match s {
        PluginSource::Builtin => "built-in".to_string(),
        PluginSource::External(p) => format!("external {}", p.display()),
    }
}

/// Prints every discovered plugin with its kind, source, description and parameters.
pub fn list(format: Format) -> Result<()> {
    let registry = registry(&[])?;
    match format {
        Format::Json => {
            let v: Vec<serde_json::Value> = registry
                .plugins()
                .map(|(p, source)| {
                    serde_json::json!({
                        "name": p.name,
                        "kind": p.kind,
                        "source": source,
                        "description": p.description,
                        "formula": p.formula,
                        "params": p.params.iter().map(|s| serde_json::json!({
                            "name": s.name, "default": s.default, "help": s.help
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Format::Text => {
            for (p, source) in registry.plugins() {
                let kind = kind_str(p.kind);
                let src = match source {
                    PluginSource::Builtin => "built-in",
                    PluginSource::External(_) => "external",
                };
                println!("{:<10} {kind:<9} {src:<9} {}", p.name, p.description);
                if let PluginSource::External(path) = source {
                    println!("    (from {})", path.display());
                }
                for s in p.params {
                    println!("    {:<8} = {:<8} {}", s.name, s.default, s.help);
                }
            }
        }
    }
    Ok(())
}

/// Prints one plugin in full: source, formula, parameters, what it needs and its default normalisation.
pub fn describe(name: &str, format: Format) -> Result<()> {
    let registry = registry(&[])?;
    let info = *registry.get(name)?;
    let source = registry.source(name)?.clone();
    // Needs and normalisation belong to an instance: build one with the defaults.
    let (needs, normalize) = match registry.build(name, &BTreeMap::new()) {
        Ok((LossFn::Token(p), _)) => (
            Some(if p.kl_anchor() > 0.0 {
                format!(
                    "{}, reference-model log-probabilities (KL anchor, weight {})",
                    p.needs().describe(),
                    p.kl_anchor()
                )
            } else {
                p.needs().describe()
            }),
            Some(p.default_normalize().as_str()),
        ),
        _ => (None, None),
    };
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "name": info.name, "kind": info.kind, "source": source, "description": info.description,
                "formula": info.formula, "needs": needs, "default_normalize": normalize,
                "params": info.params.iter().map(|s| serde_json::json!({
                    "name": s.name, "default": s.default, "help": s.help
                })).collect::<Vec<_>>(),
            }))?
        ),
        Format::Text => {
            println!(
                "{} ({} plugin, {})",
                info.name,
                kind_str(info.kind),
                source_str(&source)
            );
            println!("  {}", info.description);
            if !info.formula.is_empty() {
                println!("formula:    {}", info.formula);
            }
            if let Some(n) = needs {
                println!("needs:      {n}");
            }
            if let Some(n) = normalize {
                println!("normalize:  {n} (default; override with --normalize)");
            }
            if info.params.is_empty() {
                println!("parameters: none");
            } else {
                println!("parameters (--loss-param NAME=VALUE, [loss.params]):");
                for s in info.params {
                    println!("  {:<10} = {:<8} {}", s.name, s.default, s.help);
                }
            }
        }
    }
    Ok(())
}
