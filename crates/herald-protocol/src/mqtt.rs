//! MQTT packets as Herald reads and writes them, the same for MQTT 3.1.1 and 5.0: the
//! `rmqtt-codec` crate parses and serialises the wire format; this module reduces its two
//! packet families to the fields Herald acts on, and builds the packets it sends. What the
//! packets mean to Herald (channels, QoS, sessions) is the MQTT front end's, in the server.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use rmqtt_codec::types::{Publish as WirePublish, QoS};
use rmqtt_codec::version::{ProtocolVersion, VersionCodec};
use rmqtt_codec::{v3, v5};
use tokio_util::codec::{Decoder, Encoder};

/// Largest remaining length the fixed header can express (four length bytes).
pub const MAX_REMAINING: usize = 268_435_455;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("packet of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("unsupported protocol version")]
    UnsupportedVersion,
    #[error("the first packet is not CONNECT")]
    NotConnect,
}

/// Where one packet ends in `buf`: `Ok(Some(len))` for a whole packet, `Ok(None)` when more
/// bytes are needed. A declared length over `max` is refused before its body is read.
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, PacketError> {
    let mut remaining: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let total = remaining + 2 + i;
            if remaining > max {
                return Err(PacketError::TooLarge {
                    size: remaining,
                    max,
                });
            }
            return Ok((buf.len() >= total).then_some(total));
        }
    }
    Err(PacketError::Malformed(
        "remaining length over four bytes".into(),
    ))
}

/// The protocol a client speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

impl Version {
    pub fn name(self) -> &'static str {
        match self {
            Version::V311 => "3.1.1",
            Version::V5 => "5.0",
        }
    }
}

/// A will message.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
}

#[derive(Debug, Clone)]
pub struct ConnectIn {
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub password: Option<Bytes>,
    /// MQTT 5 session expiry interval; for 3.1.1, `None`.
    pub session_expiry: Option<u32>,
    /// MQTT 5 receive maximum: QoS 1 deliveries the client takes unacknowledged.
    pub receive_max: Option<u16>,
    /// MQTT 5 maximum packet size the client accepts.
    pub max_packet_size: Option<u32>,
    pub auth_method: bool,
    pub will: Option<Will>,
}

#[derive(Debug, Clone)]
pub struct Filter {
    pub topic: String,
    pub qos: u8,
    /// MQTT 5 retain handling 2: no retained message at subscribe.
    pub no_retained: bool,
}

/// A packet from a client, in the terms Herald acts on.
#[derive(Debug, Clone)]
pub enum In {
    Connect(Box<ConnectIn>),
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        packet_id: Option<u16>,
        dup: bool,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        packet_id: u16,
        filters: Vec<Filter>,
    },
    Unsubscribe {
        packet_id: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        /// MQTT 5 reason 0x04: disconnect and publish the will.
        with_will: bool,
        session_expiry: Option<u32>,
    },
    Auth,
    /// A packet only a server sends.
    Unexpected,
}

/// Reads the packets of one client: the first is CONNECT and fixes the version.
#[derive(Debug)]
pub struct Reader {
    codec: Codec,
    max: usize,
}

#[derive(Debug)]
enum Codec {
    Unknown,
    V3(v3::Codec),
    V5(v5::Codec),
}

impl Reader {
    pub fn new(max: usize) -> Self {
        Self {
            codec: Codec::Unknown,
            max,
        }
    }

    pub fn version(&self) -> Option<Version> {
        match self.codec {
            Codec::Unknown => None,
            Codec::V3(_) => Some(Version::V311),
            Codec::V5(_) => Some(Version::V5),
        }
    }

    /// Decodes one whole packet (as [`frame_len`] cut it).
    pub fn decode(&mut self, packet: &[u8]) -> Result<In, PacketError> {
        let max = u32::try_from(self.max).unwrap_or(u32::MAX);
        let mut buf = BytesMut::from(packet);
        if let Codec::Unknown = self.codec {
            let version = match VersionCodec.decode(&mut buf) {
                Ok(Some(v)) => v,
                Ok(None) => return Err(PacketError::Malformed("truncated CONNECT".into())),
                Err(rmqtt_codec::error::DecodeError::UnsupportedPacketType) => {
                    return Err(PacketError::NotConnect);
                }
                Err(rmqtt_codec::error::DecodeError::InvalidProtocol) => {
                    return Err(PacketError::UnsupportedVersion);
                }
                Err(e) => return Err(PacketError::Malformed(e.to_string())),
            };
            self.codec = match version {
                ProtocolVersion::MQTT3 => Codec::V3(v3::Codec::new(max)),
                ProtocolVersion::MQTT5 => Codec::V5(v5::Codec::new(max, 0)),
            };
        }
        let malformed = |e: rmqtt_codec::error::DecodeError| PacketError::Malformed(e.to_string());
        match &mut self.codec {
            Codec::Unknown => Err(PacketError::NotConnect),
            Codec::V3(c) => match c.decode(&mut buf).map_err(malformed)? {
                Some((p, _)) => Ok(from_v3(p)),
                None => Err(PacketError::Malformed("truncated packet".into())),
            },
            Codec::V5(c) => match c.decode(&mut buf).map_err(malformed)? {
                Some((p, _)) => Ok(from_v5(p)),
                None => Err(PacketError::Malformed("truncated packet".into())),
            },
        }
    }
}

fn qos(q: QoS) -> u8 {
    q.value()
}

fn will(topic: &str, payload: Bytes, q: QoS) -> Will {
    Will {
        topic: topic.to_string(),
        payload,
        qos: qos(q),
    }
}

/// A PUBLISH (one type in both versions; MQTT 5 properties are not used).
fn publish_in(p: WirePublish) -> In {
    In::Publish {
        topic: p.topic.to_string(),
        payload: p.payload,
        qos: qos(p.qos),
        packet_id: p.packet_id.map(NonZeroU16::get),
        dup: p.dup,
    }
}

fn from_v3(p: v3::Packet) -> In {
    use v3::Packet as P;
    match p {
        P::Connect(c) => In::Connect(Box::new(ConnectIn {
            client_id: c.client_id.to_string(),
            clean: c.clean_session,
            keep_alive: c.keep_alive,
            password: c.password,
            session_expiry: None,
            receive_max: None,
            max_packet_size: None,
            auth_method: false,
            will: c.last_will.map(|w| will(&w.topic, w.message, w.qos)),
        })),
        P::Publish(p) => publish_in(*p),
        P::PublishAck { packet_id } => In::PubAck(packet_id.get()),
        P::PublishReceived { packet_id } => In::PubRec(packet_id.get()),
        P::PublishRelease { packet_id } => In::PubRel(packet_id.get()),
        P::PublishComplete { packet_id } => In::PubComp(packet_id.get()),
        P::Subscribe {
            packet_id,
            topic_filters,
        } => In::Subscribe {
            packet_id: packet_id.get(),
            filters: topic_filters
                .into_iter()
                .map(|(t, q)| Filter {
                    topic: t.to_string(),
                    qos: qos(q),
                    no_retained: false,
                })
                .collect(),
        },
        P::Unsubscribe {
            packet_id,
            topic_filters,
        } => In::Unsubscribe {
            packet_id: packet_id.get(),
            filters: topic_filters.into_iter().map(|t| t.to_string()).collect(),
        },
        P::PingRequest => In::PingReq,
        P::Disconnect => In::Disconnect {
            with_will: false,
            session_expiry: None,
        },
        P::ConnectAck(_) | P::SubscribeAck { .. } | P::UnsubscribeAck { .. } | P::PingResponse => {
            In::Unexpected
        }
    }
}

fn from_v5(p: v5::Packet) -> In {
    use v5::Packet as P;
    match p {
        P::Connect(c) => In::Connect(Box::new(ConnectIn {
            client_id: c.client_id.to_string(),
            clean: c.clean_start,
            keep_alive: c.keep_alive,
            password: c.password,
            session_expiry: Some(c.session_expiry_interval_secs),
            receive_max: c.receive_max.map(NonZeroU16::get),
            max_packet_size: c.max_packet_size.map(NonZeroU32::get),
            auth_method: c.auth_method.is_some(),
            will: c.last_will.map(|w| will(&w.topic, w.message, w.qos)),
        })),
        P::Publish(p) => publish_in(*p),
        P::PublishAck(a) => In::PubAck(a.packet_id.get()),
        P::PublishReceived(a) => In::PubRec(a.packet_id.get()),
        P::PublishRelease(a) => In::PubRel(a.packet_id.get()),
        P::PublishComplete(a) => In::PubComp(a.packet_id.get()),
        P::Subscribe(s) => In::Subscribe {
            packet_id: s.packet_id.get(),
            filters: s
                .topic_filters
                .into_iter()
                .map(|(t, o)| Filter {
                    topic: t.to_string(),
                    qos: qos(o.qos),
                    no_retained: o.retain_handling == v5::RetainHandling::NoAtSubscribe,
                })
                .collect(),
        },
        P::Unsubscribe(u) => In::Unsubscribe {
            packet_id: u.packet_id.get(),
            filters: u.topic_filters.into_iter().map(|t| t.to_string()).collect(),
        },
        P::PingRequest => In::PingReq,
        P::Disconnect(d) => In::Disconnect {
            with_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
            session_expiry: d.session_expiry_interval_secs,
        },
        P::Auth(_) => In::Auth,
        P::ConnectAck(_) | P::SubscribeAck(_) | P::UnsubscribeAck(_) | P::PingResponse => {
            In::Unexpected
        }
    }
}

/// What the CONNACK of an accepted MQTT 5 connection announces.
#[derive(Debug, Clone, Default)]
pub struct Accepted {
    pub session_present: bool,
    pub assigned_client_id: Option<String>,
    pub receive_max: u16,
    pub max_packet_size: u32,
    pub session_expiry: Option<u32>,
}

/// Builds the packets Herald sends, in the client's version.
#[derive(Debug, Clone, Copy)]
pub struct Writer(pub Version);

/// MQTT 5 reason codes as the codec's enum, `otherwise` for a code it does not know.
fn reasons<T: TryFrom<u8> + Copy>(codes: &[u8], otherwise: T) -> Vec<T> {
    codes
        .iter()
        .map(|&c| T::try_from(c).unwrap_or(otherwise))
        .collect()
}

fn nz(id: u16) -> NonZeroU16 {
    NonZeroU16::new(id).unwrap_or(NonZeroU16::MIN)
}

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

impl Writer {
    // Encoding fails only for a QoS > 0 publish without a packet id, which no method here
    // builds; such a packet would be written as nothing.
    fn v3(self, p: v3::Packet) -> Bytes {
        let mut buf = BytesMut::new();
        match v3::Codec::new(0).encode(p, &mut buf) {
            Ok(()) => buf.freeze(),
            Err(_) => Bytes::new(),
        }
    }

    fn v5(self, p: v5::Packet) -> Bytes {
        let mut buf = BytesMut::new();
        match v5::Codec::new(0, 0).encode(p, &mut buf) {
            Ok(()) => buf.freeze(),
            Err(_) => Bytes::new(),
        }
    }

    pub fn connack_accepted(self, a: &Accepted) -> Bytes {
        match self.0 {
            Version::V311 => self.v3(v3::Packet::ConnectAck(v3::ConnectAck {
                return_code: v3::ConnectAckReason::ConnectionAccepted,
                session_present: a.session_present,
            })),
            Version::V5 => self.v5(v5::Packet::ConnectAck(Box::new(v5::ConnectAck {
                session_present: a.session_present,
                reason_code: v5::ConnectAckReason::Success,
                session_expiry_interval_secs: a.session_expiry,
                receive_max: NonZeroU16::new(a.receive_max).unwrap_or(NonZeroU16::MAX),
                max_qos: QoS::AtLeastOnce,
                max_packet_size: Some(a.max_packet_size),
                assigned_client_id: a.assigned_client_id.clone().map(ByteString::from),
                topic_alias_max: 0,
                retain_available: true,
                wildcard_subscription_available: false,
                subscription_identifiers_available: false,
                shared_subscription_available: false,
                ..Default::default()
            }))),
        }
    }

    /// A refused CONNACK: `(v5 reason, v3 return code)`.
    pub fn connack_refused(self, (v5_reason, v3_code): (u8, u8), reason: &str) -> Bytes {
        match self.0 {
            Version::V311 => Bytes::from(vec![0x20, 0x02, 0x00, v3_code]),
            Version::V5 => self.v5(v5::Packet::ConnectAck(Box::new(v5::ConnectAck {
                reason_code: v5::ConnectAckReason::try_from(v5_reason)
                    .unwrap_or(v5::ConnectAckReason::UnspecifiedError),
                reason_string: Some(ByteString::from(reason)),
                ..Default::default()
            }))),
        }
    }

    pub fn publish(
        self,
        topic: &str,
        payload: Bytes,
        qos: u8,
        packet_id: Option<u16>,
        retain: bool,
        dup: bool,
    ) -> Bytes {
        let p = WirePublish {
            dup,
            retain,
            qos: qos_of(qos),
            topic: ByteString::from(topic),
            packet_id: packet_id.map(nz),
            payload,
            properties: None,
        };
        match self.0 {
            Version::V311 => self.v3(v3::Packet::Publish(Box::new(p))),
            Version::V5 => self.v5(v5::Packet::Publish(Box::new(p))),
        }
    }

    /// PUBACK (`rec` false) or PUBREC with an MQTT 5 reason.
    pub fn puback(self, packet_id: u16, rec: bool, reason: u8) -> Bytes {
        match self.0 {
            Version::V311 => {
                let packet_id = nz(packet_id);
                self.v3(match rec {
                    false => v3::Packet::PublishAck { packet_id },
                    true => v3::Packet::PublishReceived { packet_id },
                })
            }
            Version::V5 => {
                let ack = v5::PublishAck {
                    packet_id: nz(packet_id),
                    reason_code: v5::PublishAckReason::try_from(reason)
                        .unwrap_or(v5::PublishAckReason::UnspecifiedError),
                    properties: Vec::new(),
                    reason_string: None,
                };
                self.v5(match rec {
                    false => v5::Packet::PublishAck(ack),
                    true => v5::Packet::PublishReceived(ack),
                })
            }
        }
    }

    pub fn pubcomp(self, packet_id: u16) -> Bytes {
        match self.0 {
            Version::V311 => self.v3(v3::Packet::PublishComplete {
                packet_id: nz(packet_id),
            }),
            Version::V5 => self.v5(v5::Packet::PublishComplete(v5::PublishAck2 {
                packet_id: nz(packet_id),
                reason_code: v5::PublishAck2Reason::Success,
                properties: Vec::new(),
                reason_string: None,
            })),
        }
    }

    /// SUBACK with one code per filter: the granted QoS, or a failure (MQTT 5 reason; any
    /// failure is 0x80 in 3.1.1).
    pub fn suback(self, packet_id: u16, codes: &[u8]) -> Bytes {
        match self.0 {
            Version::V311 => self.v3(v3::Packet::SubscribeAck {
                packet_id: nz(packet_id),
                status: codes
                    .iter()
                    .map(|&c| match c {
                        0..=2 => v3::SubscribeReturnCode::Success(qos_of(c)),
                        _ => v3::SubscribeReturnCode::Failure,
                    })
                    .collect(),
            }),
            Version::V5 => self.v5(v5::Packet::SubscribeAck(v5::SubscribeAck {
                packet_id: nz(packet_id),
                properties: Vec::new(),
                reason_string: None,
                status: reasons(codes, v5::SubscribeAckReason::UnspecifiedError),
            })),
        }
    }

    pub fn unsuback(self, packet_id: u16, codes: &[u8]) -> Bytes {
        match self.0 {
            Version::V311 => self.v3(v3::Packet::UnsubscribeAck {
                packet_id: nz(packet_id),
            }),
            Version::V5 => self.v5(v5::Packet::UnsubscribeAck(v5::UnsubscribeAck {
                packet_id: nz(packet_id),
                properties: Vec::new(),
                reason_string: None,
                status: reasons(codes, v5::UnsubscribeAckReason::Success),
            })),
        }
    }

    pub fn pingresp(self) -> Bytes {
        Bytes::from_static(&[0xd0, 0x00])
    }

    /// The server's DISCONNECT (MQTT 5 only; 3.1.1 closes the connection without one).
    pub fn disconnect(self, reason: u8, text: &str) -> Option<Bytes> {
        match self.0 {
            Version::V311 => None,
            Version::V5 => Some(
                self.v5(v5::Packet::Disconnect(v5::Disconnect {
                    reason_code: v5::DisconnectReasonCode::try_from(reason)
                        .unwrap_or(v5::DisconnectReasonCode::UnspecifiedError),
                    session_expiry_interval_secs: None,
                    server_reference: None,
                    reason_string: (!text.is_empty()).then(|| ByteString::from(text)),
                    user_properties: Vec::new(),
                })),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3_connect(client: &str, password: Option<&str>, clean: bool) -> Bytes {
        let mut buf = BytesMut::new();
        v3::Codec::new(0)
            .encode(
                v3::Packet::Connect(Box::new(v3::Connect {
                    clean_session: clean,
                    keep_alive: 30,
                    client_id: client.into(),
                    password: password.map(|p| Bytes::copy_from_slice(p.as_bytes())),
                    ..Default::default()
                })),
                &mut buf,
            )
            .expect("encodes");
        buf.freeze()
    }

    #[test]
    fn frames_whole_packets_only() {
        let p = v3_connect("dev", Some("tok"), true);
        assert_eq!(frame_len(&p, 1024), Ok(Some(p.len())));
        assert_eq!(frame_len(&p[..p.len() - 1], 1024), Ok(None));
        assert_eq!(frame_len(&p[..1], 1024), Ok(None));
        // A declared length over the limit is refused from the header alone.
        assert!(matches!(
            frame_len(&[0x30, 0xff, 0xff, 0x7f], 1024),
            Err(PacketError::TooLarge { .. })
        ));
        assert!(matches!(
            frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
            Err(PacketError::Malformed(_))
        ));
    }

    #[test]
    fn reads_a_311_connect_and_fixes_the_version() {
        let mut r = Reader::new(1024);
        let In::Connect(c) = r
            .decode(&v3_connect("dev", Some("tok"), false))
            .expect("decodes")
        else {
            panic!("not a connect");
        };
        assert_eq!(c.client_id, "dev");
        assert!(!c.clean);
        assert_eq!(c.password.as_deref(), Some(&b"tok"[..]));
        assert_eq!(r.version(), Some(Version::V311));
        assert!(matches!(r.decode(&[0xc0, 0x00]), Ok(In::PingReq)));
    }

    #[test]
    fn refuses_a_first_packet_that_is_not_connect() {
        assert_eq!(
            Reader::new(1024).decode(&[0xc0, 0x00]).err(),
            Some(PacketError::NotConnect)
        );
    }

    #[test]
    fn writes_packets_the_codec_reads_back() {
        for version in [Version::V311, Version::V5] {
            let w = Writer(version);
            let bytes = w.publish(
                "news",
                Bytes::from_static(b"\x00\xff"),
                1,
                Some(7),
                true,
                false,
            );
            let mut buf = BytesMut::from(&bytes[..]);
            let publish = match version {
                Version::V311 => match v3::Codec::new(0).decode(&mut buf) {
                    Ok(Some((v3::Packet::Publish(p), _))) => p,
                    other => panic!("{other:?}"),
                },
                Version::V5 => match v5::Codec::new(0, 0).decode(&mut buf) {
                    Ok(Some((v5::Packet::Publish(p), _))) => p,
                    other => panic!("{other:?}"),
                },
            };
            assert_eq!(&publish.topic[..], "news");
            assert_eq!(&publish.payload[..], b"\x00\xff");
            assert_eq!(publish.packet_id.map(NonZeroU16::get), Some(7));
            assert!(publish.retain);
        }
    }
}
