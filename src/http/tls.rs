//! TLS termination for the listeners (`server.tls`): rustls with the `ring` provider
//! reqwest already brings, ALPN `h2, http/1.1`. Every handshake asks [`Certificates`] for
//! the certificate in force, so a renewed one is served to new connections the moment it is
//! loaded, while open connections keep theirs; it is reloaded when its files change and on
//! SIGHUP, and a pair that does not load keeps the old one (and says why).

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

use crate::config::TlsFiles;

/// How often the certificate's files are checked for a change (as the config file's are).
const POLL: Duration = Duration::from_secs(2);

/// A TLS handshake must be over within this, so a client that opens a connection and
/// stalls holds its descriptor no longer than one that stalls its request head.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listeners' TLS side: the acceptor and the certificate it serves.
#[derive(Clone)]
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    certificates: Arc<Certificates>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.certificates.files)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the certificate and key, or says why they do not make a pair.
    pub fn new(files: &TlsFiles) -> anyhow::Result<Self> {
        let certificates = Arc::new(Certificates {
            current: RwLock::new(Arc::new(load(files)?)),
            files: files.clone(),
            stamp: std::sync::Mutex::new(stamp(files)),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("the TLS provider has no protocol version")?
        .with_no_client_auth()
        .with_cert_resolver(certificates.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            certificates,
        })
    }

    /// The TLS handshake on an accepted connection, bounded by [`HANDSHAKE_TIMEOUT`].
    pub async fn accept<IO>(
        &self,
        stream: IO,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ))
            })
    }

    /// Loads the files again; `false` (with the reason logged) keeps the certificate in force.
    pub fn reload(&self, reason: &str) -> bool {
        self.certificates.reload(reason)
    }

    /// Reloads the certificate when its files change (checked every 2 s) and on SIGHUP,
    /// for as long as the listener runs.
    pub async fn watch(self) {
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let signalled = async {
                match hangup.as_mut() {
                    Some(signal) => drop(signal.recv().await),
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let signalled = std::future::pending::<()>();
            let reason = tokio::select! {
                () = signalled => "SIGHUP",
                () = tokio::time::sleep(POLL) => {
                    if !self.certificates.changed() {
                        continue;
                    }
                    "its files changed"
                }
            };
            self.reload(reason);
        }
    }
}

/// The certificate in force, swapped whole by a reload; read once per handshake (the lock
/// is held for a pointer copy, never across an await).
#[derive(Debug)]
pub struct Certificates {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' modification times when last looked at.
    stamp: std::sync::Mutex<Option<(SystemTime, SystemTime)>>,
}

impl Certificates {
    fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn changed(&self) -> bool {
        let now = stamp(&self.files);
        let mut seen = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return false;
        }
        *seen = now;
        true
    }

    fn reload(&self, reason: &str) -> bool {
        match load(&self.files) {
            Ok(loaded) => {
                match self.current.write() {
                    Ok(mut slot) => *slot = Arc::new(loaded),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(loaded),
                }
                tracing::info!("TLS certificate reloaded ({reason})");
                true
            }
            Err(error) => {
                tracing::error!(
                    "TLS certificate reload ({reason}) refused, the certificate in force stays: {error:#}"
                );
                false
            }
        }
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Both files' modification times, `None` if either cannot be read (a renewal writing one
/// file, then the other, is seen as a change each time; the pair is loaded whole).
fn stamp(files: &TlsFiles) -> Option<(SystemTime, SystemTime)> {
    let modified = |path: &Path| std::fs::metadata(path).ok()?.modified().ok();
    Some((modified(&files.cert)?, modified(&files.key)?))
}

/// The chain and key from their PEM files, checked to be a pair.
fn load(files: &TlsFiles) -> anyhow::Result<CertifiedKey> {
    let cert = files.cert.display();
    let key = files.key.display();
    let chain_pem = std::fs::read(&files.cert)
        .with_context(|| format!("server.tls.cert: cannot read {cert}"))?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| anyhow::anyhow!("server.tls.cert: {cert} is not PEM: {error}"))?;
    if chain.is_empty() {
        bail!("server.tls.cert: {cert} holds no certificate");
    }
    let key_pem =
        std::fs::read(&files.key).with_context(|| format!("server.tls.key: cannot read {key}"))?;
    // The key's own parse error could quote it: only its file is named.
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| anyhow::anyhow!("server.tls.key: {key} holds no PEM private key"))?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(private)
        .map_err(|_| anyhow::anyhow!("server.tls.key: {key} is not a key rustls can sign with"))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        // `Unknown`: the key cannot tell its public half; the handshake will.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(_) => bail!("server.tls.key: {key} is not the key of {cert}"),
    }
}
