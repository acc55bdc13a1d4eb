//! Fetching the JWKS document of `client.token_jwks_public_endpoint`: one HTTP/1.1 GET
//! (hyper's client connection over a TCP or TLS stream), bounded in time and size. The keys
//! are cached in `herald_core::auth::Jwks`, refreshed every
//! `client.token_jwks_refresh_interval` and when a token names an unknown `kid`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_core::auth::{JwkSet, Jwks, JwksFetcher};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// The longest a fetch may take, connect to last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest JWKS document accepted.
const MAX_BODY: usize = 1 << 20;

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{url:?} is not an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        if authority.contains('@') {
            return Err("credentials in the URL are not supported".into());
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6.find(']').ok_or("unclosed [ in the host")?;
            let host = &v6[..end];
            let port = match &v6[end + 1..] {
                "" => default_port,
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok())
                    .ok_or("bad port")?,
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| "bad port")?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        let path = match path.find('#') {
            Some(i) => path[..i].to_string(),
            None => path,
        };
        Ok(Self {
            tls,
            host,
            port,
            path,
        })
    }

    pub(crate) fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (self.tls, self.port) {
            (true, 443) | (false, 80) => host,
            _ => format!("{host}:{}", self.port),
        }
    }
}

/// System trust anchors for `https://` endpoints: `SSL_CERT_FILE`, else the usual bundle
/// locations.
pub(crate) fn root_store() -> Result<rustls::RootCertStore, String> {
    let mut candidates: Vec<String> = Vec::new();
    if let Ok(f) = std::env::var("SSL_CERT_FILE") {
        candidates.push(f);
    }
    candidates.extend(
        [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/ssl/cert.pem",
        ]
        .map(String::from),
    );
    for path in candidates {
        let Ok(iter) = CertificateDer::pem_file_iter(&path) else {
            continue;
        };
        let mut store = rustls::RootCertStore::empty();
        for cert in iter.flatten() {
            let _ = store.add(cert);
        }
        if !store.is_empty() {
            return Ok(store);
        }
    }
    Err("no CA bundle found (set SSL_CERT_FILE)".into())
}

/// Fetches the JWKS document over HTTP(S).
pub struct HttpFetcher {
    endpoint: Endpoint,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl HttpFetcher {
    pub fn new(url: &str) -> Result<Self, String> {
        let endpoint = Endpoint::parse(url)?;
        let tls = if endpoint.tls {
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(root_store()?)
            .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(Self { endpoint, tls })
    }

    async fn get(&self) -> Result<JwkSet, String> {
        let e = &self.endpoint;
        let tcp = TcpStream::connect((e.host.as_str(), e.port))
            .await
            .map_err(|err| format!("connect {}:{}: {err}", e.host, e.port))?;
        let _ = tcp.set_nodelay(true);
        let body = match &self.tls {
            Some(connector) => {
                let name = ServerName::try_from(e.host.clone())
                    .map_err(|err| format!("host {:?}: {err}", e.host))?;
                let stream = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|err| format!("TLS: {err}"))?;
                request(stream, e).await?
            }
            None => request(tcp, e).await?,
        };
        serde_json::from_slice::<JwkSet>(&body).map_err(|err| format!("not a JWKS document: {err}"))
    }
}

async fn request<IO>(io: IO, e: &Endpoint) -> Result<Bytes, String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|err| format!("HTTP: {err}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get(e.path.as_str())
        .header(hyper::header::HOST, e.host_header())
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|err| format!("request: {err}"))?;
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|err| format!("HTTP: {err}"))?;
        if !resp.status().is_success() {
            return Err(format!("HTTP status {}", resp.status()));
        }
        Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|err| format!("body: {err}"))
    }
    .await;
    driver.abort();
    result
}

impl JwksFetcher for HttpFetcher {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<JwkSet, String>> + Send + '_>> {
        Box::pin(async move {
            tokio::time::timeout(FETCH_TIMEOUT, self.get())
                .await
                .map_err(|_| format!("timed out after {FETCH_TIMEOUT:?}"))?
        })
    }
}

/// Installs the HTTP fetcher, fetches once (a failure is logged; tokens with a `kid` are
/// refused until a fetch succeeds), and refreshes in the background until `stop`.
pub async fn start(jwks: Arc<Jwks>, mut stop: watch::Receiver<bool>) -> Result<(), String> {
    jwks.set_fetcher(Arc::new(HttpFetcher::new(jwks.url())?));
    match jwks.refresh().await {
        Ok(n) => tracing::info!(url = %jwks.url(), keys = n, "JWKS loaded"),
        Err(e) => tracing::warn!(url = %jwks.url(), error = %e, "JWKS not loaded yet"),
    }
    tokio::spawn(async move {
        let every = jwks.refresh_interval();
        loop {
            tokio::select! {
                _ = crate::stop::stopped(&mut stop) => return,
                _ = tokio::time::sleep(every) => {}
            }
            match jwks.refresh().await {
                Ok(n) => tracing::debug!(keys = n, "JWKS refreshed"),
                Err(e) => {
                    tracing::warn!(url = %jwks.url(), error = %e, "JWKS refresh failed; keeping the keys held")
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let e = Endpoint::parse("http://127.0.0.1:8080/.well-known/jwks.json").unwrap();
        assert_eq!(
            e,
            Endpoint {
                tls: false,
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/.well-known/jwks.json".into()
            }
        );
        let e = Endpoint::parse("https://auth.example.com").unwrap();
        assert_eq!((e.port, e.path.as_str(), e.tls), (443, "/", true));
        assert_eq!(e.host_header(), "auth.example.com");
        let e = Endpoint::parse("http://[::1]:9000/k?x=1#frag").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("::1", 9000, "/k?x=1")
        );
        assert_eq!(e.host_header(), "[::1]:9000");
        assert!(Endpoint::parse("ftp://x/").is_err());
        assert!(Endpoint::parse("http://:80/").is_err());
        assert!(Endpoint::parse("http://u:p@h/").is_err());
        assert!(Endpoint::parse("http://h:notaport/").is_err());
    }
}
