//! The one place where what goes wrong inside a node becomes a protocol code: token errors,
//! engine errors, and refusals that a unidirectional client can only read as a disconnect.
//! Codes themselves live in `herald_protocol::codes`; this module only maps onto them.

use herald_protocol::{Disconnect, ErrorCode, ProtocolError, codes};

use crate::auth::TokenError;
use crate::engine::EngineError;

/// Why a command failed: an error reply, or the end of the connection.
#[derive(Debug)]
pub enum Fail {
    Error(ProtocolError),
    Disconnect(Disconnect),
}

impl From<ProtocolError> for Fail {
    fn from(e: ProtocolError) -> Self {
        Fail::Error(e)
    }
}
impl From<ErrorCode> for Fail {
    fn from(e: ErrorCode) -> Self {
        Fail::Error(e.error())
    }
}
impl From<codes::KnownDisconnect> for Fail {
    fn from(d: codes::KnownDisconnect) -> Self {
        Fail::Disconnect(d.into())
    }
}
impl From<EngineError> for Fail {
    fn from(e: EngineError) -> Self {
        Fail::Error(e.into())
    }
}

impl From<EngineError> for ProtocolError {
    fn from(e: EngineError) -> Self {
        // Logged as a warning, with the operation, where it failed (`InstrumentedEngine`).
        tracing::debug!(error = %e, "engine error answered as internal error");
        ErrorCode::INTERNAL.error()
    }
}

/// Which token a [`TokenError`] is about; the answers differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    Connect,
    Refresh,
    Subscribe,
    SubRefresh,
}

/// An expired token asks the client for a fresh one (109). A connection token that does not
/// verify ends the connection (3500): the client cannot fix it by retrying. A subscription
/// token that does not verify only refuses that subscription (103, as Centrifugo answers and
/// the SDKs expect), so one bad channel does not cut the client off the others.
pub fn token(e: TokenError, usage: TokenUse) -> Fail {
    match e {
        TokenError::Expired => ErrorCode::TOKEN_EXPIRED.into(),
        TokenError::Invalid(why) => {
            tracing::debug!(error = %why, ?usage, "token refused");
            match usage {
                TokenUse::Connect | TokenUse::Refresh => Disconnect::INVALID_TOKEN.into(),
                TokenUse::Subscribe | TokenUse::SubRefresh => ErrorCode::PERMISSION_DENIED.into(),
            }
        }
    }
}

/// A token that verifies but names another user, client or channel than this connection's.
pub fn token_mismatch() -> Fail {
    Disconnect::INVALID_TOKEN.into()
}

/// A unidirectional client cannot read an error reply, so a refused connect is a disconnect:
/// an expired token asks it to come back (with a fresh one), a bad one not to.
pub fn unidirectional_connect(e: &ProtocolError) -> Disconnect {
    let code = e.code;
    let known = match code {
        c if c == ErrorCode::TOKEN_EXPIRED.code || c == ErrorCode::EXPIRED.code => {
            Disconnect::EXPIRED
        }
        c if c == ErrorCode::TOO_MANY_REQUESTS.code => Disconnect::TOO_MANY_REQUESTS,
        c if c == ErrorCode::PERMISSION_DENIED.code => Disconnect::PERMISSION_DENIED,
        c if c == ErrorCode::UNAUTHORIZED.code => Disconnect::INVALID_TOKEN,
        c if c == ErrorCode::BAD_REQUEST.code => Disconnect::BAD_REQUEST,
        _ => Disconnect::SERVER_ERROR,
    };
    known.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_errors() {
        assert!(matches!(
            token(TokenError::Expired, TokenUse::Connect),
            Fail::Error(e) if e.code == 109
        ));
        assert!(matches!(
            token(TokenError::Invalid("bad".into()), TokenUse::Connect),
            Fail::Disconnect(d) if d.code == 3500
        ));
        for usage in [TokenUse::Subscribe, TokenUse::SubRefresh] {
            assert!(matches!(
                token(TokenError::Invalid("bad".into()), usage),
                Fail::Error(e) if e.code == 103
            ));
        }
    }

    #[test]
    fn unidirectional_refusals() {
        assert_eq!(
            unidirectional_connect(&ErrorCode::TOKEN_EXPIRED.error()).code,
            3005
        );
        assert_eq!(
            unidirectional_connect(&ErrorCode::UNAUTHORIZED.error()).code,
            3500
        );
        assert_eq!(
            unidirectional_connect(&ErrorCode::INTERNAL.error()).code,
            3004
        );
    }
}
