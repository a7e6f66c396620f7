//! TLS listeners: the rustls server configuration built from a listener's `tls` table, kept
//! behind a lock so SIGHUP can swap in re-read certificates without touching open connections,
//! and the subject CN of a client certificate for `use_identity_as_username`.

use std::path::Path;
use std::sync::{Arc, RwLock};

use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{version, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// A certificate, key or CA file that could not be used, with the file named.
#[derive(Debug)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// A listener's TLS settings and the acceptor last built from them. Read by every handshake
/// (a clone of the acceptor is an `Arc` clone), replaced by [`Certs::reload`].
pub struct Certs {
    config: TlsConfig,
    current: RwLock<TlsAcceptor>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs")
            .field("config", &self.config)
            .finish()
    }
}

impl Certs {
    /// Read the files and build the acceptor.
    pub fn load(config: TlsConfig) -> Result<Certs, TlsError> {
        let acceptor = build(&config)?;
        Ok(Certs {
            config,
            current: RwLock::new(acceptor),
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        match self.current.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Read the files again. On error the running acceptor stays and the error is returned
    /// for the caller to log; connections already open keep their session either way.
    pub fn reload(&self) -> Result<(), TlsError> {
        let acceptor = build(&self.config)?;
        match self.current.write() {
            Ok(mut a) => *a = acceptor,
            Err(poisoned) => *poisoned.into_inner() = acceptor,
        }
        Ok(())
    }

    /// The certificate file, for log lines.
    pub fn cert_path(&self) -> &Path {
        &self.config.cert
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{}: no PEM certificate found",
            path.display()
        )));
    }
    Ok(certs)
}

fn build(c: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(default_provider());
    let chain = certs(&c.cert)?;
    let key = PrivateKeyDer::from_pem_file(&c.key)
        .map_err(|e| TlsError(format!("{}: {e}", c.key.display())))?;
    // TLS 1.2 and 1.3 only; rustls has nothing older, so a TLS 1.0/1.1 client is refused
    // in the handshake with a protocol_version alert.
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&version::TLS13, &version::TLS12])
        .map_err(|e| TlsError(format!("TLS versions: {e}")))?;
    let builder = match &c.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError(format!("{}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if c.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError(format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError(format!("{} / {}: {e}", c.cert.display(), c.key.display())))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// One DER element: (tag, contents, what follows). Short and long length forms up to
/// 3 bytes (16 MiB), which covers any certificate.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 3 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
/// id-at-commonName, 2.5.4.3.
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];

/// The first subject CN of an X.509 certificate (DER), as UTF-8. Only reached for
/// certificates rustls has already verified against `client_ca`.
pub fn common_name(cert: &[u8]) -> Option<String> {
    let (SEQUENCE, cert, _) = der(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = der(cert)? else {
        return None;
    };
    let (tag, _, mut rest) = der(tbs)?;
    if tag == 0xa0 {
        // [0] version; the serial number follows.
        rest = der(rest)?.2;
    }
    // signature algorithm, issuer, validity, then the subject.
    for _ in 0..3 {
        rest = der(rest)?.2;
    }
    let (SEQUENCE, mut rdns, _) = der(rest)? else {
        return None;
    };
    while !rdns.is_empty() {
        let (tag, mut set, next) = der(rdns)?;
        rdns = next;
        if tag != SET {
            continue;
        }
        while !set.is_empty() {
            let (tag, attr, next) = der(set)?;
            set = next;
            if tag != SEQUENCE {
                continue;
            }
            let (0x06, oid, value) = der(attr)? else {
                continue;
            };
            if oid == OID_CN {
                // UTF8String, PrintableString or IA5String: all valid UTF-8 when well formed.
                let (0x0c | 0x13 | 0x16, s, _) = der(value)? else {
                    return None;
                };
                return std::str::from_utf8(s).ok().map(str::to_string);
            }
        }
    }
    None
}
