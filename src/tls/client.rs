//! TLS toward upstreams: one rustls `ClientConfig` per upstream (so that
//! session resumption works across its connections), built when the config
//! is checked, so that `check` reports an unreadable file or a key without
//! a certificate, naming the key.
//!
//! Roots: the system store through rustls-native-certs (what Debian's
//! `ca-certificates` and `update-ca-certificates` manage, so an operator's
//! corporate CA added the usual way is trusted), or `ca_file` instead of
//! it. Crypto: ring, which builds on a clean Debian machine with only a C
//! compiler (aws-lc-rs needs cmake and more).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// `tls = { … }` on an upstream, as checked by the config.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// SNI and the name the certificate must carry; default: the
    /// endpoint's host name, or its IP address.
    pub server_name: Option<String>,
    /// Trust only these CAs instead of the system store.
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Labs only: accept any certificate.
    pub insecure_skip_verify: bool,
}

/// A built client config. Equal when the settings and the bytes of every
/// file read are equal, so that a reload after a certificate was rotated
/// in place builds new connections.
#[derive(Clone)]
pub struct TlsClient {
    pub settings: TlsSettings,
    pub config: Arc<ClientConfig>,
    pub server_name: Option<ServerName<'static>>,
    fingerprint: u64,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings && self.fingerprint == other.fingerprint
    }
}

impl Eq for TlsClient {}

/// A problem with one key of `tls`, for the config's error list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsProblem {
    /// `ca_file`, `client_key`, …
    pub field: &'static str,
    pub reason: String,
}

pub(crate) fn problem(field: &'static str, reason: impl Into<String>) -> TlsProblem {
    TlsProblem {
        field,
        reason: reason.into(),
    }
}

pub(crate) fn read(
    field: &'static str,
    path: &Path,
    hasher: &mut impl Hasher,
) -> Result<Vec<u8>, TlsProblem> {
    let bytes = std::fs::read(path)
        .map_err(|e| problem(field, format!("cannot read {}: {e}", path.display())))?;
    bytes.hash(hasher);
    Ok(bytes)
}

pub(crate) fn certs(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsProblem> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(c),
        Ok(_) => Err(problem(
            field,
            format!("{} holds no PEM certificate", path.display()),
        )),
        Err(e) => Err(problem(
            field,
            format!("{} is not valid PEM: {e}", path.display()),
        )),
    }
}

/// The system's CA certificates, read at most once per config check:
/// several upstreams share one read of the store.
#[derive(Default)]
pub struct SystemRoots(std::sync::OnceLock<Vec<CertificateDer<'static>>>);

impl SystemRoots {
    fn get(&self) -> &[CertificateDer<'static>] {
        self.0
            .get_or_init(|| rustls_native_certs::load_native_certs().certs)
    }
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the client config for one upstream, with ALPN `alpn` (most
/// preferred first).
///
/// # Errors
/// Every problem found, each naming its key.
pub fn build(
    s: &TlsSettings,
    alpn: &[&[u8]],
    system: &SystemRoots,
) -> Result<TlsClient, Vec<TlsProblem>> {
    let mut problems = Vec::new();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();

    let server_name = match &s.server_name {
        None => None,
        Some(n) => match ServerName::try_from(n.trim().to_string()) {
            Ok(n) => Some(n),
            Err(_) => {
                problems.push(problem(
                    "server_name",
                    format!("`{n}` is neither a DNS name nor an IP address"),
                ));
                None
            }
        },
    };

    let mut roots = RootCertStore::empty();
    match &s.ca_file {
        Some(path) => {
            match read("ca_file", path, &mut hasher).and_then(|pem| certs("ca_file", path, &pem)) {
                Ok(list) => {
                    for c in list {
                        if let Err(e) = roots.add(c) {
                            problems.push(problem(
                                "ca_file",
                                format!(
                                    "{} holds a certificate that is not a usable CA: {e}",
                                    path.display()
                                ),
                            ));
                        }
                    }
                }
                Err(p) => problems.push(p),
            }
        }
        None if !s.insecure_skip_verify => {
            for c in system.get() {
                c.as_ref().hash(&mut hasher);
                // A system store may hold a certificate rustls cannot use;
                // skipping it is what every TLS client does.
                let _ = roots.add(c.clone());
            }
            if roots.is_empty() {
                problems.push(problem(
                    "ca_file",
                    "the system has no CA certificates (install ca-certificates) and no ca_file is set",
                ));
            }
        }
        None => {}
    }

    let identity = match (&s.client_cert, &s.client_key) {
        (None, None) => None,
        (Some(_), None) => {
            problems.push(problem("client_key", "is required with client_cert"));
            None
        }
        (None, Some(_)) => {
            problems.push(problem("client_cert", "is required with client_key"));
            None
        }
        (Some(cp), Some(kp)) => {
            let chain =
                read("client_cert", cp, &mut hasher).and_then(|pem| certs("client_cert", cp, &pem));
            let key = read("client_key", kp, &mut hasher).and_then(|pem| {
                PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                    problem(
                        "client_key",
                        format!("{} holds no usable private key: {e}", kp.display()),
                    )
                })
            });
            match (chain, key) {
                (Ok(c), Ok(k)) => Some((c, k)),
                (c, k) => {
                    problems.extend(c.err());
                    problems.extend(k.err());
                    None
                }
            }
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }

    let builder = match ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b,
        Err(e) => return Err(vec![problem("server_name", format!("rustls: {e}"))]),
    };
    let builder = if s.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider())))
    } else {
        builder.with_root_certificates(roots)
    };
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => match builder.with_client_auth_cert(chain, key) {
            Ok(c) => c,
            Err(e) => {
                return Err(vec![problem(
                    "client_key",
                    format!("does not match client_cert: {e}"),
                )])
            }
        },
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsClient {
        settings: s.clone(),
        config: Arc::new(config),
        server_name,
        fingerprint: hasher.finish(),
    })
}

/// A stable word for why a handshake failed: the metric label and the
/// start of the 502's reason.
pub fn failure_reason(e: &rustls::Error) -> &'static str {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "unknown-issuer",
            C::NotValidForName | C::NotValidForNameContext { .. } => "name-mismatch",
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "not-yet-valid",
            C::Revoked => "revoked",
            C::BadSignature => "bad-signature",
            C::UnknownRevocationStatus => "unknown-revocation-status",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => "invalid-purpose",
            _ => "bad-certificate",
        },
        E::AlertReceived(a) => match a {
            A::CertificateRequired => "client-certificate-required",
            A::HandshakeFailure => "handshake-failure",
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::UnsupportedCertificate => "client-certificate-rejected",
            A::NoApplicationProtocol => "no-application-protocol",
            A::ProtocolVersion => "protocol-version",
            _ => "alert",
        },
        E::NoApplicationProtocol => "no-application-protocol",
        E::PeerIncompatible(_) => "incompatible",
        E::PeerMisbehaved(_) | E::InvalidMessage(_) => "protocol-error",
        _ => "other",
    }
}

/// The rustls error inside an I/O error, if that is what it is.
pub fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// `insecure_skip_verify`: signatures are still checked (the handshake
/// must be a real one), the certificate is not.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
