//! A Protobuf client of the client protocol: subprotocol `centrifuge-protobuf`, binary
//! frames of length-prefixed messages, on tokio-tungstenite.

use std::collections::VecDeque;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use herald_protocol::proto::{self, Command, Reply};
use herald_server::Server;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{WAIT, token};

pub struct ProtoClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pending: VecDeque<Reply>,
    /// The subprotocol the server chose in its 101 response.
    pub subprotocol: Option<String>,
    /// Server pings seen (and answered).
    pub pings: usize,
}

impl ProtoClient {
    pub async fn open(server: &Server) -> Result<Self> {
        let url = format!("ws://{}/connection/websocket", server.addr);
        let mut req = url.into_client_request()?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "centrifuge-protobuf".parse().context("header value")?,
        );
        let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
        let subprotocol = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(Self {
            ws,
            pending: VecDeque::new(),
            subprotocol,
            pings: 0,
        })
    }

    /// Opens and connects with a token for `user`.
    pub async fn connect(server: &Server, user: &str) -> Result<(Self, Reply)> {
        let mut c = Self::open(server).await?;
        let r = c
            .call(Command {
                id: 1,
                connect: Some(proto::ConnectRequest {
                    token: token(user, 3600),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?;
        if r.connect.is_none() {
            bail!("connect failed: {r:?}");
        }
        Ok((c, r))
    }

    /// Sends these commands in one binary frame.
    pub async fn send(&mut self, commands: &[Command]) -> Result<()> {
        let frame = proto::concat(commands.iter().map(proto::encode_command));
        self.send_bytes(frame.to_vec()).await
    }

    pub async fn send_bytes(&mut self, frame: Vec<u8>) -> Result<()> {
        self.ws.send(Message::binary(frame)).await?;
        Ok(())
    }

    /// The next reply or push (server pings are answered with an empty command and skipped).
    pub async fn next(&mut self) -> Result<Reply> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                if r == Reply::default() {
                    self.pings += 1;
                    self.send(&[Command::default()]).await?;
                    continue;
                }
                return Ok(r);
            }
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .context("timed out waiting for the server")?
                .ok_or_else(|| anyhow!("connection ended"))??;
            match msg {
                Message::Binary(b) => {
                    for r in proto::decode_replies(&b) {
                        self.pending.push_back(r?);
                    }
                }
                Message::Text(t) => bail!("a text frame on a Protobuf connection: {t}"),
                Message::Close(f) => bail!(
                    "closed: {:?}",
                    f.map(|CloseFrame { code, reason }| (u16::from(code), reason.to_string()))
                ),
                _ => {}
            }
        }
    }

    /// Waits for the reply with this id, keeping pushes that come first.
    pub async fn reply(&mut self, id: u32) -> Result<Reply> {
        let mut skipped = VecDeque::new();
        loop {
            let r = self.next().await?;
            if r.id == id {
                for s in skipped.into_iter().rev() {
                    self.pending.push_front(s);
                }
                return Ok(r);
            }
            skipped.push_back(r);
        }
    }

    /// Sends one command and waits for its reply.
    pub async fn call(&mut self, c: Command) -> Result<Reply> {
        let id = c.id;
        self.send(&[c]).await?;
        self.reply(id).await
    }

    /// The next publication push of `channel`.
    pub async fn publication(&mut self, channel: &str) -> Result<proto::Publication> {
        loop {
            let r = self.next().await?;
            if let Some(push) = r.push
                && push.channel == channel
                && let Some(p) = push.r#pub
            {
                return Ok(p);
            }
        }
    }

    /// Reads until the server closes; returns the close code and reason.
    pub async fn closed(&mut self) -> Result<(u16, String)> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(f)))) => {
                    return Ok(f
                        .map(|CloseFrame { code, reason }| (u16::from(code), reason.to_string()))
                        .unwrap_or((1005, String::new())));
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => bail!("connection broke without a close frame: {e}"),
                Ok(None) => bail!("connection ended without a close frame"),
                Err(_) => bail!("no close within {WAIT:?}"),
            }
        }
    }
}

/// A subscribe command.
pub fn subscribe(id: u32, channel: &str) -> Command {
    Command {
        id,
        subscribe: Some(proto::SubscribeRequest {
            channel: channel.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A publish command with raw bytes.
pub fn publish(id: u32, channel: &str, data: &[u8]) -> Command {
    Command {
        id,
        publish: Some(proto::PublishRequest {
            channel: channel.into(),
            data: data.to_vec(),
        }),
        ..Default::default()
    }
}
