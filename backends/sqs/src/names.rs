//! Mapping portable names onto SQS queue and SNS topic names.
//!
//! Both allow only `[A-Za-z0-9_-]` (SQS queues at most 80 characters, SNS
//! topics 256), so a portable name is escaped into one token: `_` → `__`,
//! `.` → `_d`. The escape is injective; `_s` (never produced by it) joins a
//! topic and a subscription, and `_h` marks a shortened name ending in a
//! SHA-256 digest of the full one. FIFO queues and topics end in `.fifo`
//! (within the same length limits).

use switchyard_core::driver::support::{digest_hex, escape_token, escaped_prefix};

/// Longest SQS queue name.
pub(crate) const MAX_QUEUE: usize = 80;
/// Longest SNS topic name.
pub(crate) const MAX_TOPIC: usize = 256;
const PREFIX: &str = "sy-";
const FIFO: &str = ".fifo";

/// `PREFIX + body (+ .fifo)`, or a readable prefix of the body plus a
/// digest when longer than `max`.
fn fit(body: &str, max: usize, fifo: bool) -> String {
    let suffix = if fifo { FIFO } else { "" };
    let full = format!("{PREFIX}{body}{suffix}");
    if full.len() <= max {
        return full;
    }
    let max = max - suffix.len();
    let hex = digest_hex(body, 16);
    let keep = max - PREFIX.len() - 2 - hex.len();
    let prefix = escaped_prefix(body, keep);
    format!("{PREFIX}{prefix}_h{hex}{suffix}")
}

/// The queue of a topic in queue mode.
pub(crate) fn topic_queue(topic: &str, fifo: bool) -> String {
    fit(&escape_token(topic), MAX_QUEUE, fifo)
}

/// The queue of a subscription in fan-out mode.
pub(crate) fn subscription_queue(topic: &str, subscription: &str, fifo: bool) -> String {
    fit(
        &format!("{}_s{}", escape_token(topic), escape_token(subscription)),
        MAX_QUEUE,
        fifo,
    )
}

/// The SNS topic of a topic in fan-out mode.
pub(crate) fn sns_topic(topic: &str, fifo: bool) -> String {
    fit(&escape_token(topic), MAX_TOPIC, fifo)
}

/// A FIFO `MessageGroupId` for a key (or, for a message without one, its
/// id): the key itself when SQS accepts it (1–128 printable ASCII
/// characters other than space), else a digest of it. Two keys sharing a
/// group only share its order.
pub(crate) fn group_id(key: &str) -> String {
    if (1..=128).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) {
        return key.to_owned();
    }
    format!("{PREFIX}h{}", digest_hex(key, 32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(n: &str, max: usize) -> bool {
        n.len() <= max
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }

    #[test]
    fn names_are_valid_and_distinct() {
        assert_eq!(topic_queue("orders.created", false), "sy-orders_dcreated");
        assert_eq!(
            topic_queue("orders.created", true),
            "sy-orders_dcreated.fifo"
        );
        assert_ne!(
            subscription_queue("a.b", "c", false),
            subscription_queue("a", "b.c", false)
        );
        assert_ne!(
            subscription_queue("a_s", "b", false),
            subscription_queue("a", "s_b", false)
        );
        let long = "x.".repeat(100);
        for n in [
            topic_queue(&long, false),
            subscription_queue(&long, &long, false),
            sns_topic(&long, false),
            topic_queue("a", false),
        ] {
            assert!(valid(&n, MAX_QUEUE.max(n.len().min(MAX_TOPIC))), "{n}");
        }
        for fifo in [false, true] {
            assert!(topic_queue(&long, fifo).len() <= MAX_QUEUE);
            assert!(subscription_queue(&long, "s", fifo).len() <= MAX_QUEUE);
            assert_ne!(
                subscription_queue(&long, "s1", fifo),
                subscription_queue(&long, "s2", fifo)
            );
        }
        for n in [
            topic_queue(&long, true),
            subscription_queue(&long, &long, true),
            sns_topic(&long, true),
        ] {
            let body = n.strip_suffix(".fifo").unwrap();
            assert!(valid(body, MAX_QUEUE.max(n.len().min(MAX_TOPIC))), "{n}");
        }
    }

    #[test]
    fn group_ids_are_valid() {
        assert_eq!(group_id("customer-7"), "customer-7");
        let key = "caf\u{e9} with spaces";
        let g = group_id(key);
        assert!(
            g.len() <= 128 && g.bytes().all(|b| b.is_ascii_graphic()),
            "{g}"
        );
        assert_eq!(g, group_id(key));
        assert_ne!(g, group_id("other key"));
        assert!(group_id(&"k".repeat(129)).len() <= 128);
    }
}
