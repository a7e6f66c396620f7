//! Where a configuration comes from: TOML text or a file, `TETHER_` environment overrides,
//! errors located at the line of the offending key, and the keys a reload changed.

use std::path::Path;

use super::{Config, ConfigError, ENV_PREFIX};

impl Config {
    /// Parse and validate TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config
            .validate()
            .map_err(|e| locate(e, text, "the configuration"))?;
        Ok(config)
    }

    /// Read, parse and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read(path.display().to_string(), e))?;
        let config: Config = toml::from_str(&text)
            .map_err(|e| ConfigError::Parse(format!("{}: {e}", path.display())))?;
        config
            .validate()
            .map_err(|e| locate(e, &text, &path.display().to_string()))?;
        Ok(config)
    }

    /// Apply `TETHER_...` overrides from `vars` (normally `std::env::vars()`), then validate.
    ///
    /// Mapping: strip `TETHER_`, lower-case, and split on a double underscore: `__` separates
    /// the table from the key, single underscores stay part of the key. So
    /// `TETHER_SESSION__MAX_INFLIGHT=10` sets `session.max_inflight` and `TETHER_DATA_DIR` the
    /// top-level `data_dir`. A value is read as a TOML scalar (`10`, `true`, `"x"`); a value
    /// that is not one is taken as a bare string, so `TETHER_LOG__LEVEL=debug` works unquoted.
    /// A variable naming no key, or naming a table or array (`[[listeners]]`), is an error.
    /// Returns the names of the variables applied.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Vec<String>, ConfigError> {
        let mut vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        // Deterministic order, so an error always names the same variable.
        vars.sort();
        let mut applied = Vec::new();
        for (var, value) in vars {
            let err = |why: String| ConfigError::Env {
                var: var.clone(),
                why,
            };
            let path: Vec<String> = var[ENV_PREFIX.len()..]
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect();
            let mut table = toml::Table::try_from(&*self)
                .map_err(|e| err(format!("cannot represent the configuration: {e}")))?;
            // The defaults name every key (data_dir is optional, hence absent there).
            let defaults = toml::Table::try_from(Config::default())
                .map_err(|e| err(format!("cannot represent the configuration: {e}")))?;
            let known = match path.as_slice() {
                [key] => key == "data_dir" || defaults.get(key).is_some_and(is_scalar),
                [section, key] => defaults
                    .get(section)
                    .and_then(toml::Value::as_table)
                    .and_then(|t| t.get(key))
                    .is_some_and(is_scalar),
                _ => false,
            };
            if !known {
                return Err(err(format!(
                    "names no configuration key (expected {ENV_PREFIX}KEY for a top-level key or \
                     {ENV_PREFIX}TABLE__KEY, e.g. {ENV_PREFIX}SESSION__MAX_INFLIGHT)"
                )));
            }
            let parsed = parse_scalar(&value);
            match path.as_slice() {
                [key] => {
                    table.insert(key.clone(), parsed);
                }
                [section, key] => {
                    if let Some(t) = table.get_mut(section).and_then(toml::Value::as_table_mut) {
                        t.insert(key.clone(), parsed);
                    }
                }
                _ => {}
            }
            let next: Config = table
                .try_into()
                .map_err(|e: toml::de::Error| err(e.message().to_string()))?;
            *self = next;
            applied.push(var);
        }
        self.validate().map_err(|e| match e {
            ConfigError::Invalid { key, why, at } => {
                let from_env = applied.iter().find(|v| env_key(v) == key);
                ConfigError::Invalid {
                    at: from_env.map(|v| format!("from {v}")).or(at),
                    key,
                    why,
                }
            }
            other => other,
        })?;
        Ok(applied)
    }

    /// The dotted keys whose values differ between `self` and `other`, in key order.
    pub fn changed_keys(&self, other: &Config) -> Vec<String> {
        let (Ok(a), Ok(b)) = (toml::Table::try_from(self), toml::Table::try_from(other)) else {
            return vec!["(configuration)".to_string()];
        };
        let mut out = Vec::new();
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for k in keys {
            match (a.get(k), b.get(k)) {
                (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                    let inner: std::collections::BTreeSet<&String> =
                        x.keys().chain(y.keys()).collect();
                    for i in inner {
                        if x.get(i) != y.get(i) {
                            out.push(format!("{k}.{i}"));
                        }
                    }
                }
                (x, y) if x != y => out.push(k.clone()),
                _ => {}
            }
        }
        out
    }
}

fn is_scalar(v: &toml::Value) -> bool {
    !matches!(v, toml::Value::Table(_) | toml::Value::Array(_))
}

/// A TOML scalar from an environment variable's value; a bare word becomes a string.
fn parse_scalar(value: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => match t.remove("v") {
            Some(v) if is_scalar(&v) => v,
            _ => toml::Value::String(value.to_string()),
        },
        Err(_) => toml::Value::String(value.to_string()),
    }
}

/// The dotted key an environment variable sets (`TETHER_SESSION__MAX_INFLIGHT` ->
/// `session.max_inflight`).
fn env_key(var: &str) -> String {
    var.strip_prefix(ENV_PREFIX)
        .unwrap_or(var)
        .to_ascii_lowercase()
        .replace("__", ".")
}

/// Add the line of the offending key to a validation error, found by reading `text` the way
/// a person would: `[table]` and `[[array]]` headers, then `key = value` lines.
fn locate(e: ConfigError, text: &str, source: &str) -> ConfigError {
    match e {
        ConfigError::Invalid { key, why, at: None } => {
            let at = line_of(text, &key).map(|n| format!("line {n} of {source}"));
            ConfigError::Invalid { key, why, at }
        }
        other => other,
    }
}

/// The 1-based line where dotted `key` (`session.max_inflight`, `listeners[1].bind`) is set.
pub fn line_of(text: &str, key: &str) -> Option<usize> {
    let mut section = String::new();
    let mut arrays: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            let name = name.trim().to_string();
            let i = arrays.entry(name.clone()).or_insert(0);
            section = format!("{name}[{i}]");
            *i += 1;
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            section = name.trim().to_string();
        } else if let Some((k, _)) = line.split_once('=') {
            let k = k.trim().trim_matches('"');
            let full = if section.is_empty() {
                k.to_string()
            } else {
                format!("{section}.{k}")
            };
            if full == key {
                return Some(n + 1);
            }
        }
    }
    None
}
