//! Carrying a switchyard message in a Kafka record, byte-exact.
//!
//! - key → the record key (so records with one key share a partition);
//! - id → header `sy-id`; user headers → record headers of the same name
//!   (Kafka headers are binary-safe and may repeat, so nothing is escaped);
//! - payload → the record value (an empty payload is an empty value);
//! - publish time → the record's `CreateTime` timestamp (milliseconds);
//! - a retry record (a nacked delivery waiting in the retry topic) adds
//!   `sy-k-for` (`topic:subscription`), `sy-k-attempt` and `sy-k-due`
//!   (Unix milliseconds).
//!
//! A record that no switchyard publisher wrote (no `sy-id`) gets the id
//! `kafka:<topic>:<partition>:<offset>`, stable across redeliveries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rdkafka::message::{BorrowedMessage, Header, Headers as _, Message as _, OwnedHeaders};
use switchyard_core::{Headers, Message};

pub(crate) use switchyard_core::driver::support::ID_HEADER as ID;
pub(crate) const RETRY_FOR: &str = "sy-k-for";
pub(crate) const RETRY_ATTEMPT: &str = "sy-k-attempt";
pub(crate) const RETRY_DUE: &str = "sy-k-due";
/// Bytes Kafka's record format spends per header besides key and value
/// (varint lengths), rounded up.
const HEADER_OVERHEAD: usize = 10;
/// Bytes of a record besides key, value and headers (attributes, deltas,
/// lengths), rounded up.
pub(crate) const RECORD_OVERHEAD: usize = 32;

/// Where a nacked delivery is going: the retry record's extra headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Retry {
    /// `topic:subscription` the retry belongs to.
    pub(crate) target: String,
    /// The attempt it will be delivered as.
    pub(crate) attempt: u32,
    /// Not delivered before this time (Unix milliseconds).
    pub(crate) due_ms: i64,
}

/// A record's parts, ready for a `FutureRecord`.
pub(crate) struct Encoded {
    pub(crate) headers: OwnedHeaders,
    pub(crate) timestamp_ms: i64,
    /// Bytes of the record on the wire (approximately, rounded up).
    pub(crate) size: usize,
}

pub(crate) fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The due time of a record held until `at`, in Unix milliseconds rounded
/// up: a record is due when [`unix_ms`] of now reaches it, which is never
/// before `at` (rounding down let a delay end up to 1 ms early).
pub(crate) fn due_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| {
        i64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(i64::MAX)
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::{due_ms, unix_ms};

    #[test]
    fn a_due_time_is_never_before_the_instant_it_stands_for() {
        let at = UNIX_EPOCH + Duration::from_nanos(1_000_000_001);
        assert_eq!(due_ms(at), 1001);
        // Due once now's milliseconds reach it: 1 ns before is not.
        assert!(unix_ms(at) < due_ms(at));
        assert!(unix_ms(UNIX_EPOCH + Duration::from_millis(1001)) >= due_ms(at));
        let whole = UNIX_EPOCH + Duration::from_millis(1000);
        assert_eq!(due_ms(whole), 1000);
        assert_eq!(due_ms(SystemTime::UNIX_EPOCH), 0);
    }
}

/// Encodes a message's id, headers and time (key and payload travel as they
/// are), plus the retry headers when given.
pub(crate) fn encode(message: &Message, retry: Option<&Retry>) -> Encoded {
    let count = message.headers().len() + 1 + if retry.is_some() { 3 } else { 0 };
    let mut headers = OwnedHeaders::new_with_capacity(count);
    let mut size = RECORD_OVERHEAD + message.payload().len() + message.key().map_or(0, str::len);
    let mut put = |headers: OwnedHeaders, key: &str, value: &[u8]| {
        size += key.len() + value.len() + HEADER_OVERHEAD;
        headers.insert(Header {
            key,
            value: Some(value),
        })
    };
    headers = put(headers, ID, message.id().as_bytes());
    for (k, v) in message.headers().iter() {
        headers = put(headers, k, v.as_bytes());
    }
    if let Some(r) = retry {
        headers = put(headers, RETRY_FOR, r.target.as_bytes());
        headers = put(headers, RETRY_ATTEMPT, r.attempt.to_string().as_bytes());
        headers = put(headers, RETRY_DUE, r.due_ms.to_string().as_bytes());
    }
    let timestamp_ms = unix_ms(message.published_at().unwrap_or_else(SystemTime::now));
    Encoded {
        headers,
        timestamp_ms,
        size,
    }
}

/// A decoded record.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) message: Message,
    /// The retry headers, on a record of a retry topic.
    pub(crate) retry: Option<Retry>,
}

/// Decodes a record; `retry` says whether it came from a retry topic (only
/// there are the retry headers read).
pub(crate) fn decode(record: &BorrowedMessage<'_>, from_retry_topic: bool) -> Decoded {
    let mut id = None;
    let mut user = Headers::new();
    let mut target = None;
    let mut attempt = None;
    let mut due = None;
    if let Some(hs) = record.headers() {
        for h in hs.iter() {
            let value = h.value.unwrap_or_default();
            let text = || String::from_utf8_lossy(value).into_owned();
            match h.key {
                // Borrowed where it is valid UTF-8: copied once, into the
                // message's shared id.
                ID => id = Some(String::from_utf8_lossy(value)),
                RETRY_FOR if from_retry_topic => target = Some(text()),
                RETRY_ATTEMPT if from_retry_topic => attempt = text().parse::<u32>().ok(),
                RETRY_DUE if from_retry_topic => due = text().parse::<i64>().ok(),
                key => {
                    user.insert(key, text());
                }
            }
        }
    }
    let id: std::sync::Arc<str> = match id {
        Some(id) => id.into(),
        None => format!(
            "kafka:{}:{}:{}",
            record.topic(),
            record.partition(),
            record.offset()
        )
        .into(),
    };
    let key = record
        .key()
        .map(|k| String::from_utf8_lossy(k).into_owned());
    let payload = Bytes::copy_from_slice(record.payload().unwrap_or_default());
    let published_at = record
        .timestamp()
        .to_millis()
        .and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
    let retry = match (target, attempt, due) {
        (Some(target), Some(attempt), Some(due_ms)) => Some(Retry {
            target,
            attempt,
            due_ms,
        }),
        _ => None,
    };
    Decoded {
        message: Message::from_parts(id, key, user, payload, published_at),
        retry,
    }
}
