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

/// Bytes received as opaque data (from a Protobuf client) as a JSON-side value: `Some` when
/// they are one JSON value no deeper than [`MAX_DEPTH`], returned on one line; `None`
/// otherwise, and the caller carries them with [`base64_string`] (see `crate::proto`).
pub fn from_bytes(bytes: &[u8]) -> Option<Raw> {
    let raw: Raw = serde_json::from_slice(bytes).ok()?;
    (depth(raw.get()) <= MAX_DEPTH).then(|| single_line(raw))
}

/// Bytes that are not JSON as a JSON string of their standard base64 (padded), the
/// representation that cannot break any JSON parser.
pub fn base64_string(bytes: &[u8]) -> Raw {
    use base64::Engine as _;
    let text = format!(
        "\"{}\"",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    );
    // The base64 alphabet needs no escaping inside a JSON string.
    RawValue::from_string(text).unwrap_or_else(|_| null())
}

/// The bytes behind a [`base64_string`] value; `None` if `raw` is not one.
pub fn base64_bytes(raw: &RawValue) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let text = raw.get().strip_prefix('"')?.strip_suffix('"')?;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// Deepest nesting Herald relays in opaque data. Deeper documents are refused: many client
/// JSON parsers fail or recurse without bound on them, so relaying one would harm every
/// subscriber.
pub const MAX_DEPTH: usize = 64;

/// Nesting depth of a JSON text (objects and arrays), ignoring brackets inside strings.
pub fn depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_str {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    #[test]
    fn depth_ignores_strings() {
        assert_eq!(super::depth(r#"{"a":[1,{"b":"[[[["}]}"#), 3);
        assert_eq!(super::depth("1"), 0);
        assert_eq!(super::depth(r#""\"[""#), 0);
    }
}

/// Raw JSON on one line. Messages are batched `\n`-separated on the wire, so relayed JSON
/// must not contain raw line breaks; in valid JSON they can only be whitespace between
/// tokens (inside strings they are escaped), so turning them into spaces keeps the value.
pub fn single_line(raw: Raw) -> Raw {
    if !raw.get().contains(['\n', '\r']) {
        return raw;
    }
    let text = raw.get().replace(['\n', '\r'], " ");
    RawValue::from_string(text).unwrap_or(raw)
}

#[cfg(test)]
mod line_tests {
    #[test]
    fn pretty_json_becomes_one_line() {
        let raw = super::raw_from_str("{\n  \"a\": \"x\\ny\",\r\n  \"b\": [1,\n2]\n}").unwrap();
        let one = super::single_line(raw);
        assert!(!one.get().contains('\n') && !one.get().contains('\r'));
        let v: serde_json::Value = serde_json::from_str(one.get()).unwrap();
        assert_eq!(v["a"], "x\ny");
    }
}
