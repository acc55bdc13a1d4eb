//! TLS for every listener (rustls with the aws-lc-rs provider). The certificate is served
//! through a resolver whose key pair is swapped atomically, so a renewed certificate is
//! picked up — on SIGHUP, or when the PEM files change on disk — by the next handshake,
//! without dropping any connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// How often the certificate and key files are compared with what is loaded.
pub const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The PEM files as read, to notice a change.
#[derive(PartialEq, Eq)]
struct Loaded {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// Parses a certificate chain and its private key from PEM bytes; the message says what is
/// wrong.
fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("server.tls_cert: not a PEM certificate chain: {e}"))?;
    if certs.is_empty() {
        return Err("server.tls_cert: no certificate in the file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("server.tls_key: no PEM private key: {e}"))?;
    CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| format!("server.tls_key: does not fit server.tls_cert: {e}"))
}

/// Serves whichever certificate was loaded last.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The TLS side of a node: the acceptor every listener uses and the files it reloads from.
pub struct Tls {
    cert_path: PathBuf,
    key_path: PathBuf,
    resolver: Arc<CertResolver>,
    acceptor: TlsAcceptor,
    loaded: parking_lot::Mutex<Loaded>,
}

impl Tls {
    /// Loads the certificate and key; fails with a message naming the key at fault.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, String> {
        let loaded = read_files(cert_path, key_path)?;
        let ck = certified_key(&loaded.cert, &loaded.key)?;
        let resolver = Arc::new(CertResolver {
            current: ArcSwap::from_pointee(ck),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // Herald serves HTTP/1.1 (WebSocket upgrades, the API, streams).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(Self {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            loaded: parking_lot::Mutex::new(loaded),
        }))
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Reads the files again and swaps the certificate in when they changed and are valid.
    /// Returns whether a new certificate is now served. A bad file keeps the old one.
    pub fn reload(&self) -> Result<bool, String> {
        let fresh = read_files(&self.cert_path, &self.key_path)?;
        if *self.loaded.lock() == fresh {
            return Ok(false);
        }
        let ck = certified_key(&fresh.cert, &fresh.key)?;
        self.resolver.current.store(Arc::new(ck));
        *self.loaded.lock() = fresh;
        Ok(true)
    }

    /// Reloads on SIGHUP and when the files change, until `stop` turns true.
    pub fn spawn_reloader(self: &Arc<Self>, mut stop: watch::Receiver<bool>) {
        let tls = self.clone();
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(FILE_CHECK_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let hangup = async {
                    match hup.as_mut() {
                        Some(h) => {
                            h.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup = std::future::pending::<()>();
                tokio::select! {
                    _ = crate::stop::stopped(&mut stop) => return,
                    _ = tick.tick() => {}
                    _ = hangup => tracing::info!("SIGHUP: reloading the TLS certificate"),
                }
                match tls.reload() {
                    Ok(true) => tracing::info!(
                        cert = %tls.cert_path.display(),
                        "TLS certificate reloaded"
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "TLS certificate not reloaded"),
                }
            }
        });
    }
}

fn read_files(cert: &Path, key: &Path) -> Result<Loaded, String> {
    Ok(Loaded {
        cert: std::fs::read(cert)
            .map_err(|e| format!("server.tls_cert: cannot read {}: {e}", cert.display()))?,
        key: std::fs::read(key)
            .map_err(|e| format!("server.tls_key: cannot read {}: {e}", key.display()))?,
    })
}

/// Checks the configured pair loads (for the config check).
pub fn check_files(cert: &str, key: &str) -> Result<(), String> {
    match (cert.is_empty(), key.is_empty()) {
        (true, true) => Ok(()),
        (false, true) => Err("server.tls_key: required with server.tls_cert".into()),
        (true, false) => Err("server.tls_cert: required with server.tls_key".into()),
        (false, false) => {
            let l = read_files(Path::new(cert), Path::new(key))?;
            certified_key(&l.cert, &l.key).map(|_| ())
        }
    }
}
