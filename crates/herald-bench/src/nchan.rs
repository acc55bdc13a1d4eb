//! nginx's nchan module: subscribers are plain WebSocket clients of
//! `<subscriber location>/<channel>` that receive each message as one frame holding its
//! body, and publications are HTTP `POST <publisher location>/<channel>` with the
//! message as the body.

use crate::error::BenchError;
use crate::net::Endpoint;

/// Subscriber location used when `--url` has no path.
pub const DEFAULT_SUB_PATH: &str = "/sub";
/// Publisher location used when `--api-url` is not given.
pub const DEFAULT_PUB_PATH: &str = "/pub";

/// Channel names go into URL paths as they are: refuse anything that would need
/// escaping rather than guess how the server's location maps it.
pub fn check_channel(name: &str) -> Result<(), BenchError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'));
    if ok {
        Ok(())
    } else {
        Err(BenchError::BadArgument(format!(
            "nchan channel {name:?}: only ASCII letters, digits and -_.~ are allowed"
        )))
    }
}

/// The location (no trailing `/`) a channel name is appended to: the endpoint's path,
/// or `default` when it has none.
pub fn location(ep: &Endpoint, default: &str) -> Result<String, BenchError> {
    if ep.path.contains('?') || ep.path.contains('#') {
        return Err(BenchError::BadArgument(format!(
            "nchan location {} must not have a query",
            ep.url
        )));
    }
    let path = ep.path.trim_end_matches('/');
    Ok(if path.is_empty() {
        default.to_string()
    } else {
        path.to_string()
    })
}

/// Subscriber WebSocket URL of one channel.
pub fn subscriber_url(ep: &Endpoint, channel: &str) -> Result<String, BenchError> {
    let loc = location(ep, DEFAULT_SUB_PATH)?;
    Ok(format!("ws://{}{loc}/{channel}", ep.authority))
}

/// Request head of a publication to one channel, up to and including
/// `Content-Length: ` (the length and the body follow).
pub fn publish_head(api: &Endpoint, channel: &str) -> Result<Vec<u8>, BenchError> {
    let loc = location(api, DEFAULT_PUB_PATH)?;
    Ok(format!(
        "POST {loc}/{channel} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: ",
        api.authority
    )
    .into_bytes())
}

/// nchan answers 201 Created when the channel had subscribers and 202 Accepted when
/// it had none; both mean the message was stored and published.
pub fn accepted(status: u16) -> bool {
    status == 201 || status == 202
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::loopback_endpoint;

    #[test]
    fn urls_and_heads() {
        let bare = loopback_endpoint("ws://127.0.0.1:8090", &["ws"]).unwrap();
        assert_eq!(
            subscriber_url(&bare, "bench-0").unwrap(),
            "ws://127.0.0.1:8090/sub/bench-0"
        );
        let custom = loopback_endpoint("ws://localhost:8090/nchan/sub/", &["ws"]).unwrap();
        assert_eq!(
            subscriber_url(&custom, "c").unwrap(),
            "ws://localhost:8090/nchan/sub/c"
        );
        let q = loopback_endpoint("ws://127.0.0.1:8090/sub?x=1", &["ws"]).unwrap();
        assert!(subscriber_url(&q, "c").is_err());

        let api = loopback_endpoint("http://127.0.0.1:8090", &["http"]).unwrap();
        let head = String::from_utf8(publish_head(&api, "bench-3").unwrap()).unwrap();
        assert!(
            head.starts_with("POST /pub/bench-3 HTTP/1.1\r\nHost: 127.0.0.1:8090\r\n"),
            "{head}"
        );
        assert!(head.ends_with("Content-Length: "));
    }

    #[test]
    fn channel_names_and_statuses() {
        assert!(check_channel("bench-0").is_ok());
        assert!(check_channel("a.b_c~d").is_ok());
        for bad in ["", "a/b", "a b", "a?b", "é", "a%20"] {
            assert!(check_channel(bad).is_err(), "{bad:?}");
        }
        assert!(accepted(201) && accepted(202));
        assert!(!accepted(200) && !accepted(403) && !accepted(500));
    }
}
