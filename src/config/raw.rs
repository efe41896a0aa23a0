//! The config file as written: strings and options, before any checking.
//!
//! Every struct denies unknown fields so that a typo such as
//! `max_conections` is an error naming the key, not a silent default.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub egress: RawEgress,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<RawListener>,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<RawUpstream>,
    pub serve: Option<RawServe>,
    pub process: Option<RawProcess>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProcess {
    pub drain_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub bind: Option<String>,
    pub allow_remote: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEgress {
    #[serde(default)]
    pub source_addresses: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: Option<String>,
    pub bind: Option<String>,
    pub mode: Option<String>,
    pub upstream: Option<String>,
    pub client_keepalive: Option<bool>,
    pub allow_remote: Option<bool>,
    pub target: Option<String>,
    pub allow: Option<Vec<String>>,
    pub header_timeout: Option<String>,
    pub max_clients: Option<usize>,
    pub max_header_bytes: Option<usize>,
    pub access_log: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub protocol: Option<String>,
    pub max_connections: Option<usize>,
    pub max_pending: Option<usize>,
    pub queue_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_lifetime: Option<String>,
    pub host_header: Option<String>,
    pub source_addresses: Option<Vec<String>>,
    pub dns_refresh: Option<String>,
    pub failure_backoff: Option<String>,
    pub tls: Option<RawUpstreamTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub server_name: Option<String>,
    pub ca_file: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServe {
    pub bind: Option<String>,
    pub allow_remote: Option<bool>,
    pub tls: Option<RawServeTls>,
    pub allow: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServeTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub client_ca: Option<String>,
}
