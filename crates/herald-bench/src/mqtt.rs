//! Minimal MQTT 3.1.1 codec: the packets a QoS 0 subscriber and publisher exchange
//! with a broker, plus decoders for the client-side packets so they can be tested
//! against their encoders.

/// Largest remaining length MQTT can express (4 length bytes).
pub const MAX_REMAINING: usize = 268_435_455;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MqttError {
    #[error("malformed remaining length")]
    BadLength,
    #[error("packet body too short for {0}")]
    Truncated(&'static str),
    #[error("invalid fixed-header flags {flags:#x} for packet type {kind}")]
    BadFlags { kind: u8, flags: u8 },
    #[error("invalid QoS 3 in PUBLISH")]
    BadQos,
    #[error("packet of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// A decoded packet borrowing from the input buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Connect {
        protocol: &'a [u8],
        level: u8,
        flags: u8,
        keep_alive: u16,
        client_id: &'a [u8],
    },
    Connack {
        session_present: bool,
        code: u8,
    },
    Publish {
        topic: &'a [u8],
        qos: u8,
        retain: bool,
        dup: bool,
        packet_id: Option<u16>,
        payload: &'a [u8],
    },
    Subscribe {
        packet_id: u16,
        filters: Vec<(&'a [u8], u8)>,
    },
    Suback {
        packet_id: u16,
        codes: &'a [u8],
    },
    Pingreq,
    Pingresp,
    Disconnect,
    /// Any other type (PUBACK, UNSUBACK, …): a QoS 0 client ignores it.
    Other {
        kind: u8,
    },
}

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// CONNECT with clean session, no will, no credentials.
pub fn encode_connect(out: &mut Vec<u8>, client_id: &str, keep_alive: u16) {
    let body = 10 + 2 + client_id.len();
    out.push(CONNECT << 4);
    put_remaining_length(out, body);
    put_str(out, b"MQTT");
    out.push(4); // protocol level 3.1.1
    out.push(0x02); // clean session
    out.extend_from_slice(&keep_alive.to_be_bytes());
    put_str(out, client_id.as_bytes());
}

/// SUBSCRIBE to one topic filter.
pub fn encode_subscribe(out: &mut Vec<u8>, packet_id: u16, filter: &str, qos: u8) {
    out.push((SUBSCRIBE << 4) | 0x02); // reserved flags 0010
    put_remaining_length(out, 2 + 2 + filter.len() + 1);
    out.extend_from_slice(&packet_id.to_be_bytes());
    put_str(out, filter.as_bytes());
    out.push(qos);
}

/// QoS 0 PUBLISH, not retained.
pub fn encode_publish(out: &mut Vec<u8>, topic: &str, payload: &[u8]) {
    out.push(PUBLISH << 4);
    put_remaining_length(out, 2 + topic.len() + payload.len());
    put_str(out, topic.as_bytes());
    out.extend_from_slice(payload);
}

pub fn encode_pingreq(out: &mut Vec<u8>) {
    out.extend_from_slice(&[PINGREQ << 4, 0]);
}

pub fn encode_disconnect(out: &mut Vec<u8>) {
    out.extend_from_slice(&[DISCONNECT << 4, 0]);
}

/// Reads the remaining length at `buf[1..]`: `Ok(None)` when more bytes are needed,
/// else (length, header size).
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, MqttError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        value |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, 2 + i)));
        }
    }
    Err(MqttError::BadLength)
}

/// A cursor over a packet body.
struct Body<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Body<'a> {
    fn u8(&mut self) -> Result<u8, MqttError> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or(MqttError::Truncated(self.what))?;
        self.buf = rest;
        Ok(b)
    }
    fn u16(&mut self) -> Result<u16, MqttError> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], MqttError> {
        if self.buf.len() < n {
            return Err(MqttError::Truncated(self.what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn str(&mut self) -> Result<&'a [u8], MqttError> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }
}

/// Decodes one packet from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a packet, otherwise the packet and
/// the number of bytes it used. `max_len` bounds the packet size so that a broken peer
/// cannot make the client buffer without limit.
pub fn decode(buf: &[u8], max_len: usize) -> Result<Option<(Packet<'_>, usize)>, MqttError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let Some((len, hdr)) = remaining_length(buf)? else {
        return Ok(None);
    };
    let total = hdr + len;
    if total > max_len {
        return Err(MqttError::TooLarge(total));
    }
    if buf.len() < total {
        return Ok(None);
    }
    let (kind, flags) = (first >> 4, first & 0x0f);
    let body = &buf[hdr..total];
    let fixed_flags = |expected: u8| {
        if flags == expected {
            Ok(())
        } else {
            Err(MqttError::BadFlags { kind, flags })
        }
    };
    let packet = match kind {
        CONNECT => {
            fixed_flags(0)?;
            let mut b = Body {
                buf: body,
                what: "CONNECT",
            };
            let protocol = b.str()?;
            let level = b.u8()?;
            let cflags = b.u8()?;
            let keep_alive = b.u16()?;
            let client_id = b.str()?;
            Packet::Connect {
                protocol,
                level,
                flags: cflags,
                keep_alive,
                client_id,
            }
        }
        CONNACK => {
            fixed_flags(0)?;
            let mut b = Body {
                buf: body,
                what: "CONNACK",
            };
            let ack = b.u8()?;
            let code = b.u8()?;
            Packet::Connack {
                session_present: ack & 1 == 1,
                code,
            }
        }
        PUBLISH => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                return Err(MqttError::BadQos);
            }
            let mut b = Body {
                buf: body,
                what: "PUBLISH",
            };
            let topic = b.str()?;
            let packet_id = if qos > 0 { Some(b.u16()?) } else { None };
            Packet::Publish {
                topic,
                qos,
                retain: flags & 1 == 1,
                dup: flags & 0x08 != 0,
                packet_id,
                payload: b.buf,
            }
        }
        SUBSCRIBE => {
            fixed_flags(0x02)?;
            let mut b = Body {
                buf: body,
                what: "SUBSCRIBE",
            };
            let packet_id = b.u16()?;
            let mut filters = Vec::new();
            while !b.buf.is_empty() {
                let f = b.str()?;
                let q = b.u8()?;
                filters.push((f, q));
            }
            if filters.is_empty() {
                return Err(MqttError::Truncated("SUBSCRIBE"));
            }
            Packet::Subscribe { packet_id, filters }
        }
        SUBACK => {
            fixed_flags(0)?;
            let mut b = Body {
                buf: body,
                what: "SUBACK",
            };
            let packet_id = b.u16()?;
            Packet::Suback {
                packet_id,
                codes: b.buf,
            }
        }
        PINGREQ => {
            fixed_flags(0)?;
            Packet::Pingreq
        }
        PINGRESP => {
            fixed_flags(0)?;
            Packet::Pingresp
        }
        DISCONNECT => {
            fixed_flags(0)?;
            Packet::Disconnect
        }
        other => Packet::Other { kind: other },
    };
    Ok(Some((packet, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn one(buf: &[u8]) -> Packet<'_> {
        let (p, n) = decode(buf, MAX).unwrap().unwrap();
        assert_eq!(n, buf.len());
        p
    }

    #[test]
    fn connect_bytes_match_the_spec() {
        let mut v = Vec::new();
        encode_connect(&mut v, "ab", 60);
        assert_eq!(
            v,
            [
                0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'a', b'b'
            ]
        );
        assert_eq!(
            one(&v),
            Packet::Connect {
                protocol: b"MQTT",
                level: 4,
                flags: 2,
                keep_alive: 60,
                client_id: b"ab"
            }
        );
    }

    #[test]
    fn subscribe_round_trip() {
        let mut v = Vec::new();
        encode_subscribe(&mut v, 7, "bench/1", 0);
        assert_eq!(v[0], 0x82);
        assert_eq!(
            one(&v),
            Packet::Subscribe {
                packet_id: 7,
                filters: vec![(&b"bench/1"[..], 0)]
            }
        );
    }

    #[test]
    fn publish_round_trip_and_long_lengths() {
        for size in [0usize, 1, 100, 127, 128, 16_383, 16_384, 2_097_152] {
            let payload = vec![b'x'; size];
            let mut v = Vec::new();
            encode_publish(&mut v, "t", &payload);
            let expected_hdr = match 3 + size {
                0..=127 => 2,
                128..=16_383 => 3,
                16_384..=2_097_151 => 4,
                _ => 5,
            };
            assert_eq!(v.len(), expected_hdr + 3 + size, "size {size}");
            let (p, n) = decode(&v, 8 << 20).unwrap().unwrap();
            assert_eq!(n, v.len());
            match p {
                Packet::Publish {
                    topic,
                    qos,
                    payload: got,
                    packet_id,
                    ..
                } => {
                    assert_eq!(topic, b"t");
                    assert_eq!(qos, 0);
                    assert_eq!(packet_id, None);
                    assert_eq!(got.len(), size);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn decodes_broker_packets() {
        assert_eq!(
            one(&[0x20, 2, 0, 0]),
            Packet::Connack {
                session_present: false,
                code: 0
            }
        );
        assert_eq!(
            one(&[0x20, 2, 1, 5]),
            Packet::Connack {
                session_present: true,
                code: 5
            }
        );
        assert_eq!(
            one(&[0x90, 3, 0, 9, 0x80]),
            Packet::Suback {
                packet_id: 9,
                codes: &[0x80]
            }
        );
        assert_eq!(one(&[0xd0, 0]), Packet::Pingresp);
        // QoS 1 publish carries a packet id before the payload.
        assert_eq!(
            one(&[0x32, 7, 0, 1, b'a', 0, 5, b'h', b'i']),
            Packet::Publish {
                topic: b"a",
                qos: 1,
                retain: false,
                dup: false,
                packet_id: Some(5),
                payload: b"hi"
            }
        );
        assert_eq!(one(&[0x40, 2, 0, 1]), Packet::Other { kind: 4 });
        let mut v = Vec::new();
        encode_pingreq(&mut v);
        encode_disconnect(&mut v);
        let (p, n) = decode(&v, MAX).unwrap().unwrap();
        assert_eq!((p, n), (Packet::Pingreq, 2));
        assert_eq!(one(&v[2..]), Packet::Disconnect);
    }

    #[test]
    fn partial_input_waits_for_more() {
        let mut v = Vec::new();
        encode_publish(&mut v, "topic", &[1u8; 300]);
        for cut in 0..v.len() {
            assert_eq!(decode(&v[..cut], MAX).unwrap(), None, "cut {cut}");
        }
        assert!(decode(&v, MAX).unwrap().is_some());
    }

    #[test]
    fn rejects_malformed_packets() {
        assert_eq!(
            decode(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], MAX),
            Err(MqttError::BadLength)
        );
        assert_eq!(decode(&[0x36, 0], MAX), Err(MqttError::BadQos));
        assert_eq!(
            decode(&[0x20, 1, 0], MAX),
            Err(MqttError::Truncated("CONNACK"))
        );
        assert_eq!(
            decode(&[0x30, 1, 0], MAX),
            Err(MqttError::Truncated("PUBLISH"))
        );
        assert_eq!(
            decode(&[0x80, 3, 0, 1, 0], MAX),
            Err(MqttError::BadFlags { kind: 8, flags: 0 })
        );
        assert!(matches!(
            decode(&[0x30, 0xff, 0x7f], 1000),
            Err(MqttError::TooLarge(_))
        ));
    }
}
