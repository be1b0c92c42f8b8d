//! Mapping portable names onto SQS queue and SNS topic names.
//!
//! Both allow only `[A-Za-z0-9_-]` (SQS queues at most 80 characters, SNS
//! topics 256), so a portable name is escaped into one token: `_` → `__`,
//! `.` → `_d`. The escape is injective; `_s` (never produced by it) joins a
//! topic and a subscription, and `_h` marks a shortened name ending in a
//! SHA-256 digest of the full one.

use sha2::{Digest, Sha256};

/// Longest SQS queue name.
pub(crate) const MAX_QUEUE: usize = 80;
/// Longest SNS topic name.
pub(crate) const MAX_TOPIC: usize = 256;
const PREFIX: &str = "sy-";

fn token(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        match c {
            '_' => out.push_str("__"),
            '.' => out.push_str("_d"),
            c => out.push(c),
        }
    }
    out
}

/// `PREFIX + body`, or a readable prefix of it plus a digest when longer
/// than `max`.
fn fit(body: &str, max: usize) -> String {
    let full = format!("{PREFIX}{body}");
    if full.len() <= max {
        return full;
    }
    let digest = Sha256::digest(body.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    let keep = max - PREFIX.len() - 2 - hex.len();
    let mut prefix = &body[..keep.min(body.len())];
    // Do not end inside an escape (`_` starts one).
    let underscores = prefix.chars().rev().take_while(|c| *c == '_').count();
    if underscores % 2 == 1 {
        prefix = &prefix[..prefix.len() - 1];
    }
    format!("{PREFIX}{prefix}_h{hex}")
}

/// The queue of a topic in queue mode.
pub(crate) fn topic_queue(topic: &str) -> String {
    fit(&token(topic), MAX_QUEUE)
}

/// The queue of a subscription in fan-out mode.
pub(crate) fn subscription_queue(topic: &str, subscription: &str) -> String {
    fit(
        &format!("{}_s{}", token(topic), token(subscription)),
        MAX_QUEUE,
    )
}

/// The SNS topic of a topic in fan-out mode.
pub(crate) fn sns_topic(topic: &str) -> String {
    fit(&token(topic), MAX_TOPIC)
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
        assert_eq!(topic_queue("orders.created"), "sy-orders_dcreated");
        assert_ne!(
            subscription_queue("a.b", "c"),
            subscription_queue("a", "b.c")
        );
        assert_ne!(
            subscription_queue("a_s", "b"),
            subscription_queue("a", "s_b")
        );
        let long = "x.".repeat(100);
        for n in [
            topic_queue(&long),
            subscription_queue(&long, &long),
            sns_topic(&long),
            topic_queue("a"),
        ] {
            assert!(valid(&n, MAX_QUEUE.max(n.len().min(MAX_TOPIC))), "{n}");
        }
        assert!(topic_queue(&long).len() <= MAX_QUEUE);
        assert!(subscription_queue(&long, "s").len() <= MAX_QUEUE);
        assert_ne!(
            subscription_queue(&long, "s1"),
            subscription_queue(&long, "s2")
        );
    }
}
