//! Config loading and validation: arbitrary TOML text, then environment
//! overrides. Input: the TOML text, then `\0`-separated `KEY=VALUE` pairs;
//! short keys name the overrides that exist (`a`, `s`, `d`), any other key
//! is used under `LOOPMUX__`. Must never panic.

use std::collections::HashMap;

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let toml = parts.next().unwrap_or("");
    let mut env = HashMap::new();
    for kv in parts {
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        let key = match k {
            "a" => "LOOPMUX__ADMIN__BIND".to_string(),
            "s" => "LOOPMUX__EGRESS__SOURCE_ADDRESSES".to_string(),
            "d" => "LOOPMUX__PROCESS__DRAIN_TIMEOUT".to_string(),
            other => format!("LOOPMUX__{other}"),
        };
        env.insert(key, v.to_string());
    }
    if let Err(e) = loopmux::config::load_str(toml, env) {
        // Rendering the message is part of the contract (it names keys).
        let _ = e.to_string();
    }
}
