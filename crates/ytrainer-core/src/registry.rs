//! The registry of loss plugins: every built-in linked into the binary (registered with `inventory::submit!`)
//! and every external library loaded from the plugin paths, in one namespace. It sits above the contract
//! ([`crate::loss`]) and the loader of external plugins ([`crate::external`]); `crate::loss` re-exports it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::external::{self, ExternalLib};
use crate::loss::{LossFn, LossPluginInfo, Params, PluginError};

inventory::collect!(LossPluginInfo);

/// Where a registered plugin came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "path", rename_all = "lowercase")]
pub enum PluginSource {
    /// Compiled into the binary and registered through `inventory`.
    Builtin,
    /// Loaded from a shared library (the path it was loaded from).
    External(PathBuf),
}

impl fmt::Display for PluginSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginSource::Builtin => f.write_str("built-in"),
            PluginSource::External(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Clone)]
struct Entry {
    info: LossPluginInfo,
    source: PluginSource,
    external: Option<Arc<ExternalLib>>,
}

/// The plugins discovered at startup: built-ins and external libraries in one namespace.
#[derive(Clone)]
pub struct Registry {
    plugins: Vec<Entry>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.plugins.iter().map(|e| (e.info.name, &e.source)))
            .finish()
    }
}

impl Registry {
    /// Collects every built-in plugin linked into this binary.
    pub fn discover() -> Self {
        let mut plugins: Vec<_> = inventory::iter::<LossPluginInfo>
            .into_iter()
            .map(|p| Entry {
                info: *p,
                source: PluginSource::Builtin,
                external: None,
            })
            .collect();
        plugins.sort_by_key(|e| e.info.name);
        Registry { plugins }
    }

    /// The built-ins plus external plugins from `paths`: each a shared library, or a directory whose
    /// `*.so` / `*.dylib` / `*.dll` files are all loaded (in name order). A path given twice is loaded once;
    /// a name defined twice is a [`PluginError::Clash`] naming both sources.
    pub fn discover_with(paths: &[PathBuf]) -> Result<Self, PluginError> {
        let mut r = Registry::discover();
        for file in external::library_files(paths)? {
            let (info, lib) = external::load(&file)?;
            r.add(Entry {
                info,
                source: PluginSource::External(file),
                external: Some(lib),
            })?;
        }
        Ok(r)
    }

    fn add(&mut self, e: Entry) -> Result<(), PluginError> {
        if let Some(old) = self.plugins.iter().find(|o| o.info.name == e.info.name) {
            return Err(PluginError::Clash {
                name: e.info.name.to_string(),
                first: old.source.to_string(),
                second: e.source.to_string(),
            });
        }
        self.plugins.push(e);
        self.plugins.sort_by_key(|e| e.info.name);
        Ok(())
    }

    /// All plugins, sorted by name.
    pub fn plugins(&self) -> impl Iterator<Item = (&LossPluginInfo, &PluginSource)> {
        self.plugins.iter().map(|e| (&e.info, &e.source))
    }

    fn entry(&self, name: &str) -> Result<&Entry, PluginError> {
        self.plugins
            .iter()
            .find(|e| e.info.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.plugins.iter().map(|e| e.info.name).collect();
                PluginError::Unknown {
                    name: name.to_string(),
                    hint: did_you_mean(name, &names),
                    available: names.join(", "),
                }
            })
    }

    /// Looks a plugin up by name.
    pub fn get(&self, name: &str) -> Result<&LossPluginInfo, PluginError> {
        self.entry(name).map(|e| &e.info)
    }

    /// Where a plugin came from.
    pub fn source(&self, name: &str) -> Result<&PluginSource, PluginError> {
        self.entry(name).map(|e| &e.source)
    }

    /// Validates `given` against the plugin's declared parameters (filling defaults) and builds it.
    pub fn build(
        &self,
        name: &str,
        given: &BTreeMap<String, f64>,
    ) -> Result<(LossFn, Params), PluginError> {
        let e = self.entry(name)?;
        let params = resolve_params(&e.info, given)?;
        let f = match &e.external {
            Some(lib) => external::instantiate(lib, &params)?,
            None => (e.info.build)(&params)?,
        };
        Ok((f, params))
    }
}

/// Fills defaults and rejects undeclared keys.
pub fn resolve_params(
    info: &LossPluginInfo,
    given: &BTreeMap<String, f64>,
) -> Result<Params, PluginError> {
    let names: Vec<&str> = info.params.iter().map(|p| p.name).collect();
    for (k, v) in given {
        if !names.contains(&k.as_str()) {
            return Err(PluginError::UnknownParam {
                plugin: info.name.to_string(),
                param: k.clone(),
                hint: did_you_mean(k, &names),
                known: if names.is_empty() {
                    "(none)".to_string()
                } else {
                    names.join(", ")
                },
            });
        }
        if !v.is_finite() {
            return Err(PluginError::InvalidParam {
                plugin: info.name.to_string(),
                param: k.clone(),
                value: *v,
                reason: "must be a finite number".to_string(),
            });
        }
    }
    let map = info
        .params
        .iter()
        .map(|p| {
            (
                p.name.to_string(),
                given.get(p.name).copied().unwrap_or(p.default),
            )
        })
        .collect();
    Ok(Params::from_map(map))
}

/// ` (did you mean `x`?)` for the closest candidate, else empty.
pub fn did_you_mean(given: &str, candidates: &[&str]) -> String {
    nearest(given, candidates)
        .map(|c| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

/// The closest candidate: smallest edit distance, accepted when it is at most a third of the name's length
/// (at least 1), or when the names are very similar by Jaro-Winkler (long names with a few typos).
pub fn nearest<'a>(given: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| {
            (
                strsim::levenshtein(given, c),
                strsim::jaro_winkler(given, c),
                *c,
            )
        })
        .filter(|(d, jw, c)| *d <= (c.len().max(given.len()) / 3).max(1) || *jw >= 0.9)
        .min_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)))
        .map(|(_, _, c)| c)
}
