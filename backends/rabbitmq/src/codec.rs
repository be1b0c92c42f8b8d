//! Carrying a switchyard message in AMQP properties, reversibly.
//!
//! - id → `message_id` (`sy-id` header when over 255 bytes); key → `sy-key`
//!   header; publish time → `timestamp` (seconds); persistent delivery mode.
//! - user headers → the headers table as long strings (byte-exact UTF-8).
//!   RabbitMQ writes `x-` headers itself (`x-delivery-count`, `x-death`,
//!   …), so user keys starting with `x-` (or `sy-u-`) are sent as
//!   `sy-u-<key>`; every other `x-` header is the broker's and not a user's.
//! - attempts consumed before a delayed nack → `sy-amqp-attempts` on the copy the
//!   wait queue holds, added to the quorum queue's `x-delivery-count`.

use std::time::{Duration, SystemTime};

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use switchyard_core::driver::support::{ID_HEADER as ID, KEY_HEADER as KEY};
use switchyard_core::{Headers, Message};

const ATTEMPTS: &str = "sy-amqp-attempts";
const ESCAPE: &str = "sy-u-";
const DELIVERY_COUNT: &str = "x-delivery-count";
/// AMQP short strings (message id, header names) hold at most 255 bytes.
const MAX_SHORT: usize = 255;

fn needs_escape(key: &str) -> bool {
    key.starts_with("x-") || key.starts_with(ESCAPE)
}

/// Encodes a message's properties; returns them and the approximate wire
/// size of the headers.
pub(crate) fn encode(message: &Message) -> (BasicProperties, usize) {
    let mut table = FieldTable::default();
    let mut size = 0;
    let mut put = |name: String, value: &str| {
        size += name.len() + value.len() + 6;
        table.insert(
            ShortString::from(name),
            AMQPValue::LongString(LongString::from(value)),
        );
    };
    let mut props = BasicProperties::default().with_delivery_mode(2);
    if message.id().len() <= MAX_SHORT {
        props = props.with_message_id(ShortString::from(message.id()));
    } else {
        put(ID.to_owned(), message.id());
    }
    if let Some(key) = message.key() {
        put(KEY.to_owned(), key);
    }
    for (k, v) in message.headers().iter() {
        let name = if needs_escape(k) {
            format!("{ESCAPE}{k}")
        } else {
            k.to_owned()
        };
        put(name, v);
    }
    let at = message.published_at().unwrap_or_else(SystemTime::now);
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let size = size + message.id().len() + 16;
    (props.with_timestamp(secs).with_headers(table), size)
}

/// Sets the attempts consumed so far on a copy headed for a wait queue.
pub(crate) fn with_attempts(props: &BasicProperties, attempts: u32) -> BasicProperties {
    // The broker's own headers stay behind: the copy is a new message to
    // the queue, whose `x-delivery-count` starts again (a stale one would
    // count the attempts before the delay twice), and `x-death` would grow
    // with every delay. A user's `x-` keys are escaped, so none is lost.
    let mut table = FieldTable::default();
    for (k, v) in props.headers().iter().flat_map(|t| t.inner()) {
        if !k.as_str().starts_with("x-") {
            table.insert(k.clone(), v.clone());
        }
    }
    table.insert(ATTEMPTS.into(), AMQPValue::LongLongInt(i64::from(attempts)));
    let mut out = props.clone().with_headers(table);
    // A delayed copy must not inherit an expiration from a foreign publisher.
    if out.expiration().is_some() {
        out = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(out.headers().clone().unwrap_or_default());
        if let Some(id) = props.message_id() {
            out = out.with_message_id(id.clone());
        }
        if let Some(ts) = props.timestamp() {
            out = out.with_timestamp(*ts);
        }
    }
    out
}

fn as_u64(v: &AMQPValue) -> Option<u64> {
    match v {
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::Timestamp(n) => Some(*n),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().parse().ok(),
        _ => None,
    }
}

/// A header value as text: strings as they are (lossily when not UTF-8),
/// numbers and booleans from foreign publishers in decimal; `None` for
/// nested tables and arrays.
fn as_text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        other => as_u64(other)?.to_string(),
    })
}

/// Decodes a delivery into a message and its attempt number (1 on first
/// delivery): attempts consumed before a delayed nack plus the quorum
/// queue's delivery count plus one.
///
/// Never fails: a message published by something other than switchyard has
/// no id and gets one from `fallback_id`; foreign header types are kept as
/// text where they have one.
pub(crate) fn decode(
    props: &BasicProperties,
    payload: bytes::Bytes,
    fallback_id: impl FnOnce() -> String,
) -> (Message, u32) {
    let mut id = props.message_id().as_ref().map(|s| s.as_str().to_owned());
    let mut key = None;
    let mut user = Headers::new();
    let mut before = 0u64;
    let mut count = 0u64;
    if let Some(table) = props.headers() {
        for (name, value) in table.inner() {
            match name.as_str() {
                ID => id = as_text(value),
                KEY => key = as_text(value),
                ATTEMPTS => before = as_u64(value).unwrap_or(0),
                DELIVERY_COUNT => count = as_u64(value).unwrap_or(0),
                n if n.starts_with("x-") => {}
                n => {
                    if let Some(v) = as_text(value) {
                        user.insert(n.strip_prefix(ESCAPE).unwrap_or(n), v);
                    }
                }
            }
        }
    }
    let published_at = props
        .timestamp()
        .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
    let attempt = u32::try_from(before.saturating_add(count).saturating_add(1)).unwrap_or(u32::MAX);
    let id = id.unwrap_or_else(fallback_id);
    (
        Message::from_parts(id, key, user, payload, published_at),
        attempt,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_awkward_headers() {
        let m = switchyard_core::driver::support::awkward_message(&[
            ("x-delivery-count", "user's"),
            ("x-death", "user's too"),
        ]);
        let (props, size) = encode(&m);
        assert!(size > 0);
        let (back, attempt) = decode(&props, m.payload().clone(), || unreachable!());
        assert_eq!(attempt, 1, "a user's x-delivery-count is not the broker's");
        assert_eq!(back.id(), m.id());
        assert_eq!(back.key(), m.key());
        assert_eq!(back.headers(), m.headers());
    }

    #[test]
    fn attempts_add_up_and_long_ids_fit() {
        let long = "i".repeat(300);
        let (props, _) = encode(&Message::new("").with_id(long.clone()));
        assert!(props.message_id().is_none());
        let mut props = with_attempts(&props, 3);
        let mut table = props.headers().clone().unwrap();
        table.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(2));
        props = props.with_headers(table);
        let (back, attempt) = decode(&props, bytes::Bytes::new(), || unreachable!());
        assert_eq!(back.id(), long);
        assert_eq!(attempt, 6);
    }

    #[test]
    fn a_delayed_copy_leaves_the_brokers_count_behind() {
        let (props, _) = encode(&Message::new("").with_header("x-mine", "kept"));
        let mut table = props.headers().clone().unwrap();
        table.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(1));
        table.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        // Delivered at attempt 2 (1 + the broker's count), then delayed.
        let copy = with_attempts(&props.with_headers(table), 2);
        let headers = copy.headers().clone().unwrap();
        assert!(!headers.contains_key(DELIVERY_COUNT));
        assert!(!headers.contains_key("x-death"));
        let (back, attempt) = decode(&copy, bytes::Bytes::new(), || unreachable!());
        assert_eq!(attempt, 3, "the next delivery of the copy is attempt 3");
        assert_eq!(back.headers().get("x-mine"), Some("kept"));
    }

    #[test]
    fn foreign_messages_are_kept() {
        let mut table = FieldTable::default();
        table.insert("n".into(), AMQPValue::LongInt(-3));
        table.insert("flag".into(), AMQPValue::Boolean(true));
        table.insert(
            "nested".into(),
            AMQPValue::FieldTable(FieldTable::default()),
        );
        let props = BasicProperties::default().with_headers(table);
        let (m, attempt) = decode(&props, bytes::Bytes::from_static(b"x"), || "f-1".into());
        assert_eq!((m.id(), attempt), ("f-1", 1));
        assert_eq!(m.headers().get("flag"), Some("true"));
        assert_eq!(m.headers().get("n"), Some("-3"));
        assert_eq!(m.headers().get("nested"), None);
    }
}
