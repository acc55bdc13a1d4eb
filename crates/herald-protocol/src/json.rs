//! Helpers for raw embedded JSON (`data`, `info`): carried as text, never re-parsed.

use serde_json::value::RawValue;

/// Raw JSON as received or stored. `data`, `info`, `conn_info` and `chan_info` are opaque to
/// Herald: validated once on the way in, then copied byte for byte.
pub type Raw = Box<RawValue>;

/// `null` as a raw value, used where a client sent no data.
pub fn null() -> Raw {
    RawValue::NULL.to_owned()
}

/// Parses text that must be one JSON value.
pub fn raw_from_str(s: &str) -> Result<Raw, serde_json::Error> {
    RawValue::from_string(s.to_string())
}
