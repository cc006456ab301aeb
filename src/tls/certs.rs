//! The server's certificate, key and client CA, loaded from their files,
//! and the rustls configurations of both listeners.
//!
//! Both configurations hold the same [`ServerCerts`] behind a resolver and
//! a client verifier that read the files' current contents on every
//! handshake, so [`ServerCerts::reload`] changes what new connections get
//! without touching the listeners; connections already open keep the
//! session they negotiated.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tracing::{info, warn};

/// The settings key of each file, named by errors.
const CERT_KEY: &str = "server.tls.cert";
const KEY_KEY: &str = "server.tls.key";
const CLIENT_CA_KEY: &str = "server.tls.client_ca";

/// Errors of loading the TLS files. Each names the settings key and the
/// file; none holds key material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The settings key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its content is unusable: not PEM, no
    /// certificate or key in it, a key that does not match the
    /// certificate.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The settings key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

impl Error {
    /// The settings key of the offending file (`server.tls.cert`, ...).
    pub fn key(&self) -> &'static str {
        match self {
            Error::Read { key, .. } | Error::Invalid { key, .. } => key,
        }
    }
}

/// Where the TLS files are (`[server.tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The server's certificate chain, PEM, leaf first (`server.tls.cert`).
    pub cert: PathBuf,
    /// The server's private key, PEM: PKCS#8, PKCS#1 or SEC1
    /// (`server.tls.key`).
    pub key: PathBuf,
    /// CA certificates, PEM, that client certificates must chain to; when
    /// set, clients without such a certificate are refused
    /// (`server.tls.client_ca`).
    pub client_ca: Option<PathBuf>,
}

/// What the files held at the last (re)load.
struct Loaded {
    key: Arc<CertifiedKey>,
    verifier: Arc<dyn ClientCertVerifier>,
}

/// The loaded TLS files, shared by both listeners. Cheap to clone: clones
/// share the files' contents, so a reload through any clone reaches every
/// listener.
#[derive(Clone)]
pub struct ServerCerts {
    files: Arc<CertFiles>,
    current: Arc<RwLock<Loaded>>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for ServerCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCerts")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerCerts {
    /// Reads and checks the files: each must parse as PEM and hold what its
    /// key says, and the key must match the certificate.
    pub fn load(files: CertFiles) -> Result<Self, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = load(&files, &provider)?;
        Ok(ServerCerts {
            files: Arc::new(files),
            current: Arc::new(RwLock::new(loaded)),
            provider,
        })
    }

    /// The files.
    pub fn files(&self) -> &CertFiles {
        &self.files
    }

    /// Re-reads the files. New connections on both listeners get the new
    /// certificate (and client CA); open ones keep theirs. When a file
    /// cannot be used, the ones in use stay and the error is returned (and
    /// logged).
    pub fn reload(&self) -> Result<(), Error> {
        match load(&self.files, &self.provider) {
            Ok(loaded) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded;
                info!(cert = %self.files.cert.display(), "tls certificates reloaded");
                Ok(())
            }
            Err(e) => {
                warn!(key = e.key(), error = %e, "tls certificates not reloaded; keeping the ones in use");
                Err(e)
            }
        }
    }

    /// The rustls configuration of the gRPC listener (HTTP/2 only).
    pub fn grpc_config(&self) -> Arc<ServerConfig> {
        let mut config = self.config();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// The rustls configuration of the admin plane; actix-web adds its ALPN
    /// protocols (HTTP/2 and HTTP/1.1).
    pub fn http_config(&self) -> ServerConfig {
        self.config()
    }

    fn config(&self) -> ServerConfig {
        let verifier: Arc<dyn ClientCertVerifier> = Arc::new(Current(self.clone()));
        ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            // The ring provider supports both default versions; this is a
            // constant configuration, not input.
            .expect("ring supports TLS 1.2 and 1.3")
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Current(self.clone())))
    }

    fn loaded<R>(&self, f: impl FnOnce(&Loaded) -> R) -> R {
        // A poisoned lock only means a writer panicked between two whole
        // values; the value is still one of them.
        f(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }
}

fn load(files: &CertFiles, provider: &CryptoProvider) -> Result<Loaded, Error> {
    let chain = read_certs(CERT_KEY, &files.cert)?;
    let pem = read(KEY_KEY, &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| invalid(KEY_KEY, &files.key, pem_error(&e, "PRIVATE KEY")))?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => invalid(
            KEY_KEY,
            &files.key,
            format!(
                "the private key does not match the certificate in {}",
                files.cert.display()
            ),
        ),
        rustls::Error::InvalidCertificate(e) => {
            invalid(CERT_KEY, &files.cert, format!("invalid certificate: {e}"))
        }
        e => invalid(KEY_KEY, &files.key, format!("unusable private key: {e}")),
    })?;
    let verifier = match &files.client_ca {
        None => WebPkiClientVerifier::no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(CLIENT_CA_KEY, path)? {
                roots.add(cert).map_err(|e| {
                    invalid(CLIENT_CA_KEY, path, format!("invalid certificate: {e}"))
                })?;
            }
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider.clone()))
                .build()
                .map_err(|e| invalid(CLIENT_CA_KEY, path, e.to_string()))?
        }
    };
    Ok(Loaded {
        key: Arc::new(key),
        verifier,
    })
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, path, pem_error(&e, "CERTIFICATE")))?;
    if certs.is_empty() {
        return Err(invalid(key, path, "holds no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

fn pem_error(e: &rustls_pki_types::pem::Error, what: &str) -> String {
    match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!("holds no PEM {what} block"),
        e => format!("is not valid PEM: {e}"),
    }
}

fn invalid(key: &'static str, path: &Path, message: impl Into<String>) -> Error {
    Error::Invalid {
        key,
        path: path.to_owned(),
        message: message.into(),
    }
}

/// The resolver and client verifier of both listeners: each handshake
/// reads the files' contents as of the last (re)load.
struct Current(ServerCerts);

impl fmt::Debug for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Current").field(&self.0).finish()
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.loaded(|l| Arc::clone(&l.key)))
    }
}

impl ClientCertVerifier for Current {
    fn offer_client_auth(&self) -> bool {
        self.0.loaded(|l| l.verifier.offer_client_auth())
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.loaded(|l| l.verifier.client_auth_mandatory())
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints would borrow from a value a reload may replace; they
        // are optional, and clients send their one certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verifier = self.0.loaded(|l| Arc::clone(&l.verifier));
        verifier.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let verifier = self.0.loaded(|l| Arc::clone(&l.verifier));
        verifier.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let verifier = self.0.loaded(|l| Arc::clone(&l.verifier));
        verifier.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.loaded(|l| l.verifier.supported_verify_schemes())
    }
}
