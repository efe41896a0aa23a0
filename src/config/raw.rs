//! The config file as written, before any checking.
//!
//! Every leaf is a [`Field`]: it accepts a value of any type and keeps what
//! it found, so that `validate` (which knows the key's path) can say
//! `listener[0].client_keepalive: expected true or false, found the string
//! "no"` instead of converting it silently, and can report every bad key in
//! one run. Unknown keys are collected by the loader (all of them, with
//! their paths), so the structs do not deny them.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A key's value as written: absent, of the right type, or of another type
/// (described for the error message).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Field<T> {
    #[default]
    Missing,
    Given(T),
    Wrong {
        expected: &'static str,
        found: String,
    },
}

/// What a value of any type looked like, for the conversion to `T`.
pub enum Any {
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    List(Vec<Any>),
    Table,
}

impl Any {
    fn describe(&self) -> String {
        match self {
            Any::Bool(b) => format!("the boolean {b}"),
            Any::Int(i) => format!("the integer {i}"),
            Any::Float(f) => format!("the number {f}"),
            Any::Str(s) => format!("the string {s:?}"),
            Any::List(_) => "a list".into(),
            Any::Table => "a table".into(),
        }
    }
}

/// Types a [`Field`] can hold; the conversion is strict (no "yes" → true,
/// no "8" → 8).
pub trait FieldType: Sized {
    const EXPECTED: &'static str;
    /// What a list of these is called in an error.
    const LIST: &'static str = "a list";
    fn from_any(v: Any) -> Result<Self, Any>;
}

impl FieldType for bool {
    const EXPECTED: &'static str = "true or false";
    fn from_any(v: Any) -> Result<Self, Any> {
        match v {
            Any::Bool(b) => Ok(b),
            other => Err(other),
        }
    }
}

impl FieldType for usize {
    const EXPECTED: &'static str = "a whole number";
    const LIST: &'static str = "a list of whole numbers";
    fn from_any(v: Any) -> Result<Self, Any> {
        match v {
            Any::Int(i) => usize::try_from(i).map_err(|_| Any::Int(i)),
            other => Err(other),
        }
    }
}

impl FieldType for String {
    const EXPECTED: &'static str = "a string";
    const LIST: &'static str = "a list of strings";
    fn from_any(v: Any) -> Result<Self, Any> {
        match v {
            Any::Str(s) => Ok(s),
            other => Err(other),
        }
    }
}

impl<T: FieldType> FieldType for Vec<T> {
    const EXPECTED: &'static str = T::LIST;
    fn from_any(v: Any) -> Result<Self, Any> {
        match v {
            Any::List(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    out.push(T::from_any(item).map_err(|other| Any::List(vec![other]))?);
                }
                Ok(out)
            }
            other => Err(other),
        }
    }
}

struct AnyVisitor;

impl<'de> Visitor<'de> for AnyVisitor {
    type Value = Any;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Any, E> {
        Ok(Any::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Any, E> {
        Ok(Any::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Any, E> {
        Ok(Any::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Any, E> {
        Ok(Any::Int(v))
    }
    fn visit_u128<E>(self, v: u128) -> Result<Any, E> {
        Ok(i128::try_from(v).map_or(Any::Float(v as f64), Any::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Any, E> {
        Ok(Any::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Any, E> {
        Ok(Any::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Any, E> {
        Ok(Any::Str(v))
    }
    fn visit_none<E>(self) -> Result<Any, E> {
        Ok(Any::Table)
    }
    fn visit_unit<E>(self) -> Result<Any, E> {
        Ok(Any::Table)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Any, D::Error> {
        d.deserialize_any(AnyVisitor)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Any, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(AnySeed)? {
            items.push(v);
        }
        Ok(Any::List(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Any, A::Error> {
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        Ok(Any::Table)
    }
}

struct AnySeed;

impl<'de> de::DeserializeSeed<'de> for AnySeed {
    type Value = Any;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Any, D::Error> {
        d.deserialize_any(AnyVisitor)
    }
}

impl<'de, T: FieldType> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let any = d.deserialize_any(AnyVisitor)?;
        Ok(match T::from_any(any) {
            Ok(v) => Field::Given(v),
            Err(found) => Field::Wrong {
                expected: T::EXPECTED,
                found: found.describe(),
            },
        })
    }
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct RawConfig {
    pub admin: Option<RawAdmin>,
    pub egress: RawEgress,
    #[serde(rename = "listener")]
    pub listeners: Vec<RawListener>,
    #[serde(rename = "upstream")]
    pub upstreams: Vec<RawUpstream>,
    pub serve: Option<RawServe>,
    pub process: Option<RawProcess>,
    /// Pool settings for the origins of forward listeners: an upstream
    /// without name, endpoints or Host (each request names its origin).
    pub forward_defaults: Option<RawUpstream>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct RawProcess {
    pub drain_timeout: Field<String>,
    pub threads: Field<usize>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct RawAdmin {
    pub bind: Field<String>,
    pub allow_remote: Field<bool>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct RawEgress {
    pub source_addresses: Field<Vec<String>>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct RawListener {
    pub name: Field<String>,
    pub bind: Field<String>,
    pub mode: Field<String>,
    pub upstream: Field<String>,
    pub client_keepalive: Field<bool>,
    pub allow_remote: Field<bool>,
    pub target: Field<String>,
    pub allow: Field<Vec<String>>,
    pub header_timeout: Field<String>,
    pub max_clients: Field<usize>,
    pub max_header_bytes: Field<usize>,
    pub access_log: Field<bool>,
    pub request_buffer_bytes: Field<usize>,
    pub body_timeout: Field<String>,
    pub max_origins: Field<usize>,
    pub originate_tls: Field<Vec<String>>,
    pub via: Field<bool>,
    pub idle_timeout: Field<String>,
    pub half_close_timeout: Field<String>,
    pub on_connect_error: Field<String>,
    pub intercept: Option<RawIntercept>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct RawIntercept {
    pub uids: Field<Vec<usize>>,
    pub cgroups: Field<Vec<String>>,
    pub destinations: Field<Vec<String>>,
    pub opaque_ports: Field<Vec<usize>>,
    pub detect_timeout: Field<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct RawUpstream {
    pub name: Field<String>,
    pub endpoints: Field<Vec<String>>,
    pub protocol: Field<String>,
    pub max_connections: Field<usize>,
    pub max_pending: Field<usize>,
    pub queue_timeout: Field<String>,
    pub connect_timeout: Field<String>,
    pub request_timeout: Field<String>,
    pub body_timeout: Field<String>,
    pub idle_timeout: Field<String>,
    pub max_lifetime: Field<String>,
    pub host_header: Field<String>,
    pub source_addresses: Field<Vec<String>>,
    pub dns_refresh: Field<String>,
    pub failure_backoff: Field<String>,
    pub max_streams_per_connection: Field<usize>,
    pub stream_window_bytes: Field<usize>,
    pub connection_window_bytes: Field<usize>,
    pub keepalive_interval: Field<String>,
    pub keepalive_timeout: Field<String>,
    pub tls: Option<RawUpstreamTls>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct RawUpstreamTls {
    pub server_name: Field<String>,
    pub ca_file: Field<String>,
    pub client_cert: Field<String>,
    pub client_key: Field<String>,
    pub insecure_skip_verify: Field<bool>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct RawServe {
    pub bind: Field<String>,
    pub allow_remote: Field<bool>,
    pub tls: Option<RawServeTls>,
    pub allow: Field<Vec<String>>,
    pub allow_unauthenticated: Field<bool>,
    pub max_connections: Field<usize>,
    pub max_handshakes: Field<usize>,
    pub max_streams_per_connection: Field<usize>,
    pub idle_timeout: Field<String>,
    pub half_close_timeout: Field<String>,
    pub handshake_timeout: Field<String>,
    pub connect_timeout: Field<String>,
    pub failure_backoff: Field<String>,
    pub source_addresses: Field<Vec<String>>,
    pub stream_window_bytes: Field<usize>,
    pub connection_window_bytes: Field<usize>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct RawServeTls {
    pub cert: Field<String>,
    pub key: Field<String>,
    pub client_ca: Field<String>,
}
