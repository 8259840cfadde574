//! `ytrainer plugins list`

use anyhow::Result;
use ytrainer_core::loss::Registry;

use crate::cli::Format;

/// Prints every discovered plugin with its kind, source, description and parameters.
pub fn list(format: Format) -> Result<()> {
    let registry = Registry::discover();
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
                let kind = match p.kind {
                    ytrainer_core::loss::PluginKind::Token => "token",
                    ytrainer_core::loss::PluginKind::Pairwise => "pairwise",
                };
                let src = match source {
                    ytrainer_core::loss::PluginSource::Builtin => "built-in".to_string(),
                };
                println!("{:<10} {kind:<9} {src:<9} {}", p.name, p.description);
                for s in p.params {
                    println!("    {:<8} = {:<8} {}", s.name, s.default, s.help);
                }
            }
        }
    }
    Ok(())
}
