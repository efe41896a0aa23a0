//! Configuration: TOML file plus `LOOPMUX__…` environment overrides, loaded
//! with the `config` crate, then checked by [`validate`].

mod raw;
mod validate;

use std::collections::HashMap;
use std::path::Path;

pub use raw::RawConfig;
pub use validate::{
    defaults, parse_endpoint, validate, AdminConfig, Config, EndpointAddr, ForwardConfig,
    HostHeader, HttpKeys, InterceptConfig, ListenerConfig, Mode, ModeConfig, OnConnectError,
    Problem, Protocol, RelayKeys, ServeConfig, UpstreamConfig,
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
    // The config crate reads `a[N]` in a variable's name as a list index and
    // grows a list to N (fuzzing found `[79999999999]` exhausting memory):
    // only plain key paths reach it.
    let prefix = format!("{ENV_PREFIX}__");
    let mut bad_env = Vec::new();
    let env: HashMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| match k.strip_prefix(&prefix) {
            None => false,
            Some(rest) => {
                let plain = !rest.is_empty()
                    && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !plain {
                    bad_env.push(Problem {
                        key: format!("environment variable {k}"),
                        reason: "is not a config key path (letters, digits, `__` between parts)"
                            .into(),
                    });
                }
                plain
            }
        })
        .collect();
    if !bad_env.is_empty() {
        return Err(ConfigError::Invalid(bad_env));
    }
    // The same trap in the file: the config crate reads a quoted key such
    // as `["a[1333333333333]"]` as a path with a list index (found by
    // fuzzing). Parse once to see the keys as written; only plain names
    // may go on.
    let table: toml::Table = toml
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
    let mut bad_keys = Vec::new();
    plain_keys(&toml::Value::Table(table), String::new(), &mut bad_keys);
    if !bad_keys.is_empty() {
        return Err(ConfigError::Invalid(bad_keys));
    }
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
        .map_err(|e| ConfigError::Parse(dotted(&e.to_string())))?;
    let mut unknown = Vec::new();
    let raw: RawConfig = serde_ignored::deserialize(built, |path| {
        unknown.push(Problem {
            key: key_path(&path),
            reason: "unknown key".into(),
        });
    })
    .map_err(|e| ConfigError::Parse(dotted(&e.to_string())))?;
    match validate(raw) {
        Ok(c) if unknown.is_empty() => Ok(c),
        Ok(_) => Err(ConfigError::Invalid(unknown)),
        Err(mut problems) => {
            unknown.append(&mut problems);
            Err(ConfigError::Invalid(unknown))
        }
    }
}

/// Endpoint names that do not resolve now: warnings for `check`, not
/// errors (`run` starts anyway and retries every `dns_refresh`, since the
/// name may only exist where the config is deployed).
pub fn unresolved_endpoints(cfg: &Config) -> Vec<Problem> {
    use std::net::ToSocketAddrs;
    let mut out = Vec::new();
    for (i, u) in cfg.upstreams.iter().enumerate() {
        for (j, ep) in u.endpoints.iter().enumerate() {
            if let EndpointAddr::Name { host, port } = ep {
                let reason = match (host.as_str(), *port).to_socket_addrs() {
                    Ok(addrs) if !addrs.as_slice().is_empty() => continue,
                    Ok(_) => "resolves to no address".to_string(),
                    Err(e) => {
                        format!("does not resolve now ({e}); loopmux will retry every dns_refresh")
                    }
                };
                out.push(Problem {
                    key: format!("upstream[{i}].endpoints[{j}]"),
                    reason: format!("`{ep}` {reason}"),
                });
            }
        }
    }
    out
}

/// Collects every key under `v` that is not a plain name (letters, digits,
/// `_`, `-`): no config key looks otherwise, and the loader would read
/// dots and brackets in one as a path.
fn plain_keys(v: &toml::Value, path: String, bad: &mut Vec<Problem>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let plain = !k.is_empty()
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                let here = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if plain {
                    plain_keys(v, here, bad);
                } else {
                    bad.push(Problem {
                        key: format!("{here:?}"),
                        reason: "is not a valid key name".into(),
                    });
                }
            }
        }
        toml::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                plain_keys(v, format!("{path}[{i}]"), bad);
            }
        }
        _ => {}
    }
}

/// `listener[0].bnd`, the way every other problem names its key.
fn key_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        Path::Map { parent, key } => {
            let p = key_path(parent);
            if p.is_empty() {
                key.clone()
            } else {
                format!("{p}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => key_path(parent),
    }
}

/// The config crate writes `upstream[0]max_connections`; put the dot back.
fn dotted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len() + 4);
    let mut prev = None;
    for ch in msg.chars() {
        if prev == Some(']') && (ch.is_ascii_alphabetic() || ch == '_') {
            out.push('.');
        }
        out.push(ch);
        prev = Some(ch);
    }
    out
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
