//! Mapping portable names onto RabbitMQ exchanges and queues.
//!
//! Exchange and queue names may be up to 255 bytes and must not start with
//! the reserved `amq.` prefix; queues are global to a vhost while a
//! subscription belongs to its topic. So:
//!
//! - topic `T` → fanout exchange `sy.T`;
//! - subscription `S` on `T` → quorum queue `sy.T:S` (`:` cannot occur in a
//!   portable name, so the pair is unambiguous); when that is longer than
//!   [`MAX_QUEUE`] bytes, `sy.` + a readable prefix + `~` + a SHA-256
//!   digest of `T:S` (`~` cannot occur in the verbatim form either);
//! - the wait queue holding delayed nacks of `S` for `d` ms during lease
//!   period `e` of `l` seconds → `<queue>~w<d>~<l>s<e>` (the broker's
//!   arguments are a function of the name, so two clients never declare
//!   one name differently).

use switchyard_core::driver::support::digest_hex;

/// Prefix of every exchange and queue switchyard declares.
pub(crate) const PREFIX: &str = "sy.";
/// Longest subscription queue name kept verbatim (leaves room for the
/// wait-queue suffix within AMQP's 255 bytes).
pub(crate) const MAX_QUEUE: usize = 200;

/// The fanout exchange of a topic.
pub(crate) fn exchange(topic: &str) -> String {
    format!("{PREFIX}{topic}")
}

/// The quorum queue of a subscription on a topic.
pub(crate) fn queue(topic: &str, subscription: &str) -> String {
    let full = format!("{PREFIX}{topic}:{subscription}");
    if full.len() <= MAX_QUEUE {
        return full;
    }
    let pair = &full[PREFIX.len()..];
    // Portable names are ASCII, so any byte index is a char boundary.
    format!("{PREFIX}{}~{}", &pair[..120], digest_hex(pair, 16))
}

/// The wait queue holding a subscription's nacks delayed by `delay_ms`
/// during lease period `epoch` of `lease_s` seconds.
pub(crate) fn wait_queue(queue: &str, delay_ms: u64, lease_s: u64, epoch: u64) -> String {
    format!("{queue}~w{delay_ms}~{lease_s}s{epoch}")
}

/// Rounds a delay up to two significant digits of milliseconds (at most
/// 10 % later, never earlier), so a subscription needs few wait queues.
pub(crate) fn delay_bucket_ms(delay: std::time::Duration) -> u64 {
    let ms = u64::try_from(delay.as_nanos().div_ceil(1_000_000))
        .unwrap_or(u64::MAX)
        .max(1);
    let mut scale = 1u64;
    while ms / scale >= 100 {
        scale *= 10;
    }
    ms.div_ceil(scale).saturating_mul(scale)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn pairs_do_not_collide_and_fit() {
        assert_eq!(queue("a.b", "c"), "sy.a.b:c");
        assert_ne!(queue("a.b", "c"), queue("a", "b.c"));
        assert_eq!(exchange("amq.direct"), "sy.amq.direct");
        let long = "t".repeat(200);
        let q = queue(&long, &long);
        assert!(q.len() <= MAX_QUEUE, "{}", q.len());
        assert_ne!(q, queue(&long, &"u".repeat(200)));
        assert!(wait_queue(&q, u64::MAX, 3600, u64::MAX).len() <= 255);
        assert!(
            wait_queue(
                &queue(&"x".repeat(98), &"y".repeat(98)),
                u64::MAX,
                3600,
                u64::MAX
            )
            .len()
                <= 255
        );
    }

    #[test]
    fn delays_round_up_by_at_most_ten_percent() {
        assert_eq!(delay_bucket_ms(Duration::from_millis(0)), 1);
        assert_eq!(delay_bucket_ms(Duration::from_millis(99)), 99);
        assert_eq!(delay_bucket_ms(Duration::from_millis(2000)), 2000);
        assert_eq!(delay_bucket_ms(Duration::from_millis(1234)), 1300);
        assert_eq!(delay_bucket_ms(Duration::from_millis(45_601)), 46_000);
        // A fraction of a millisecond rounds up, never down.
        assert_eq!(delay_bucket_ms(Duration::from_micros(1_500)), 2);
        assert_eq!(delay_bucket_ms(Duration::from_micros(2_000_001)), 2100);
        for ms in [1u64, 7, 101, 999, 1001, 12_345, 3_600_001] {
            let b = delay_bucket_ms(Duration::from_millis(ms));
            assert!(b >= ms && b * 10 <= ms * 11, "{ms} -> {b}");
        }
    }
}
