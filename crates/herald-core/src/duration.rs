//! Durations in configuration are human strings: "30s", "5m", "1h 30m".

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse(&text).map_err(serde::de::Error::custom)
}

/// Parses "0", "250ms", "30s", "5m", "1h".
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("invalid duration {text:?} ({e}); use e.g. \"30s\", \"5m\""))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_common_forms() {
        assert_eq!(super::parse("30s").unwrap().as_secs(), 30);
        assert_eq!(super::parse("5m").unwrap().as_secs(), 300);
        assert_eq!(super::parse("0").unwrap().as_secs(), 0);
        assert!(super::parse("5 parsecs").is_err());
    }
}
