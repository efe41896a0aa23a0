//! TLS configurations, in one place below every mode: the client side
//! (upstreams, forward origins, tunnel peers) and the server side (the
//! serve role). Config validation builds them here; the connect stack and
//! the serve role use what it built.

pub mod client;
pub mod server;
