//! Why a configuration was refused.

use std::path::PathBuf;

/// Why a configuration was refused. Each variant names the file, field or variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed or a field has the wrong type or name.
    #[error("{origin}: field `{field}`: {message}")]
    Parse {
        /// The file, or the environment variable that set the field.
        origin: String,
        /// Dotted path of the field at fault.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A field parsed but its value is not allowed.
    #[error("field `{field}`: {reason}")]
    Invalid {
        /// Dotted path of the field at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A field inside a list is not allowed (the path names the element).
    #[error("field `{field}`: {reason}")]
    InvalidAt {
        /// Dotted path of the field at fault, with indices: `services[2].endpoints[0]`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An override variable names no valid path or holds unparsable YAML.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong with it.
        reason: String,
    },
}
