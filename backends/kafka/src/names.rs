//! Mapping portable names onto Kafka topics and consumer groups.
//!
//! Kafka topic names are 1–249 characters of `[a-zA-Z0-9._-]`, other than
//! `.` and `..`: every portable name (at most 200 characters of the same
//! set) is a valid topic name as it is. So:
//!
//! - topic `T` → Kafka topic `T`;
//! - subscription `S` on `T` → consumer group `T:S` (group ids are global
//!   to the cluster while a subscription belongs to its topic; `:` cannot
//!   occur in a portable name, so the pair is unambiguous);
//! - the retry topic holding `S`'s nacks → `T.S.retry`, or a readable prefix
//!   plus a SHA-256 digest of `T:S` when that would pass 249 characters.
//!   Two pairs may map to the same retry topic (`a.b` + `c` and `a` + `b.c`);
//!   every retry record names its subscription in a header, and a consumer
//!   skips records meant for another, so a shared retry topic is harmless.

use switchyard_core::driver::support::digest_hex;

/// Kafka's longest topic name.
pub(crate) const MAX_TOPIC: usize = 249;

/// The consumer group of a subscription on a topic.
pub(crate) fn group(topic: &str, subscription: &str) -> String {
    format!("{topic}:{subscription}")
}

/// The retry topic of a subscription on a topic.
pub(crate) fn retry_topic(topic: &str, subscription: &str) -> String {
    let full = format!("{topic}.{subscription}.retry");
    if full.len() <= MAX_TOPIC {
        return full;
    }
    // Portable names are ASCII, so any byte index is a char boundary.
    format!(
        "{}.{}.retry",
        &full[..200],
        digest_hex(&group(topic, subscription), 16)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_readable_and_long_ones_fit() {
        assert_eq!(group("orders.created", "billing"), "orders.created:billing");
        assert_eq!(
            retry_topic("orders.created", "billing"),
            "orders.created.billing.retry"
        );
        let t = "t".repeat(200);
        let a = retry_topic(&t, &"a".repeat(200));
        let b = retry_topic(&t, &"b".repeat(200));
        assert!(a.len() <= MAX_TOPIC && b.len() <= MAX_TOPIC);
        assert_ne!(a, b);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        );
    }
}
