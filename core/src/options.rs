//! Subscription options, retry instructions and backend capabilities.

use std::time::Duration;

use crate::{
    error::{Error, NameKind, Result},
    names::validate_name,
};

/// Default number of unsettled deliveries a consumer may hold.
pub const DEFAULT_PREFETCH: usize = 64;
/// Default time a delivery may stay unsettled before it is redelivered.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of delivery attempts before a message is dead-lettered.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Name of the subscription every dead-letter topic gets, so dead letters are
/// kept even before anybody reads them.
pub const DEAD_LETTERS_SUBSCRIPTION: &str = "dead-letters";

/// How to subscribe: the subscription (consumer group) name and its limits.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use switchyard_core::SubscribeOptions;
/// let opts = SubscribeOptions::new("billing")
///     .with_prefetch(16)
///     .with_ack_timeout(Duration::from_secs(10))
///     .with_max_attempts(3);
/// assert_eq!(opts.dead_letter_topic_for("orders"), "orders.billing.dlq");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOptions {
    name: String,
    prefetch: usize,
    ack_timeout: Duration,
    max_attempts: u32,
    dead_letter_topic: Option<String>,
}

impl SubscribeOptions {
    /// Options for the subscription `name`, with the defaults: prefetch 64,
    /// ack timeout 30 s, max attempts 5, dead-letter topic
    /// `<topic>.<subscription>.dlq`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            prefetch: DEFAULT_PREFETCH,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            dead_letter_topic: None,
        }
    }

    /// The options of the `dead-letters` subscription every dead-letter topic
    /// gets: a high attempt limit, so reading dead letters (for example to
    /// redrive them) never dead-letters them again.
    #[must_use]
    pub fn dead_letters() -> Self {
        Self::new(DEAD_LETTERS_SUBSCRIPTION).with_max_attempts(1_000)
    }

    /// Most unsettled deliveries one consumer may hold (default 64, at least 1).
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// How long a delivery may stay unsettled before the broker redelivers it
    /// (default 30 s).
    #[must_use]
    pub fn with_ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Delivery attempts before the message is dead-lettered (default 5, at least 1).
    #[must_use]
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// The dead-letter topic (default `<topic>.<subscription>.dlq`).
    #[must_use]
    pub fn with_dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// The subscription name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The prefetch limit.
    #[must_use]
    pub fn prefetch(&self) -> usize {
        self.prefetch
    }

    /// The ack timeout.
    #[must_use]
    pub fn ack_timeout(&self) -> Duration {
        self.ack_timeout
    }

    /// The attempt limit.
    #[must_use]
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The dead-letter topic for a subscription on `topic`:
    /// `<topic>.<subscription>.dlq`, or — when that would be longer than the
    /// 200 characters a name may have — its first 179 characters, a `.`, a
    /// 16-hex-digit hash of topic and subscription and `.dlq`, so every valid
    /// topic and subscription has a valid, distinct dead-letter topic.
    #[must_use]
    pub fn dead_letter_topic_for(&self, topic: &str) -> String {
        if let Some(t) = &self.dead_letter_topic {
            return t.clone();
        }
        let name = format!("{topic}.{}.dlq", self.name);
        if name.len() <= crate::MAX_NAME_LEN {
            return name;
        }
        // FNV-1a, 64 bit: stable across platforms and releases.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in topic.bytes().chain([0]).chain(self.name.bytes()) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let base = format!("{topic}.{}", self.name);
        // Names are ASCII, so any byte index is a char boundary.
        format!("{}.{hash:016x}.dlq", &base[..crate::MAX_NAME_LEN - 21])
    }

    /// Checks the names and limits for a subscription on `topic`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] for a bad topic, subscription or dead-letter
    /// topic name; [`Error::Config`] for a zero prefetch, ack timeout or
    /// attempt limit.
    pub fn validate(&self, topic: &str) -> Result<()> {
        validate_name(NameKind::Topic, topic)?;
        validate_name(NameKind::Subscription, &self.name)?;
        let dead_letter_topic = self.dead_letter_topic_for(topic);
        validate_name(NameKind::Topic, &dead_letter_topic)?;
        if dead_letter_topic == topic {
            return Err(Error::Config(
                "the dead-letter topic must differ from the topic it serves".into(),
            ));
        }
        if self.prefetch == 0 {
            return Err(Error::Config("prefetch must be at least 1".into()));
        }
        if self.max_attempts == 0 {
            return Err(Error::Config("max_attempts must be at least 1".into()));
        }
        if self.ack_timeout.is_zero() {
            return Err(Error::Config("ack_timeout must be positive".into()));
        }
        Ok(())
    }
}

/// What a `nack` asks for: redeliver now, or not before a delay.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use switchyard_core::Retry;
/// assert_eq!(Retry::now().delay(), None);
/// assert_eq!(Retry::after(Duration::from_secs(5)).delay(), Some(Duration::from_secs(5)));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retry {
    delay: Option<Duration>,
}

impl Retry {
    /// Redeliver as soon as possible.
    #[must_use]
    pub fn now() -> Self {
        Self { delay: None }
    }

    /// Redeliver no sooner than `delay` from now.
    #[must_use]
    pub fn after(delay: Duration) -> Self {
        Self {
            delay: (!delay.is_zero()).then_some(delay),
        }
    }

    /// The requested delay, `None` for immediate.
    #[must_use]
    pub fn delay(&self) -> Option<Duration> {
        self.delay
    }
}

/// How a backend orders messages that share a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyOrdering {
    /// Same key, same publisher → publish order at a consumer (when nothing is nacked).
    PerKey,
    /// Per-key order only in a special mode the backend documents (e.g. SQS FIFO).
    PerKeyInSpecialMode,
    /// No ordering guarantee.
    None,
}

/// What a backend can do. Applications read it to know what they may rely
/// on; the conformance suite reads it to know which cases do not apply.
///
/// Construct with [`Capabilities::new`] and the `with_*` setters (backend
/// authors); read the public fields.
///
/// # Examples
///
/// ```
/// use switchyard_core::{Capabilities, KeyOrdering};
/// let caps = Capabilities::new(1024 * 1024).with_ordering(KeyOrdering::PerKey);
/// assert!(caps.fan_out);
/// assert_eq!(caps.max_payload, 1024 * 1024);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Name of the backend (`"memory"`, `"kafka"`, …).
    pub backend: &'static str,
    /// Largest payload accepted, in bytes.
    pub max_payload: usize,
    /// Per-key ordering guarantee.
    pub ordering: KeyOrdering,
    /// Whether `nack(Retry::after(d))` is held by the broker itself (survives
    /// a consumer restart).
    pub native_delay: bool,
    /// Several subscriptions on one topic each receive every message.
    pub fan_out: bool,
    /// Several consumers on one subscription share its messages.
    pub competing_consumers: bool,
    /// Already-consumed messages can be read again (log brokers).
    pub replay: bool,
    /// Messages survive a broker restart.
    pub persistent: bool,
    /// Smallest ack timeout the broker honours.
    pub min_ack_timeout: std::time::Duration,
    /// A delivery handed back unsettled counts as an attempt even when the
    /// application never saw it: the broker's own delivery count rises on
    /// every return (NATS `num_delivered`, RabbitMQ quorum queues'
    /// `x-delivery-count`, SQS `ApproximateReceiveCount`). switchyard bounds
    /// the cost (DESIGN §3.14): a receiver holds at most its prefetch, the
    /// consumer runtime receives only while it holds less than that and
    /// keeps the lease of all it holds, and `close` hands back at once what
    /// is left — so a restart costs each returned delivery one attempt, and
    /// what is handed back is delivered next; and a receiver takes one
    /// delivery at a time until it hands out a first delivery
    /// ([`SlowStart`](crate::driver::SlowStart)), so a message that crashes
    /// its consumer is dead-lettered alone. `false` where only deliveries
    /// the application received count (memory, Kafka).
    pub returns_count_attempts: bool,
}

impl Capabilities {
    /// Capabilities of a backend with all features and this payload limit.
    #[must_use]
    pub fn new(max_payload: usize) -> Self {
        Self {
            backend: "unknown",
            max_payload,
            ordering: KeyOrdering::PerKey,
            native_delay: true,
            fan_out: true,
            competing_consumers: true,
            replay: false,
            persistent: true,
            min_ack_timeout: Duration::from_millis(1),
            returns_count_attempts: false,
        }
    }

    /// Sets the backend name.
    #[must_use]
    pub fn with_backend(mut self, name: &'static str) -> Self {
        self.backend = name;
        self
    }

    /// Sets the ordering guarantee.
    #[must_use]
    pub fn with_ordering(mut self, ordering: KeyOrdering) -> Self {
        self.ordering = ordering;
        self
    }

    /// Sets whether delays are held by the broker.
    #[must_use]
    pub fn with_native_delay(mut self, yes: bool) -> Self {
        self.native_delay = yes;
        self
    }

    /// Sets fan-out support.
    #[must_use]
    pub fn with_fan_out(mut self, yes: bool) -> Self {
        self.fan_out = yes;
        self
    }

    /// Sets competing-consumer support.
    #[must_use]
    pub fn with_competing_consumers(mut self, yes: bool) -> Self {
        self.competing_consumers = yes;
        self
    }

    /// Sets replay support.
    #[must_use]
    pub fn with_replay(mut self, yes: bool) -> Self {
        self.replay = yes;
        self
    }

    /// Sets persistence.
    #[must_use]
    pub fn with_persistent(mut self, yes: bool) -> Self {
        self.persistent = yes;
        self
    }

    /// Sets the smallest ack timeout the broker honours.
    #[must_use]
    pub fn with_min_ack_timeout(mut self, d: Duration) -> Self {
        self.min_ack_timeout = d;
        self
    }

    /// Sets whether a delivery handed back unseen still counts as an
    /// attempt.
    #[must_use]
    pub fn with_returns_count_attempts(mut self, yes: bool) -> Self {
        self.returns_count_attempts = yes;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let o = SubscribeOptions::new("s");
        assert_eq!(o.prefetch(), DEFAULT_PREFETCH);
        assert_eq!(o.max_attempts(), 5);
        assert_eq!(o.dead_letter_topic_for("t"), "t.s.dlq");
        o.validate("t").unwrap();
        assert!(
            SubscribeOptions::new("s")
                .with_prefetch(0)
                .validate("t")
                .is_err()
        );
        assert!(
            SubscribeOptions::new("s")
                .with_max_attempts(0)
                .validate("t")
                .is_err()
        );
        assert!(SubscribeOptions::new("s b").validate("t").is_err());
        // Every valid topic gets a valid, distinct default dead-letter topic.
        let long = "x".repeat(200);
        let a = SubscribeOptions::new("s");
        let b = SubscribeOptions::new("t");
        a.validate(&long).unwrap();
        let (da, db) = (
            a.dead_letter_topic_for(&long),
            b.dead_letter_topic_for(&long),
        );
        assert!(da.len() <= 200 && da.ends_with(".dlq"), "{da}");
        assert_ne!(da, db);
        assert_eq!(da, a.dead_letter_topic_for(&long));
        assert!(
            SubscribeOptions::new("s")
                .with_dead_letter_topic("t")
                .validate("t")
                .is_err()
        );
    }

    #[test]
    fn zero_delay_is_immediate() {
        assert_eq!(Retry::after(Duration::ZERO), Retry::now());
    }
}
