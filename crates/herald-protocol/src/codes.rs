//! Every protocol error code and disconnect code Herald sends, in one place.

use serde::Serialize;

/// An error returned in a reply (`{"id":N,"error":{...}}`) or by the server API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode {
    pub code: u32,
    pub message: &'static str,
    pub temporary: bool,
}

impl ErrorCode {
    const fn new(code: u32, message: &'static str) -> Self {
        Self {
            code,
            message,
            temporary: false,
        }
    }
    const fn temporary(code: u32, message: &'static str) -> Self {
        Self {
            code,
            message,
            temporary: true,
        }
    }

    pub const INTERNAL: Self = Self::temporary(100, "internal server error");
    pub const UNAUTHORIZED: Self = Self::new(101, "unauthorized");
    pub const UNKNOWN_CHANNEL: Self = Self::new(102, "unknown channel");
    pub const PERMISSION_DENIED: Self = Self::new(103, "permission denied");
    pub const METHOD_NOT_FOUND: Self = Self::new(104, "method not found");
    pub const ALREADY_SUBSCRIBED: Self = Self::new(105, "already subscribed");
    pub const LIMIT_EXCEEDED: Self = Self::new(106, "limit exceeded");
    pub const BAD_REQUEST: Self = Self::new(107, "bad request");
    pub const NOT_AVAILABLE: Self = Self::new(108, "not available");
    pub const TOKEN_EXPIRED: Self = Self::new(109, "token expired");
    pub const EXPIRED: Self = Self::new(110, "expired");
    pub const TOO_MANY_REQUESTS: Self = Self::temporary(111, "too many requests");
    pub const UNRECOVERABLE_POSITION: Self = Self::new(112, "unrecoverable position");

    pub fn error(self) -> ProtocolError {
        ProtocolError {
            code: self.code,
            message: self.message.to_string(),
            temporary: self.temporary,
        }
    }
}

/// The error object as it appears on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ProtocolError {
    pub code: u32,
    pub message: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub temporary: bool,
}

impl From<ErrorCode> for ProtocolError {
    fn from(c: ErrorCode) -> Self {
        c.error()
    }
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ProtocolError {}

/// Why a connection is closed: the WebSocket close code and reason.
/// 3000–3499 and 4000–4499 tell the client to reconnect; 3500–3999 and 4500–4999 are terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disconnect {
    pub code: u16,
    pub reason: String,
}

impl Disconnect {
    const fn known(code: u16, reason: &'static str) -> KnownDisconnect {
        KnownDisconnect { code, reason }
    }

    pub const SHUTDOWN: KnownDisconnect = Self::known(3001, "shutdown");
    pub const SERVER_ERROR: KnownDisconnect = Self::known(3004, "internal server error");
    pub const EXPIRED: KnownDisconnect = Self::known(3005, "connection expired");
    pub const SUBSCRIPTION_EXPIRED: KnownDisconnect = Self::known(3006, "subscription expired");
    pub const SLOW: KnownDisconnect = Self::known(3008, "slow");
    pub const WRITE_ERROR: KnownDisconnect = Self::known(3009, "write error");
    pub const INSUFFICIENT_STATE: KnownDisconnect = Self::known(3010, "insufficient state");
    pub const FORCE_RECONNECT: KnownDisconnect = Self::known(3011, "force reconnect");
    pub const NO_PONG: KnownDisconnect = Self::known(3012, "no pong");
    pub const TOO_MANY_REQUESTS: KnownDisconnect = Self::known(3013, "too many requests");
    pub const INVALID_TOKEN: KnownDisconnect = Self::known(3500, "invalid token");
    pub const BAD_REQUEST: KnownDisconnect = Self::known(3501, "bad request");
    pub const STALE: KnownDisconnect = Self::known(3502, "stale");
    pub const FORCE_NO_RECONNECT: KnownDisconnect = Self::known(3503, "force disconnect");
    pub const CONNECTION_LIMIT: KnownDisconnect = Self::known(3504, "connection limit");
    pub const CHANNEL_LIMIT: KnownDisconnect = Self::known(3505, "channel limit");
    pub const INAPPROPRIATE_PROTOCOL: KnownDisconnect = Self::known(3506, "inappropriate protocol");
    pub const PERMISSION_DENIED: KnownDisconnect = Self::known(3507, "permission denied");
    pub const NOT_AVAILABLE: KnownDisconnect = Self::known(3508, "not available");
    pub const TOO_MANY_ERRORS: KnownDisconnect = Self::known(3509, "too many errors");

    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }

    /// Whether the client is advised to reconnect (the protocol's code ranges).
    pub fn reconnect(&self) -> bool {
        matches!(self.code, 3000..=3499 | 4000..=4499)
    }

    /// Whether the server closed the connection because of what the client sent (or did
    /// not send): malformed or unexpected frames, a refused token, a flood, a missing pong.
    /// These closes are logged with the client's address and counted per transport.
    pub fn is_protocol_error(&self) -> bool {
        [
            Self::NO_PONG,
            Self::TOO_MANY_REQUESTS,
            Self::INVALID_TOKEN,
            Self::BAD_REQUEST,
            Self::INAPPROPRIATE_PROTOCOL,
            Self::PERMISSION_DENIED,
            Self::TOO_MANY_ERRORS,
        ]
        .iter()
        .any(|k| k.code == self.code)
    }
}

/// A disconnect known at compile time; converts into [`Disconnect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownDisconnect {
    pub code: u16,
    pub reason: &'static str,
}

impl From<KnownDisconnect> for Disconnect {
    fn from(k: KnownDisconnect) -> Self {
        Disconnect::new(k.code, k.reason)
    }
}

/// Unsubscribe push codes: 2000 is final, 2500 and above tell the client to resubscribe.
pub mod unsubscribe {
    pub const SERVER: (u32, &str) = (2000, "server unsubscribe");
    pub const INSUFFICIENT_STATE: (u32, &str) = (2500, "insufficient state");
    pub const EXPIRED: (u32, &str) = (2501, "subscription expired");
}

/// MQTT reason codes for Herald's errors and disconnects: what an MQTT client is told where a
/// Centrifugo client gets an error code or a close code.
pub mod mqtt {
    /// MQTT 5 reason codes used by Herald (MQTT 5.0 §2.4).
    pub mod v5 {
        pub const SUCCESS: u8 = 0x00;
        pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
        pub const UNSPECIFIED: u8 = 0x80;
        pub const MALFORMED_PACKET: u8 = 0x81;
        pub const PROTOCOL_ERROR: u8 = 0x82;
        pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
        pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
        pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
        pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
        pub const NOT_AUTHORIZED: u8 = 0x87;
        pub const SERVER_UNAVAILABLE: u8 = 0x88;
        pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
        pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
        pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
        pub const SESSION_TAKEN_OVER: u8 = 0x8E;
        pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
        pub const TOPIC_NAME_INVALID: u8 = 0x90;
        pub const PACKET_TOO_LARGE: u8 = 0x95;
        pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
        pub const QUOTA_EXCEEDED: u8 = 0x97;
        pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
        pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
        pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
        pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
        pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
        pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;
    }

    /// MQTT 3.1.1 CONNACK return codes (§3.2.2.3) and the SUBACK failure.
    pub mod v3 {
        pub const ACCEPTED: u8 = 0;
        pub const UNACCEPTABLE_PROTOCOL_VERSION: u8 = 1;
        pub const IDENTIFIER_REJECTED: u8 = 2;
        pub const SERVER_UNAVAILABLE: u8 = 3;
        pub const BAD_USER_NAME_OR_PASSWORD: u8 = 4;
        pub const NOT_AUTHORIZED: u8 = 5;
        pub const SUBACK_FAILURE: u8 = 0x80;
    }

    /// The reason of a DISCONNECT (MQTT 5) for a Herald disconnect code.
    pub fn disconnect_v5(code: u16) -> u8 {
        match code {
            3000 => v5::SUCCESS,
            3001 => v5::SERVER_SHUTTING_DOWN,
            3005 => v5::MAXIMUM_CONNECT_TIME,
            3008 | 3504 | 3505 => v5::QUOTA_EXCEEDED,
            3011 | 3503 => v5::ADMINISTRATIVE_ACTION,
            3012 => v5::KEEP_ALIVE_TIMEOUT,
            3013 | 3509 => v5::MESSAGE_RATE_TOO_HIGH,
            3500 | 3507 => v5::NOT_AUTHORIZED,
            3501 => v5::MALFORMED_PACKET,
            3502 => v5::PROTOCOL_ERROR,
            _ => v5::UNSPECIFIED,
        }
    }

    /// The CONNACK of a connect the session refused by closing: (MQTT 5 reason, MQTT 3.1.1
    /// return code).
    pub fn connack_for_disconnect(code: u16) -> (u8, u8) {
        match code {
            3500 | 3005 => (v5::BAD_USER_NAME_OR_PASSWORD, v3::BAD_USER_NAME_OR_PASSWORD),
            3507 | 3503 => (v5::NOT_AUTHORIZED, v3::NOT_AUTHORIZED),
            3504 => (v5::QUOTA_EXCEEDED, v3::SERVER_UNAVAILABLE),
            3013 => (v5::CONNECTION_RATE_EXCEEDED, v3::SERVER_UNAVAILABLE),
            3501 => (v5::MALFORMED_PACKET, v3::SERVER_UNAVAILABLE),
            _ => (v5::SERVER_UNAVAILABLE, v3::SERVER_UNAVAILABLE),
        }
    }

    /// The CONNACK of a connect answered with an error: (MQTT 5 reason, MQTT 3.1.1 code).
    pub fn connack_for_error(code: u32) -> (u8, u8) {
        match code {
            101 | 109 => (v5::BAD_USER_NAME_OR_PASSWORD, v3::BAD_USER_NAME_OR_PASSWORD),
            103 => (v5::NOT_AUTHORIZED, v3::NOT_AUTHORIZED),
            106 => (v5::QUOTA_EXCEEDED, v3::SERVER_UNAVAILABLE),
            111 => (v5::CONNECTION_RATE_EXCEEDED, v3::SERVER_UNAVAILABLE),
            _ => (v5::SERVER_UNAVAILABLE, v3::SERVER_UNAVAILABLE),
        }
    }

    /// The SUBACK reason (MQTT 5) of a subscribe answered with an error; MQTT 3.1.1 has only
    /// [`v3::SUBACK_FAILURE`].
    pub fn suback_v5(code: u32) -> u8 {
        match code {
            101 | 103 | 109 => v5::NOT_AUTHORIZED,
            102 | 107 => v5::TOPIC_FILTER_INVALID,
            106 | 111 => v5::QUOTA_EXCEEDED,
            _ => v5::UNSPECIFIED,
        }
    }

    /// The PUBACK / PUBREC reason (MQTT 5) of a publish answered with an error.
    pub fn puback_v5(code: u32) -> u8 {
        match code {
            101 | 103 => v5::NOT_AUTHORIZED,
            102 | 107 => v5::TOPIC_NAME_INVALID,
            106 | 111 => v5::QUOTA_EXCEEDED,
            _ => v5::UNSPECIFIED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_ranges() {
        assert!(Disconnect::from(Disconnect::SHUTDOWN).reconnect());
        assert!(Disconnect::from(Disconnect::SLOW).reconnect());
        assert!(!Disconnect::from(Disconnect::INVALID_TOKEN).reconnect());
        assert!(Disconnect::new(4000, "app").reconnect());
        assert!(!Disconnect::new(4500, "app").reconnect());
    }

    #[test]
    fn temporary_flag_only_when_set() {
        let s = serde_json::to_string(&ErrorCode::PERMISSION_DENIED.error()).unwrap();
        assert_eq!(s, r#"{"code":103,"message":"permission denied"}"#);
        let s = serde_json::to_string(&ErrorCode::INTERNAL.error()).unwrap();
        assert!(s.contains(r#""temporary":true"#));
    }
}
