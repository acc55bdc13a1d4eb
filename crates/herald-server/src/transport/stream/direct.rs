//! The unidirectional streams (`/connection/uni_sse`, `/connection/uni_http_stream`) served
//! on the socket itself, without hyper.
//!
//! A stream lives for hours and carries little. Served through hyper, each one kept its
//! HTTP/1 connection, with read and write buffers of 8 KiB each, for its whole life: ~27 KiB
//! per idle stream against ~3 KiB for a WebSocket (docs/performance.md, "Streams on the
//! socket"). The accept loop recognises these requests by their first bytes, peeked without
//! reading them ([`recognise`]); this module then reads the request, runs the checks the
//! router's gate and handlers run, writes the response head and gives the socket to the
//! connection driver. Every other request, and these ones over TLS, stay with hyper.
//!
//! The request (head and body) must arrive within `server.handshake_timeout`. Bodies come
//! with `Content-Length` or chunked; `Expect: 100-continue` is answered. The response is
//! chunked (HTTP/1.1) or ends with the connection (HTTP/1.0), and the connection closes
//! when the stream ends.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::http::header::{CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use bytes::{BufMut, Bytes, BytesMut};
use herald_core::conn::{Codec, Mode};
use herald_protocol::Disconnect;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::{Framing, Refusal, check_json, frame_chunk, uni_connect};
use crate::http::Peer;
use crate::state::AppState;
use crate::transport::driver::{Received, Wire};

/// The request lines this module serves; anything after the path must be `?` or a space.
const ROUTES: [(&[u8], Framing); 3] = [
    (b"GET /connection/uni_sse", Framing::Sse),
    (b"POST /connection/uni_sse", Framing::Sse),
    (b"POST /connection/uni_http_stream", Framing::Lines),
];

/// Bytes the accept loop peeks to recognise a request: the longest route and one more.
pub(crate) const PEEK: usize = 33;

/// Most headers a request may have (hyper's limit too).
const MAX_HEADERS: usize = 100;

/// The framing of a request this module serves, from its first bytes; None for any other
/// request, or when too few bytes have arrived to tell (hyper then serves it as before).
pub(crate) fn recognise(prefix: &[u8]) -> Option<Framing> {
    ROUTES.iter().find_map(|(line, framing)| {
        let rest = prefix.strip_prefix(*line)?;
        matches!(rest.first(), Some(b'?' | b' ')).then_some(*framing)
    })
}

/// A request as read off the socket.
struct Request {
    get: bool,
    query: Option<String>,
    http10: bool,
    headers: HeaderMap,
    body: Bytes,
}

/// Serves one recognised request on `io`: a refusal, or the stream until it ends.
pub(crate) async fn serve(
    mut io: TcpStream,
    peer: SocketAddr,
    state: AppState,
    framing: Framing,
    wait: Duration,
) {
    let limit = state.node.client.max_message_size;
    let request = match tokio::time::timeout(wait, read_request(&mut io, limit)).await {
        Ok(Ok(r)) => r,
        // Incomplete in time, or the socket failed: nothing to answer.
        Err(_) | Ok(Err(Refusal(StatusCode::OK, _))) => return,
        Ok(Err(refusal)) => return refuse(io, refusal, wait).await,
    };
    if let Err(refusal) = admit(&state, &request) {
        return refuse(io, refusal, wait).await;
    }
    let first = if request.get {
        let text = request
            .query
            .as_deref()
            .and_then(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == "cf_connect")
                    .map(|(_, v)| v.into_owned())
            })
            .unwrap_or_default();
        Bytes::from(text)
    } else {
        request.body.clone()
    };
    let first = match uni_connect(first) {
        Ok(f) => f,
        Err(refusal) => return refuse(io, refusal, wait).await,
    };
    let chunked = !request.http10;
    let head = response_head(framing, chunked);
    match tokio::time::timeout(wait, io.write_all(&head)).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    super::launch(
        &state,
        &request.headers,
        Mode::Unidirectional,
        Codec::Json,
        super::transport_name(Mode::Unidirectional, framing),
        first,
        Peer(Some(peer)),
        |_, _| SocketWire {
            io,
            framing,
            chunked,
        },
    );
}

/// The gate's and the handlers' checks, in their order: origin, capacity, media type,
/// draining.
fn admit(state: &AppState, r: &Request) -> Result<(), Refusal> {
    if !crate::http::gate::connection_origin_ok(state, &r.headers) {
        return Err(Refusal(StatusCode::FORBIDDEN, "origin not allowed"));
    }
    if crate::http::gate::at_capacity(state) {
        return Err(Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached",
        ));
    }
    if !r.get {
        check_json(&r.headers)?;
    }
    if state.node.is_draining() {
        return Err(Refusal(StatusCode::SERVICE_UNAVAILABLE, ""));
    }
    Ok(())
}

/// Reads the request head and body. A refusal with status 200 means the socket failed or
/// closed: there is no one to answer.
async fn read_request(io: &mut TcpStream, max_body: usize) -> Result<Request, Refusal> {
    const GONE: Refusal = Refusal(StatusCode::OK, "");
    // The connect request may ride in the URL, percent-encoded (up to three bytes each).
    let head_limit = max_body.saturating_mul(3).saturating_add(16 << 10);
    let mut buf = BytesMut::with_capacity(1024);
    let (len, mut request) = loop {
        if buf.len() >= head_limit {
            return Err(Refusal(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head too large\n",
            ));
        }
        if io.read_buf(&mut buf).await.map_err(|_| GONE)? == 0 {
            return Err(GONE);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => break (len, parsed(&req)?),
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Refusal(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "too many headers\n",
                ));
            }
            Err(_) => return Err(Refusal(StatusCode::BAD_REQUEST, "malformed request\n")),
        }
    };
    let _ = buf.split_to(len);
    if request.get {
        return Ok(request);
    }
    let chunked = match request.headers.get(TRANSFER_ENCODING) {
        None => false,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"chunked") => true,
        Some(_) => {
            return Err(Refusal(
                StatusCode::NOT_IMPLEMENTED,
                "transfer coding not supported\n",
            ));
        }
    };
    let length = if chunked {
        None
    } else {
        match request.headers.get_all(CONTENT_LENGTH).iter().count() {
            0 => Some(0),
            1 => Some(
                request
                    .headers
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or(Refusal(StatusCode::BAD_REQUEST, "bad content-length\n"))?,
            ),
            _ => return Err(Refusal(StatusCode::BAD_REQUEST, "bad content-length\n")),
        }
    };
    let too_large = Refusal(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request body larger than client.max_message_size\n",
    );
    if length.is_some_and(|n| n > max_body as u64) {
        return Err(too_large);
    }
    let continues = request
        .headers
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if continues && buf.is_empty() && length != Some(0) {
        io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|_| GONE)?;
    }
    request.body = match length {
        Some(n) => {
            // Checked against `max_body` above.
            let n = usize::try_from(n).map_err(|_| too_large)?;
            while buf.len() < n {
                if io.read_buf(&mut buf).await.map_err(|_| GONE)? == 0 {
                    return Err(GONE);
                }
            }
            buf.split_to(n).freeze()
        }
        None => read_chunked(io, buf, max_body).await?,
    };
    Ok(request)
}

/// The parts of a parsed head this module uses.
fn parsed(req: &httparse::Request<'_, '_>) -> Result<Request, Refusal> {
    let bad = || Refusal(StatusCode::BAD_REQUEST, "malformed request\n");
    let path = req.path.ok_or_else(bad)?;
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad())?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad())?;
        headers.append(name, value);
    }
    Ok(Request {
        get: req.method == Some("GET"),
        query: path.split_once('?').map(|(_, q)| q.to_owned()),
        http10: req.version == Some(0),
        headers,
        body: Bytes::new(),
    })
}

/// Decodes a chunked body that starts in `buf`; trailers are read and ignored.
async fn read_chunked(
    io: &mut TcpStream,
    mut buf: BytesMut,
    max_body: usize,
) -> Result<Bytes, Refusal> {
    const GONE: Refusal = Refusal(StatusCode::OK, "");
    let bad = Refusal(StatusCode::BAD_REQUEST, "bad chunked body\n");
    let mut body = BytesMut::new();
    loop {
        let (skip, size) = loop {
            match httparse::parse_chunk_size(&buf) {
                Ok(httparse::Status::Complete(found)) => break found,
                Ok(httparse::Status::Partial) if buf.len() < 1024 => {
                    if io.read_buf(&mut buf).await.map_err(|_| GONE)? == 0 {
                        return Err(GONE);
                    }
                }
                _ => return Err(bad),
            }
        };
        let _ = buf.split_to(skip);
        let size = usize::try_from(size).map_err(|_| {
            Refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body larger than client.max_message_size\n",
            )
        })?;
        if body.len().saturating_add(size) > max_body {
            return Err(Refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body larger than client.max_message_size\n",
            ));
        }
        if size == 0 {
            // Trailers, if any, then the empty line.
            loop {
                match buf.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => return Ok(body.freeze()),
                    Some(at) => {
                        let _ = buf.split_to(at + 2);
                    }
                    None if buf.len() < 8 << 10 => {
                        if io.read_buf(&mut buf).await.map_err(|_| GONE)? == 0 {
                            return Err(GONE);
                        }
                    }
                    None => return Err(bad),
                }
            }
        }
        while buf.len() < size + 2 {
            if io.read_buf(&mut buf).await.map_err(|_| GONE)? == 0 {
                return Err(GONE);
            }
        }
        body.extend_from_slice(&buf[..size]);
        if &buf[size..size + 2] != b"\r\n" {
            return Err(bad);
        }
        let _ = buf.split_to(size + 2);
    }
}

/// Answers a refused request and closes.
async fn refuse(mut io: TcpStream, Refusal(status, msg): Refusal, wait: Duration) {
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{msg}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        msg.len(),
    );
    let _ = tokio::time::timeout(wait, async {
        io.write_all(head.as_bytes()).await?;
        io.shutdown().await
    })
    .await;
}

/// The response head of a stream: the headers the routed handler sets, then chunked
/// encoding (HTTP/1.1) or none (HTTP/1.0: the body ends with the connection).
fn response_head(framing: Framing, chunked: bool) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {}\r\ncache-control: {}\r\npragma: no-cache\r\nx-accel-buffering: no\r\nconnection: close\r\n",
        super::content_type(framing),
        super::NO_CACHE,
    );
    if chunked {
        head.push_str("transfer-encoding: chunked\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// A stream on its socket as the driver sees it. Holds no buffer while idle.
struct SocketWire {
    io: TcpStream,
    framing: Framing,
    /// HTTP/1.1 chunked encoding; HTTP/1.0 writes bare bytes.
    chunked: bool,
}

impl SocketWire {
    async fn write(&mut self, data: Bytes) -> std::io::Result<()> {
        if !self.chunked {
            return self.io.write_all(&data).await;
        }
        // One buffer, one write: the chunk's size line, the data, its line end.
        let mut out = BytesMut::with_capacity(data.len() + 20);
        out.put_slice(format!("{:x}\r\n", data.len()).as_bytes());
        out.put_slice(&data);
        out.put_slice(b"\r\n");
        self.io.write_all(&out).await
    }

    /// Ready when the client has gone: the end of its stream, or a failed read. It has
    /// nothing to say on this stream; whatever it sends is read and dropped.
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<Received> {
        let mut scratch = [0u8; 256];
        // A client that floods is read in bounded turns, not one endless poll.
        for _ in 0..16 {
            let mut rb = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb)) {
                Ok(()) if rb.filled().is_empty() => return Poll::Ready(Received::Gone),
                Ok(()) => {}
                Err(_) => return Poll::Ready(Received::Gone),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Wire for SocketWire {
    /// A chunk cut in the middle cannot be followed by anything readable.
    const ABANDON_SAFE: bool = false;

    async fn recv(&mut self) -> Received {
        poll_fn(|cx| self.poll_gone(cx)).await
    }

    async fn send(&mut self, batch: VecDeque<Bytes>) -> Result<usize, ()> {
        let Some(chunk) = frame_chunk(batch, self.framing) else {
            return Ok(0);
        };
        let n = chunk.len();
        self.write(chunk).await.map(|()| n).map_err(|_| ())
    }

    async fn goodbye(&mut self, pending: VecDeque<Bytes>, push: Bytes, _d: &Disconnect) {
        if let Some(chunk) = frame_chunk(pending.into_iter().chain([push]), self.framing)
            && self.write(chunk).await.is_err()
        {
            return;
        }
        if self.chunked && self.io.write_all(b"0\r\n\r\n").await.is_err() {
            return;
        }
        let _ = self.io.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_whole_uni_request_lines() {
        assert_eq!(
            recognise(b"GET /connection/uni_sse?cf_connect=x HTTP/1.1"),
            Some(Framing::Sse)
        );
        assert_eq!(
            recognise(b"POST /connection/uni_sse HTTP/1.1"),
            Some(Framing::Sse)
        );
        assert_eq!(
            recognise(b"POST /connection/uni_http_stream HTTP/1.1"),
            Some(Framing::Lines)
        );
        assert!(PEEK >= b"POST /connection/uni_http_stream ".len());
        // Other methods, longer paths and cut-off prefixes are hyper's.
        assert_eq!(recognise(b"GET /connection/uni_http_stream HTTP/1.1"), None);
        assert_eq!(recognise(b"GET /connection/uni_ssex HTTP/1.1"), None);
        assert_eq!(recognise(b"GET /connection/uni_sse"), None);
        assert_eq!(
            recognise(b"GET /connection/sse?cf_connect=x HTTP/1.1"),
            None
        );
        assert_eq!(recognise(b"GET /connection/websocket HTTP/1.1"), None);
        assert_eq!(recognise(b""), None);
    }

    #[test]
    fn response_head_is_chunked_only_for_http_11() {
        let h = String::from_utf8(response_head(Framing::Sse, true)).unwrap();
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(h.contains("content-type: text/event-stream; charset=utf-8\r\n"));
        assert!(h.ends_with("transfer-encoding: chunked\r\n\r\n"));
        let h = String::from_utf8(response_head(Framing::Lines, false)).unwrap();
        assert!(h.contains("content-type: application/x-ndjson\r\n"));
        assert!(!h.contains("transfer-encoding"));
    }
}
