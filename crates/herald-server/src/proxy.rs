//! The HTTP form of the proxy (see `herald_core::proxy`): each request is one HTTP/1.1
//! POST of JSON to the endpoint, over TCP or TLS, bounded by the proxy's timeout and by
//! the size of the answer read.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use herald_core::proxy::{ProxyClient, ProxyError, ProxyOptions};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::jwks::Endpoint;

/// The largest backend answer read.
const MAX_RESPONSE: usize = 1 << 20;

/// Sends proxy requests over HTTP(S).
#[derive(Default)]
pub struct HttpProxyClient {
    /// Built on the first `https://` request (the CA bundle is read once).
    tls: OnceLock<Result<tokio_rustls::TlsConnector, String>>,
}

impl HttpProxyClient {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn tls(&self) -> Result<&tokio_rustls::TlsConnector, ProxyError> {
        self.tls
            .get_or_init(|| {
                let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::aws_lc_rs::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(crate::jwks::root_store()?)
                .with_no_client_auth();
                Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
            })
            .as_ref()
            .map_err(|e| ProxyError::Unreachable(e.clone()))
    }

    async fn send(
        &self,
        options: &ProxyOptions,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Result<Bytes, ProxyError> {
        let e = Endpoint::parse(&options.endpoint).map_err(ProxyError::Unreachable)?;
        let tcp = TcpStream::connect((e.host.as_str(), e.port))
            .await
            .map_err(|err| ProxyError::Unreachable(format!("{}:{}: {err}", e.host, e.port)))?;
        let _ = tcp.set_nodelay(true);
        if e.tls {
            let name = ServerName::try_from(e.host.clone())
                .map_err(|err| ProxyError::Unreachable(format!("host {:?}: {err}", e.host)))?;
            let stream = self
                .tls()?
                .connect(name, tcp)
                .await
                .map_err(|err| ProxyError::Unreachable(format!("TLS: {err}")))?;
            post(stream, &e, headers, body).await
        } else {
            post(tcp, &e, headers, body).await
        }
    }
}

async fn post<IO>(
    io: IO,
    e: &Endpoint,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> Result<Bytes, ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|err| ProxyError::Unreachable(format!("HTTP: {err}")))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::post(e.path.as_str())
        .header(hyper::header::HOST, e.host_header())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::ACCEPT, "application/json");
    for (k, v) in &headers {
        // A header a client sent that HTTP cannot carry on is dropped, not fatal.
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            hyper::header::HeaderValue::from_str(v),
        ) && k != hyper::header::HOST
            && k != hyper::header::CONTENT_LENGTH
        {
            req = req.header(k, v);
        }
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|err| ProxyError::BadResponse(format!("request: {err}")))?;
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|err| ProxyError::Unreachable(format!("HTTP: {err}")))?;
        if !resp.status().is_success() {
            return Err(ProxyError::Status(resp.status().as_u16()));
        }
        Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|err| ProxyError::BadResponse(format!("body: {err}")))
    }
    .await;
    driver.abort();
    result
}

impl ProxyClient for HttpProxyClient {
    fn post<'a>(
        &'a self,
        options: &'a ProxyOptions,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Bytes, ProxyError>> + Send + 'a>> {
        Box::pin(async move {
            tokio::time::timeout(options.timeout, self.send(options, headers, body))
                .await
                .map_err(|_| ProxyError::Timeout(options.timeout))?
        })
    }
}
