//! NATS client protocol: the few encoders a benchmark client needs and an
//! incremental parser for what the server sends (INFO, MSG, HMSG, PING, PONG, +OK, -ERR).

use std::io::Write as _;

/// Control lines longer than this are refused (INFO is the longest, ~1 KiB).
const MAX_CONTROL_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatsError {
    #[error("control line longer than {MAX_CONTROL_LINE} bytes")]
    LineTooLong,
    #[error("unknown operation {0:?}")]
    UnknownOp(String),
    #[error("malformed {0} arguments")]
    BadArgs(&'static str),
    #[error("message payload not followed by CRLF")]
    MissingCrlf,
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// One server-to-client protocol message, borrowing from the input buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsEvent<'a> {
    Info(&'a [u8]),
    Msg {
        subject: &'a [u8],
        sid: u64,
        reply: Option<&'a [u8]>,
        /// For HMSG, the part after the headers.
        payload: &'a [u8],
    },
    Ping,
    Pong,
    Ok,
    Err(&'a [u8]),
}

pub const PING: &[u8] = b"PING\r\n";
pub const PONG: &[u8] = b"PONG\r\n";

/// CONNECT without echo of our own publications and without verbose +OK acks.
pub fn encode_connect(out: &mut Vec<u8>, name: &str) {
    let _ = write!(
        out,
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"tls_required\":false,\"name\":{},\"lang\":\"rust\",\"version\":\"{}\",\"protocol\":1,\"echo\":false,\"headers\":false,\"no_responders\":false}}\r\n",
        serde_json::Value::from(name),
        env!("CARGO_PKG_VERSION"),
    );
}

pub fn encode_sub(out: &mut Vec<u8>, subject: &str, sid: u64) {
    let _ = write!(out, "SUB {subject} {sid}\r\n");
}

pub fn encode_pub(out: &mut Vec<u8>, subject: &str, payload: &[u8]) {
    let _ = write!(out, "PUB {subject} {}\r\n", payload.len());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

fn parse_u64(tok: &[u8], what: &'static str) -> Result<u64, NatsError> {
    if tok.is_empty() || tok.len() > 19 || !tok.iter().all(u8::is_ascii_digit) {
        return Err(NatsError::BadArgs(what));
    }
    Ok(tok
        .iter()
        .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0')))
}

/// Parses one message from the front of `buf`: `Ok(None)` when more bytes are
/// needed, else the event and the number of bytes it used.
pub fn parse(buf: &[u8], max_payload: usize) -> Result<Option<(NatsEvent<'_>, usize)>, NatsError> {
    let scan = &buf[..buf.len().min(MAX_CONTROL_LINE)];
    let Some(eol) = scan.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= MAX_CONTROL_LINE {
            return Err(NatsError::LineTooLong);
        }
        return Ok(None);
    };
    let line = &buf[..eol];
    let after_line = eol + 2;
    let (op, rest) = match line.iter().position(|b| *b == b' ' || *b == b'\t') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &line[line.len()..]),
    };
    let is = |name: &[u8]| op.eq_ignore_ascii_case(name);
    if is(b"PING") {
        return Ok(Some((NatsEvent::Ping, after_line)));
    }
    if is(b"PONG") {
        return Ok(Some((NatsEvent::Pong, after_line)));
    }
    if is(b"+OK") {
        return Ok(Some((NatsEvent::Ok, after_line)));
    }
    if is(b"-ERR") {
        return Ok(Some((NatsEvent::Err(trim(rest)), after_line)));
    }
    if is(b"INFO") {
        return Ok(Some((NatsEvent::Info(trim(rest)), after_line)));
    }
    let headers = if is(b"MSG") {
        false
    } else if is(b"HMSG") {
        true
    } else {
        return Err(NatsError::UnknownOp(
            String::from_utf8_lossy(&op[..op.len().min(32)]).into_owned(),
        ));
    };
    let what = if headers { "HMSG" } else { "MSG" };
    let args: Vec<&[u8]> = rest
        .split(|b| *b == b' ' || *b == b'\t')
        .filter(|t| !t.is_empty())
        .collect();
    let fixed = if headers { 4 } else { 3 };
    let (subject, sid, reply, hdr_len, total) = match args.len() {
        n if n == fixed || n == fixed + 1 => {
            let reply = (n == fixed + 1).then(|| args[2]);
            let total = parse_u64(args[n - 1], what)? as usize;
            let hdr_len = if headers {
                parse_u64(args[n - 2], what)? as usize
            } else {
                0
            };
            (args[0], parse_u64(args[1], what)?, reply, hdr_len, total)
        }
        _ => return Err(NatsError::BadArgs(what)),
    };
    if hdr_len > total {
        return Err(NatsError::BadArgs(what));
    }
    if total > max_payload {
        return Err(NatsError::TooLarge(total));
    }
    let end = after_line + total;
    if buf.len() < end + 2 {
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err(NatsError::MissingCrlf);
    }
    Ok(Some((
        NatsEvent::Msg {
            subject,
            sid,
            reply,
            payload: &buf[after_line + hdr_len..end],
        },
        end + 2,
    )))
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &s[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn all(mut buf: &[u8]) -> Vec<NatsEvent<'_>> {
        let mut out = Vec::new();
        while let Some((ev, n)) = parse(buf, MAX).unwrap() {
            out.push(ev);
            buf = &buf[n..];
        }
        assert!(
            buf.is_empty(),
            "left over: {:?}",
            String::from_utf8_lossy(buf)
        );
        out
    }

    #[test]
    fn parses_server_messages() {
        let input = b"INFO {\"server_id\":\"x\",\"max_payload\":1048576}\r\nPING\r\npong\r\n+OK\r\n-ERR 'Unknown Subject'\r\nMSG bench-1 7 5\r\nhello\r\nMSG a.b 1 reply.to 0\r\n\r\nHMSG s 2 12 14\r\nNATS/1.0\r\n\r\nhi\r\n";
        let ev = all(input);
        assert_eq!(
            ev,
            vec![
                NatsEvent::Info(b"{\"server_id\":\"x\",\"max_payload\":1048576}"),
                NatsEvent::Ping,
                NatsEvent::Pong,
                NatsEvent::Ok,
                NatsEvent::Err(b"'Unknown Subject'"),
                NatsEvent::Msg {
                    subject: b"bench-1",
                    sid: 7,
                    reply: None,
                    payload: b"hello"
                },
                NatsEvent::Msg {
                    subject: b"a.b",
                    sid: 1,
                    reply: Some(b"reply.to"),
                    payload: b""
                },
                NatsEvent::Msg {
                    subject: b"s",
                    sid: 2,
                    reply: None,
                    payload: b"hi"
                },
            ]
        );
    }

    #[test]
    fn payload_may_contain_crlf_and_split_anywhere() {
        let msg = b"MSG subj 3 6\r\na\r\nb\r\n\r\nPING\r\n";
        for cut in 0..msg.len() {
            let first = parse(&msg[..cut], MAX).unwrap();
            if cut < 22 {
                assert_eq!(first, None, "cut {cut}");
            }
        }
        assert_eq!(
            all(msg),
            vec![
                NatsEvent::Msg {
                    subject: b"subj",
                    sid: 3,
                    reply: None,
                    payload: b"a\r\nb\r\n"
                },
                NatsEvent::Ping
            ]
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            parse(b"HELLO\r\n", MAX),
            Err(NatsError::UnknownOp(_))
        ));
        assert_eq!(
            parse(b"MSG a b 1\r\nx\r\n", MAX),
            Err(NatsError::BadArgs("MSG"))
        );
        assert_eq!(parse(b"MSG a 1\r\n", MAX), Err(NatsError::BadArgs("MSG")));
        assert_eq!(
            parse(b"MSG a 1 3\r\nxyzAB", MAX),
            Err(NatsError::MissingCrlf)
        );
        assert_eq!(parse(b"MSG a 1 100\r\n", 10), Err(NatsError::TooLarge(100)));
        assert_eq!(
            parse(b"HMSG a 1 5 4\r\n", MAX),
            Err(NatsError::BadArgs("HMSG"))
        );
        assert_eq!(
            parse(b"MSG a 1 99999999999999999999\r\n", MAX),
            Err(NatsError::BadArgs("MSG"))
        );
        let long = vec![b'I'; MAX_CONTROL_LINE + 1];
        assert_eq!(parse(&long, MAX), Err(NatsError::LineTooLong));
    }

    #[test]
    fn encoders_produce_protocol_lines() {
        let mut v = Vec::new();
        encode_sub(&mut v, "bench-0", 1);
        encode_pub(&mut v, "bench-0", b"{}");
        assert_eq!(v, b"SUB bench-0 1\r\nPUB bench-0 2\r\n{}\r\n");
        let mut c = Vec::new();
        encode_connect(&mut c, "hb \"1\"");
        assert!(c.starts_with(b"CONNECT {"));
        assert!(c.ends_with(b"}\r\n"));
        let json: serde_json::Value = serde_json::from_slice(&c[8..c.len() - 2]).unwrap();
        assert_eq!(json["verbose"], false);
        assert_eq!(json["name"], "hb \"1\"");
    }
}
