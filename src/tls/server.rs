//! The serve role's TLS: its certificate, and the client CA that mTLS
//! checks tunnel clients against. Files are read and checked when the
//! config is, so `check` names a bad one.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use super::client::{certs, problem, provider, read, TlsProblem};

/// A built server config; equal when the settings and the bytes of every
/// file are (a certificate rotated in place is a change).
#[derive(Clone)]
pub struct TlsServer {
    pub config: Arc<ServerConfig>,
    /// Client certificates are required and checked.
    pub mutual: bool,
    fingerprint: u64,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("mutual", &self.mutual)
            .finish()
    }
}

impl PartialEq for TlsServer {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint && self.mutual == other.mutual
    }
}

impl Eq for TlsServer {}

/// Builds the server config: `cert` (chain) and `key`; with `client_ca`,
/// a client certificate from that CA is required. ALPN offers `h2` only.
///
/// # Errors
/// Every problem found, each naming its key (`cert`, `key`, `client_ca`).
pub fn build(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<TlsServer, Vec<TlsProblem>> {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let chain = read("cert", cert, &mut hasher).and_then(|pem| certs("cert", cert, &pem));
    let key = read("key", key, &mut hasher).and_then(|pem| {
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
            problem(
                "key",
                format!("{} holds no usable private key: {e}", key.display()),
            )
        })
    });
    let roots = match client_ca {
        None => Ok(None),
        Some(ca) => read("client_ca", ca, &mut hasher)
            .and_then(|pem| certs("client_ca", ca, &pem))
            .and_then(|list| {
                let mut roots = RootCertStore::empty();
                for c in list {
                    roots
                        .add(c)
                        .map_err(|e| problem("client_ca", format!("{}: {e}", ca.display())))?;
                }
                Ok(Some(roots))
            }),
    };
    let (chain, key, roots) = match (chain, key, roots) {
        (Ok(c), Ok(k), Ok(r)) => (c, k, r),
        (c, k, r) => {
            let mut problems = Vec::new();
            problems.extend(c.err());
            problems.extend(k.err());
            problems.extend(r.err());
            return Err(problems);
        }
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| vec![problem("cert", format!("rustls: {e}"))])?;
    let mutual = roots.is_some();
    let builder = match roots {
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| vec![problem("client_ca", format!("{e}"))])?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| vec![problem("key", format!("does not match cert: {e}"))])?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsServer {
        config: Arc::new(config),
        mutual,
        fingerprint: hasher.finish(),
    })
}
