//! Carrying a switchyard message in NATS headers, reversibly.
//!
//! - id → `sy-id`; key → `sy-key`; the publish time is the stream's own
//!   timestamp of the message.
//! - user headers → NATS headers of the same (case-sensitive) name; keys
//!   starting with `Nats-` (which the server interprets) or `sy-u-` are sent
//!   as `sy-u-<key>`.
//! - NATS trims header values and forbids CR/LF, so a value with control
//!   characters or leading/trailing whitespace is sent base64-encoded and its
//!   header name listed in `sy-enc` (space-separated; keys contain no spaces).

use std::time::SystemTime;

use async_nats::HeaderMap;
use base64::{Engine as _, engine::general_purpose::STANDARD};
use switchyard_core::driver::support::{ID_HEADER as ID, KEY_HEADER as KEY};
use switchyard_core::{Error, Headers, Message, Result};

const ENC: &str = "sy-enc";
const ESCAPE: &str = "sy-u-";

fn needs_escape(key: &str) -> bool {
    key.len() >= 5 && key[..5].eq_ignore_ascii_case("nats-") || key.starts_with(ESCAPE)
}

fn is_safe(value: &str) -> bool {
    value.trim() == value && !value.chars().any(char::is_control)
}

/// Encodes a message into NATS headers; returns the headers and their
/// approximate wire size.
pub(crate) fn encode(message: &Message) -> Result<(HeaderMap, usize)> {
    let mut map = HeaderMap::new();
    let mut encoded: Vec<String> = Vec::new();
    let mut size = 12; // "NATS/1.0\r\n" + final "\r\n"
    let mut put = |name: &str, value: &str, encoded: &mut Vec<String>| -> Result<()> {
        let header_name: async_nats::HeaderName = match name {
            ID => async_nats::HeaderName::from_static(ID),
            KEY => async_nats::HeaderName::from_static(KEY),
            other => other.parse().map_err(|_| Error::InvalidHeader {
                key: other.to_owned(),
                reason: "not a valid NATS header name",
            })?,
        };
        size += name.len() + value.len() + 4;
        if is_safe(value) {
            map.insert(header_name, value);
        } else {
            encoded.push(name.to_owned());
            map.insert(header_name, STANDARD.encode(value).as_str());
        }
        Ok(())
    };
    put(ID, message.id(), &mut encoded)?;
    if let Some(key) = message.key() {
        put(KEY, key, &mut encoded)?;
    }
    for (k, v) in message.headers().iter() {
        let name = if needs_escape(k) {
            format!("{ESCAPE}{k}")
        } else {
            k.to_owned()
        };
        put(&name, v, &mut encoded)?;
    }
    if !encoded.is_empty() {
        let list = encoded.join(" ");
        size += ENC.len() + list.len() + 4;
        map.insert(ENC, list.as_str());
    }
    Ok((map, size))
}

/// Decodes a message from NATS headers and payload. A message published
/// by something other than switchyard (no `sy-id`) gets `fallback_id`.
///
/// Never fails: a value listed in `sy-enc` that is not valid base64 (or not
/// UTF-8 once decoded) is kept as received (or decoded lossily), so a
/// malformed message still reaches the application or its dead-letter topic
/// instead of being dropped.
pub(crate) fn decode(
    headers: Option<&HeaderMap>,
    payload: bytes::Bytes,
    published_at: Option<SystemTime>,
    fallback_id: impl FnOnce() -> String,
) -> Message {
    let Some(map) = headers else {
        return Message::from_parts(fallback_id(), None, Headers::new(), payload, published_at);
    };
    let encoded: Vec<&str> = map
        .get(ENC)
        .map(|v| v.as_str().split(' ').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let value = |name: &str, raw: &str| -> String {
        if encoded.contains(&name) {
            match STANDARD.decode(raw) {
                Ok(bytes) => String::from_utf8(bytes)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                Err(_) => raw.to_owned(),
            }
        } else {
            raw.to_owned()
        }
    };
    let mut id = None;
    let mut key = None;
    let mut user = Headers::new();
    for (name, values) in map.iter() {
        let name = name.as_ref();
        let Some(raw) = values.last() else { continue };
        let v = value(name, raw.as_str());
        match name {
            ID => id = Some(v),
            KEY => key = Some(v),
            ENC => {}
            n if n.len() >= 5 && n[..5].eq_ignore_ascii_case("nats-") => {}
            n => {
                let k = n.strip_prefix(ESCAPE).unwrap_or(n);
                user.insert(k, v);
            }
        }
    }
    let id = id.unwrap_or_else(fallback_id);
    Message::from_parts(id, key, user, payload, published_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_awkward_headers() {
        let m = switchyard_core::driver::support::awkward_message(&[
            ("Nats-Msg-Id", "user's"),
            ("nats-expected-stream", "user's too"),
        ]);
        let (map, size) = encode(&m).unwrap();
        assert!(size > 0);
        assert!(
            map.get("Nats-Msg-Id").is_none(),
            "user header must not reach NATS as Nats-Msg-Id"
        );
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        let back = decode(Some(&map), m.payload().clone(), Some(at), || unreachable!());
        assert_eq!(back.id(), m.id());
        assert_eq!(back.key(), m.key());
        assert_eq!(back.headers(), m.headers());
        assert_eq!(back.published_at(), Some(at));
    }

    #[test]
    fn foreign_and_malformed_messages_are_kept() {
        let m = decode(None, bytes::Bytes::from_static(b"x"), None, || "s:1".into());
        assert_eq!(m.id(), "s:1");
        let mut map = HeaderMap::new();
        map.insert(ENC, "k");
        map.insert("k", "%%%");
        map.insert("sy-id", "id-1");
        // Malformed encoding is kept, not dropped.
        let m = decode(Some(&map), bytes::Bytes::new(), None, String::new);
        assert_eq!(m.id(), "id-1");
        assert_eq!(m.headers().get("k"), Some("%%%"));
    }
}
