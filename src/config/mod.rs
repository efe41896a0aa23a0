//! Configuration: TOML file plus `LOOPMUX__…` environment overrides, loaded
//! with the `config` crate, then checked by [`validate`].

mod raw;
mod validate;

use std::collections::HashMap;
use std::path::Path;

pub use raw::RawConfig;
pub use validate::{
    defaults, parse_endpoint, validate, AdminConfig, Config, EndpointAddr, HostHeader,
    ListenerConfig, Mode, Problem, Protocol, UpstreamConfig,
};

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// Environment variables that override the file: `LOOPMUX__ADMIN__BIND`,
/// `LOOPMUX__EGRESS__SOURCE_ADDRESSES` (comma-separated), and so on.
pub const ENV_PREFIX: &str = "LOOPMUX";

/// Loads and validates a config from TOML text and an environment map.
///
/// Pure: tests pass both in; [`load_file`] passes the process environment.
///
/// # Errors
/// [`ConfigError::Parse`] for TOML or type errors (naming the key where the
/// parser knows it), [`ConfigError::Invalid`] for every rule that fails.
pub fn load_str(toml: &str, env: HashMap<String, String>) -> Result<Config, ConfigError> {
    let built = config::Config::builder()
        .add_source(config::File::from_str(toml, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("egress.source_addresses")
                .try_parsing(true)
                .source(Some(env.into_iter().collect())),
        )
        .build()
        .map_err(|e| ConfigError::Parse(e.to_string()))?;
    let raw: RawConfig = built
        .try_deserialize()
        .map_err(|e| ConfigError::Parse(e.to_string()))?;
    validate(raw).map_err(ConfigError::Invalid)
}

/// Loads `path` with overrides from the process environment.
///
/// # Errors
/// As [`load_str`], plus [`ConfigError::Read`] when the file cannot be read.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    load_str(&text, std::env::vars().collect())
}

#[cfg(test)]
mod tests;
