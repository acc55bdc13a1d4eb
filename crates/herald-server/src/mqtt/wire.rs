//! The MQTT wire: packets framed from a byte stream (TCP, TLS, or the binary messages of a
//! WebSocket with subprotocol `mqtt`), and the session's queued frames written as MQTT
//! packets through the [`Link`].

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use herald_core::conn::ConnHandle;
use herald_protocol::Disconnect;
use herald_protocol::codes::mqtt::{self as codes, v5};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::handler::TAKEN_OVER;
use super::link::Link;
use crate::transport::driver::{Received, Wire};
use crate::transport::websocket::Socket;
use crate::transport::websocket::codec::{Kind, WsError};
use crate::transport::websocket::socket::Read;
use herald_protocol::mqtt::frame_len;

/// Read buffer a connection starts with; it grows for larger packets.
const READ_BUFFER: usize = 256;

/// Moves bytes for MQTT.
pub trait Carrier: Send + 'static {
    /// Appends what arrived to `buf`; 0 when the client closed. Cancel-safe.
    fn read(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send;
    fn write(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}

/// A TCP or TLS stream.
pub struct Stream<S>(pub S);

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Carrier for Stream<S> {
    async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        if buf.capacity() == buf.len() {
            buf.reserve(READ_BUFFER);
        }
        self.0.read_buf(buf).await
    }

    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.0.write_all(&data).await?;
        self.0.flush().await
    }

    async fn shutdown(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

/// MQTT over WebSocket: the byte stream is the concatenated binary messages (MQTT 5.0
/// §6: a message may hold part of a packet or several). The second field is why the
/// socket refused the client's bytes, for the close frame.
pub struct WebSocket(pub Socket, pub Option<WsError>);

/// The close code of a normal end.
const CLOSE_NORMAL: u16 = 1000;

impl Carrier for WebSocket {
    async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            match self.0.recv().await {
                Read::Message(Kind::Binary, data) => {
                    buf.extend_from_slice(&data);
                    if !data.is_empty() {
                        return Ok(data.len());
                    }
                }
                Read::Message(Kind::Text, _) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket is binary",
                    ));
                }
                Read::Closed => return Ok(0),
                Read::Refused(e) => {
                    self.1 = Some(e);
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "websocket refused",
                    ));
                }
            }
        }
    }

    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.0.send([(Kind::Binary, data)]).await
    }

    async fn shutdown(&mut self) {
        match self.1.take() {
            Some(e) => self.0.finish(Some(&e)).await,
            None => self.0.close(CLOSE_NORMAL, "").await,
        }
    }
}

pub struct MqttWire<C> {
    io: C,
    buf: BytesMut,
    link: Arc<Mutex<Link>>,
    conn: Arc<ConnHandle>,
    max_packet: usize,
    /// The bytes could not be framed: nothing more is read.
    failed: bool,
}

impl<C: Carrier> MqttWire<C> {
    pub fn new(io: C, link: Arc<Mutex<Link>>, conn: Arc<ConnHandle>, max_packet: usize) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            link,
            conn,
            max_packet,
            failed: false,
        }
    }

    async fn write_all(&mut self, packets: Vec<Bytes>) -> Result<usize, ()> {
        let data = match packets.len() {
            0 => return Ok(0),
            1 => packets.into_iter().next().unwrap_or_default(),
            _ => {
                let mut b = BytesMut::with_capacity(packets.iter().map(Bytes::len).sum());
                for p in packets {
                    b.extend_from_slice(&p);
                }
                b.freeze()
            }
        };
        let n = data.len();
        self.io.write(data).await.map(|()| n).map_err(|_| ())
    }
}

impl<C: Carrier> Wire for MqttWire<C> {
    const ABANDON_SAFE: bool = false;

    async fn recv(&mut self) -> Received {
        loop {
            if self.failed {
                return std::future::pending().await;
            }
            match frame_len(&self.buf, self.max_packet) {
                Ok(Some(n)) => {
                    let packet = self.buf.split_to(n).freeze();
                    if self.buf.is_empty() {
                        // The packet alone keeps the allocation, freed once it is handled: an
                        // idle connection holds no read buffer.
                        self.buf = BytesMut::new();
                    }
                    return Received::Message(packet);
                }
                Ok(None) => {}
                Err(e) => {
                    // Handed to the handler as an empty message, which closes with the
                    // error's reason.
                    self.failed = true;
                    self.link.lock().read_error = Some(e);
                    return Received::Message(Bytes::new());
                }
            }
            match self.io.read(&mut self.buf).await {
                Ok(0) | Err(_) => return Received::Gone,
                Ok(_) => {}
            }
        }
    }

    async fn send(&mut self, batch: VecDeque<Bytes>) -> Result<usize, ()> {
        let packets = self.link.lock().translate(batch, &self.conn);
        self.write_all(packets).await
    }

    async fn goodbye(&mut self, pending: VecDeque<Bytes>, _push: Bytes, d: &Disconnect) {
        let packets = {
            let mut link = self.link.lock();
            let mut out = link.translate(pending, &self.conn);
            if !link.client_left && link.connect_seen {
                if !link.connack_sent {
                    out.push(
                        link.writer
                            .connack_refused(codes::connack_for_disconnect(d.code), &d.reason),
                    );
                } else {
                    let reason = link.reason.unwrap_or(match d.reason.as_str() {
                        TAKEN_OVER => v5::SESSION_TAKEN_OVER,
                        _ => codes::disconnect_v5(d.code),
                    });
                    out.extend(link.writer.disconnect(reason, &d.reason));
                }
            }
            out
        };
        let _ = self.write_all(packets).await;
        self.io.shutdown().await;
    }

    async fn farewell(&mut self) {
        self.io.shutdown().await;
    }
}
