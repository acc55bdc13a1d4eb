//! The HTTP streams (`/connection/uni_sse`, `/connection/uni_http_stream`, and the
//! bidirectional `/connection/sse` and `/connection/http_stream`) served on the socket
//! itself, without hyper.
//!
//! A stream lives for hours and carries little. Served through hyper, each one kept its
//! HTTP/1 connection, with read and write buffers of 8 KiB each, for its whole life: ~27 KiB
//! per idle stream against ~3 KiB for a WebSocket (docs/performance.md, "Streams on the
//! socket"). The accept loop recognises these requests by their first bytes, peeked without
//! reading them ([`recognise`]); this module then reads the request, runs the checks the
//! router's gate and handlers run, writes the response head and gives the socket to the
//! connection driver. Every other request (`/emulation` among them), and these ones over
//! TLS, stay with hyper.
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
use herald_core::conn::{Control, Mode};
use herald_protocol::Disconnect;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::{BODY_TOO_LARGE, Framing, Refusal, check_json, frame_chunk, is_binary, uni_connect};
use crate::http::Peer;
use crate::state::AppState;
use crate::transport::driver::{Received, Wire};

/// What a recognised request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// `GET|POST /connection/uni_sse`.
    UniSse,
    /// `POST /connection/uni_http_stream`.
    UniHttpStream,
    /// `GET /connection/sse?cf_connect=…`, commands on `/emulation`.
    Sse,
    /// `POST /connection/http_stream`, JSON or Protobuf, commands on `/emulation`.
    HttpStream,
}

/// The request lines this module serves; anything after the path must be `?` or a space.
const ROUTES: [(&[u8], Route); 5] = [
    (b"GET /connection/uni_sse", Route::UniSse),
    (b"POST /connection/uni_sse", Route::UniSse),
    (b"POST /connection/uni_http_stream", Route::UniHttpStream),
    (b"GET /connection/sse", Route::Sse),
    (b"POST /connection/http_stream", Route::HttpStream),
];

/// Bytes the accept loop peeks to recognise a request: the longest route and one more.
pub(crate) const PEEK: usize = 33;

/// Most headers a request may have (hyper's limit too).
const MAX_HEADERS: usize = 100;

/// The route of a request this module serves, from its first bytes; None for any other
/// request, or when too few bytes have arrived to tell (hyper then serves it as before).
pub(crate) fn recognise(prefix: &[u8]) -> Option<Route> {
    ROUTES.iter().find_map(|(line, route)| {
        let rest = prefix.strip_prefix(*line)?;
        matches!(rest.first(), Some(b'?' | b' ')).then_some(*route)
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
    route: Route,
    wait: Duration,
) {
    let limit = state.node.client.max_message_size;
    let request = match tokio::time::timeout(wait, read_request(&mut io, limit)).await {
        Ok(Ok(r)) => r,
        // Incomplete in time, or the socket failed: nothing to answer.
        Err(_) | Ok(Err(Unread::Gone)) => return,
        Ok(Err(Unread::Refused(refusal))) => return refuse(io, refusal, wait).await,
    };
    let (mode, framing, first) = match admit(&state, route, &request) {
        Ok(admitted) => admitted,
        Err(refusal) => return refuse(io, refusal, wait).await,
    };
    let chunked = !request.http10;
    let head = response_head(framing, chunked);
    match tokio::time::timeout(wait, io.write_all(&head)).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    let node_id = state.node.id.clone();
    super::launch(
        &state,
        &request.headers,
        mode,
        framing,
        first,
        Peer(Some(peer)),
        |conn, session| SocketWire {
            io,
            framing,
            chunked,
            route: (mode == Mode::Bidirectional).then(|| super::route_to(&node_id, conn, session)),
        },
    );
}

/// The value of the `cf_connect` URL parameter, if any.
fn cf_connect(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "cf_connect")
        .map(|(_, v)| v.into_owned())
}

/// The gate's and the handlers' checks, in their order (origin, capacity, the request's
/// own, draining), and what the stream will be: its mode, framing and first message.
fn admit(state: &AppState, route: Route, r: &Request) -> Result<(Mode, Framing, Bytes), Refusal> {
    if !crate::http::gate::connection_origin_ok(state, &r.headers) {
        return Err(Refusal(StatusCode::FORBIDDEN, "origin not allowed"));
    }
    if crate::http::gate::at_capacity(state) {
        return Err(Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached",
        ));
    }
    let admitted = match route {
        Route::UniSse | Route::UniHttpStream => {
            let framing = if route == Route::UniSse {
                Framing::Sse
            } else {
                Framing::Lines
            };
            let first = if r.get {
                Bytes::from(cf_connect(r.query.as_deref()).unwrap_or_default())
            } else {
                check_json(&r.headers)?;
                r.body.clone()
            };
            (Mode::Unidirectional, framing, uni_connect(first)?)
        }
        Route::Sse => {
            let Some(c) = cf_connect(r.query.as_deref()).filter(|c| !c.trim().is_empty()) else {
                return Err(Refusal(
                    StatusCode::BAD_REQUEST,
                    "no cf_connect parameter\n",
                ));
            };
            if c.len() > state.node.client.max_message_size {
                return Err(Refusal(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "connect command too large\n",
                ));
            }
            (Mode::Bidirectional, Framing::Sse, Bytes::from(c))
        }
        Route::HttpStream => {
            let framing = if is_binary(&r.headers) {
                Framing::Binary
            } else {
                Framing::Lines
            };
            let empty = match framing {
                Framing::Binary => r.body.is_empty(),
                _ => r.body.iter().all(u8::is_ascii_whitespace),
            };
            if empty {
                return Err(Refusal(StatusCode::BAD_REQUEST, "no connect command\n"));
            }
            (Mode::Bidirectional, framing, r.body.clone())
        }
    };
    if state.node.is_draining() {
        return Err(Refusal(StatusCode::SERVICE_UNAVAILABLE, ""));
    }
    Ok(admitted)
}

/// Why a request was not read whole.
enum Unread {
    /// The socket failed or closed: there is no one to answer.
    Gone,
    /// Answered with an HTTP status.
    Refused(Refusal),
}

impl From<Refusal> for Unread {
    fn from(r: Refusal) -> Self {
        Unread::Refused(r)
    }
}

/// Reads the request head and body.
async fn read_request(io: &mut TcpStream, max_body: usize) -> Result<Request, Unread> {
    // The connect request may ride in the URL, percent-encoded (up to three bytes each).
    let head_limit = max_body.saturating_mul(3).saturating_add(16 << 10);
    let mut buf = BytesMut::with_capacity(1024);
    let (len, mut request) = loop {
        if buf.len() >= head_limit {
            return Err(Refusal(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head too large\n",
            )
            .into());
        }
        // Reads of at least 4 KiB: a large head takes few reads and few parses.
        buf.reserve(4 << 10);
        if io.read_buf(&mut buf).await.map_err(|_| Unread::Gone)? == 0 {
            return Err(Unread::Gone);
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
                )
                .into());
            }
            Err(_) => return Err(Refusal(StatusCode::BAD_REQUEST, "malformed request\n").into()),
        }
    };
    let _ = buf.split_to(len);
    if request.get {
        // A GET's body, if it has one, is not read: the connection ends with the stream.
        return Ok(request);
    }
    let chunked = match request.headers.get(TRANSFER_ENCODING) {
        None => false,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"chunked") => true,
        Some(_) => {
            return Err(Refusal(
                StatusCode::NOT_IMPLEMENTED,
                "transfer coding not supported\n",
            )
            .into());
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
            _ => return Err(Refusal(StatusCode::BAD_REQUEST, "bad content-length\n").into()),
        }
    };
    if length.is_some_and(|n| n > max_body as u64) {
        return Err(BODY_TOO_LARGE.into());
    }
    let continues = request
        .headers
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if continues && buf.is_empty() && length != Some(0) {
        io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|_| Unread::Gone)?;
    }
    request.body = match length {
        Some(n) => {
            // Checked against `max_body` above.
            let n = usize::try_from(n).map_err(|_| BODY_TOO_LARGE)?;
            buf.reserve(n.saturating_sub(buf.len()));
            while buf.len() < n {
                if io.read_buf(&mut buf).await.map_err(|_| Unread::Gone)? == 0 {
                    return Err(Unread::Gone);
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
) -> Result<Bytes, Unread> {
    let bad = Refusal(StatusCode::BAD_REQUEST, "bad chunked body\n");
    let mut body = BytesMut::new();
    loop {
        let (skip, size) = loop {
            match httparse::parse_chunk_size(&buf) {
                Ok(httparse::Status::Complete(found)) => break found,
                Ok(httparse::Status::Partial) if buf.len() < 1024 => {
                    buf.reserve(1024);
                    if io.read_buf(&mut buf).await.map_err(|_| Unread::Gone)? == 0 {
                        return Err(Unread::Gone);
                    }
                }
                _ => return Err(bad.into()),
            }
        };
        let _ = buf.split_to(skip);
        let size = usize::try_from(size).map_err(|_| BODY_TOO_LARGE)?;
        if body.len().saturating_add(size) > max_body {
            return Err(BODY_TOO_LARGE.into());
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
                        buf.reserve(1024);
                        if io.read_buf(&mut buf).await.map_err(|_| Unread::Gone)? == 0 {
                            return Err(Unread::Gone);
                        }
                    }
                    None => return Err(bad.into()),
                }
            }
        }
        buf.reserve((size + 2).saturating_sub(buf.len()));
        while buf.len() < size + 2 {
            if io.read_buf(&mut buf).await.map_err(|_| Unread::Gone)? == 0 {
                return Err(Unread::Gone);
            }
        }
        body.extend_from_slice(&buf[..size]);
        if &buf[size..size + 2] != b"\r\n" {
            return Err(bad.into());
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
    /// The `/emulation` route to this session (bidirectional streams only).
    route: Option<super::emulation::Registration>,
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
        self.route.take();
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

    fn on_control(&mut self, c: &Control) {
        super::commands_handled(self.route.as_ref(), c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_whole_stream_request_lines() {
        assert_eq!(
            recognise(b"GET /connection/uni_sse?cf_connect=x HTTP/1.1"),
            Some(Route::UniSse)
        );
        assert_eq!(
            recognise(b"POST /connection/uni_sse HTTP/1.1"),
            Some(Route::UniSse)
        );
        assert_eq!(
            recognise(b"POST /connection/uni_http_stream HTTP/1.1"),
            Some(Route::UniHttpStream)
        );
        assert_eq!(
            recognise(b"GET /connection/sse?cf_connect=x HTTP/1.1"),
            Some(Route::Sse)
        );
        assert_eq!(
            recognise(b"POST /connection/http_stream HTTP/1.1"),
            Some(Route::HttpStream)
        );
        assert!(ROUTES.iter().all(|(line, _)| PEEK > line.len()));
        // Other methods, longer paths and cut-off prefixes are hyper's.
        assert_eq!(recognise(b"GET /connection/uni_http_stream HTTP/1.1"), None);
        assert_eq!(recognise(b"POST /connection/sse HTTP/1.1"), None);
        assert_eq!(recognise(b"GET /connection/ssex HTTP/1.1"), None);
        assert_eq!(recognise(b"GET /connection/uni_sse"), None);
        assert_eq!(recognise(b"GET /connection/websocket HTTP/1.1"), None);
        assert_eq!(recognise(b"POST /emulation HTTP/1.1"), None);
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
