//! Loading: the YAML file (or the defaults), then `SIDECAR__SECTION__FIELD`
//! environment overrides, then validation; errors name the file or variable at fault.

use std::path::Path;

use serde_yaml_ng::Value;

use super::{Config, ConfigError, ENV_PREFIX};

impl Config {
    /// Reads `path` (or defaults when `None`), applies overrides from `env`, validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(path) => (
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?,
                path.display().to_string(),
            ),
            None => (String::new(), "defaults".to_string()),
        };
        Self::from_yaml(&text, &origin, env)
    }

    /// Parses YAML `text` (named `origin` in errors), applies `env` overrides, validates.
    pub fn from_yaml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut tree: Value = if text.trim().is_empty() {
            Value::Mapping(Default::default())
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
                origin: origin.to_string(),
                field: "(document)".to_string(),
                message: e.to_string(),
            })?
        };
        if tree.is_null() {
            tree = Value::Mapping(Default::default());
        }
        let mut overridden = Vec::new();
        for (var, value) in env {
            let Some(path) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
            let parsed: Value = serde_yaml_ng::from_str(&value).map_err(|e| ConfigError::Env {
                var: var.clone(),
                reason: e.to_string(),
            })?;
            set_path(&mut tree, &segments, parsed).map_err(|reason| ConfigError::Env {
                var: var.clone(),
                reason,
            })?;
            overridden.push((segments.join("."), var));
        }
        let config: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let field = e.path().to_string();
            let origin = overridden
                .iter()
                .find(|(path, _)| field.starts_with(path.as_str()))
                .map(|(_, var)| format!("environment variable {var}"))
                .unwrap_or_else(|| origin.to_string());
            ConfigError::Parse {
                origin,
                field,
                message: e.into_inner().to_string(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }
}

/// Sets `value` at `path` in `tree`, creating mappings on the way.
fn set_path(tree: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("names no field".into());
    };
    let mut node = tree;
    for segment in parents {
        let Value::Mapping(map) = node else {
            return Err(format!(
                "`{segment}` is inside a field that is not a section"
            ));
        };
        node = map
            .entry(Value::String(segment.clone()))
            .or_insert_with(|| Value::Mapping(Default::default()));
    }
    let Value::Mapping(map) = node else {
        return Err(format!("`{last}` is inside a field that is not a section"));
    };
    map.insert(Value::String(last.clone()), value);
    Ok(())
}
