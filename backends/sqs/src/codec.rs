//! Carrying a switchyard message in an SQS / SNS message, reversibly.
//!
//! - body: the payload when it is text SQS accepts (XML 1.0 characters);
//!   otherwise its base64 (an empty payload is sent as `-`, as SQS refuses
//!   empty bodies); the encoding is noted in the metadata.
//! - attributes: `sy-id` (the id) and, when there is anything to say,
//!   `sy-meta`: a JSON object with the key (`k`), the headers (`h`) and the
//!   body encoding (`e`). Two attributes, whatever the number of headers,
//!   so SQS's limit of 10 attributes never applies.

use std::{collections::BTreeMap, time::SystemTime};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use switchyard_core::{Headers, Message};

pub(crate) use switchyard_core::driver::support::ID_HEADER as ID;
pub(crate) const META: &str = "sy-meta";

/// A message as SQS or SNS carries it.
#[derive(Debug)]
pub(crate) struct Encoded {
    pub(crate) body: String,
    /// (name, string value) pairs.
    pub(crate) attributes: Vec<(&'static str, String)>,
    /// FIFO only: (`MessageGroupId`, `MessageDeduplicationId`).
    pub(crate) fifo: Option<(String, String)>,
}

impl Encoded {
    /// FIFO only: the `MessageGroupId` to send.
    pub(crate) fn group_id(&self) -> Option<String> {
        self.fifo.as_ref().map(|(group, _)| group.clone())
    }

    /// FIFO only: the `MessageDeduplicationId` to send.
    pub(crate) fn dedup_id(&self) -> Option<String> {
        self.fifo.as_ref().map(|(_, dedup)| dedup.clone())
    }

    /// The size SQS counts: body plus attribute names, types and values.
    pub(crate) fn size(&self) -> usize {
        self.body.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + "String".len() + v.len())
                .sum::<usize>()
    }
}

fn sqs_text(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

pub(crate) fn encode(message: &Message) -> Encoded {
    let payload = message.payload();
    let (body, encoding) = if payload.is_empty() {
        ("-".to_owned(), Some("empty"))
    } else {
        match std::str::from_utf8(payload) {
            Ok(s) if s.chars().all(sqs_text) => (s.to_owned(), None),
            _ => (STANDARD.encode(payload), Some("b64")),
        }
    };
    let mut meta = serde_json::Map::new();
    if let Some(k) = message.key() {
        meta.insert("k".into(), k.into());
    }
    if !message.headers().is_empty() {
        let h: BTreeMap<&str, &str> = message.headers().iter().collect();
        meta.insert("h".into(), serde_json::json!(h));
    }
    if let Some(e) = encoding {
        meta.insert("e".into(), e.into());
    }
    let mut attributes = vec![(ID, message.id().to_owned())];
    if !meta.is_empty() {
        attributes.push((META, serde_json::Value::Object(meta).to_string()));
    }
    Encoded {
        body,
        attributes,
        fifo: None,
    }
}

/// Decodes a received message. Never fails: a message from another
/// publisher (no `sy-id`) gets `fallback_id` (the SQS message id, stable
/// across redeliveries), and malformed metadata is ignored.
pub(crate) fn decode(
    body: String,
    id: Option<String>,
    meta: Option<&str>,
    published_at: Option<SystemTime>,
    fallback_id: impl FnOnce() -> String,
) -> Message {
    let meta: serde_json::Map<String, serde_json::Value> = meta
        .and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or_default();
    let key = meta.get("k").and_then(|v| v.as_str()).map(str::to_owned);
    let mut headers = Headers::new();
    if let Some(h) = meta.get("h").and_then(|v| v.as_object()) {
        for (k, v) in h {
            if let Some(v) = v.as_str() {
                headers.insert(k.clone(), v);
            }
        }
    }
    let payload = match meta.get("e").and_then(|v| v.as_str()) {
        Some("empty") => bytes::Bytes::new(),
        Some("b64") => STANDARD
            .decode(body.as_bytes())
            .map_or_else(|_| bytes::Bytes::from(body), bytes::Bytes::from),
        _ => bytes::Bytes::from(body),
    };
    Message::from_parts(
        id.unwrap_or_else(fallback_id),
        key,
        headers,
        payload,
        published_at,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: &Message) -> Message {
        let e = encode(m);
        let get = |n: &str| {
            e.attributes
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.clone())
        };
        decode(
            e.body.clone(),
            get(ID),
            get(META).as_deref(),
            None,
            || unreachable!(),
        )
    }

    #[test]
    fn payloads_and_headers_round_trip() {
        let mut m = Message::new(vec![0u8, 159, 146, 150, 255]).with_key("");
        for i in 0..60 {
            m = m.with_header(format!("h{i}"), if i % 2 == 0 { "" } else { "a = b: ü" });
        }
        for m in [
            m,
            Message::new(""),
            Message::new("plain text ✓"),
            Message::new("bell \u{7}"),
        ] {
            let back = round_trip(&m);
            assert_eq!(back.id(), m.id());
            assert_eq!(back.key(), m.key());
            assert_eq!(back.headers(), m.headers());
            assert_eq!(back.payload(), m.payload());
            assert!(encode(&m).attributes.len() <= 2);
        }
    }
}
