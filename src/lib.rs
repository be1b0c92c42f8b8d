//! switchyard: one API for publishing and consuming messages — publish,
//! subscribe, ack/nack, retries with delay, dead-letter topics — over a broker
//! chosen by Cargo feature and URL.
//!
//! A service picks its broker with a URL; every backend passes one shared
//! conformance suite, so moving from one broker to another is a configuration
//! change, and tests can run against the in-process memory broker with the
//! same semantics.
//!
//! | scheme | feature | backend |
//! |---|---|---|
//! | `memory://[name]` | `memory` (default) | in-process broker ([`memory`]) |
//! | `kafka://host:port[,host:port…]` | `kafka` | Apache Kafka ([`kafka`](https://docs.rs/switchyard-kafka)) |
//! | `amqp://user:pass@host:port[,host:port…]/vhost` (or `amqps://`) | `rabbitmq` | RabbitMQ ([`rabbitmq`](https://docs.rs/switchyard-rabbitmq)) |
//! | `nats://host:port[,host:port…]` | `nats` | NATS JetStream ([`nats`](https://docs.rs/switchyard-nats)) |
//! | `sqs://?region=…[&endpoint=…&mode=queue\|fanout]` | `sqs` | AWS SQS, with SNS fan-out ([`sqs`](https://docs.rs/switchyard-sqs)) |
//!
//! # Features
//!
//! - `memory` (default), `kafka`, `nats`, `rabbitmq`, `sqs`: the backends;
//!   [`connect`] with a scheme whose feature is off returns
//!   [`Error::FeatureNotEnabled`] naming it.
//! - `json`: serde JSON helpers on [`Message`] and [`Delivery`].
//! - `otel`: W3C trace context injected into headers on publish and made the
//!   parent of the consumer runtime's span on receive.
//! - `metrics`: the consumer runtime's counters and handler latency,
//!   through the `metrics` facade.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use switchyard::{Message, Retry, SubscribeOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> switchyard::Result<()> {
//! let client = switchyard::connect("memory://docs").await?;
//! let opts = SubscribeOptions::new("billing").with_max_attempts(3);
//!
//! // Create the subscription at deploy time, so nothing published before the
//! // first consumer starts is lost.
//! client.ensure_subscription("orders.created", &opts).await?;
//! client
//!     .publish("orders.created", Message::new(r#"{"order":1}"#).with_key("customer-7"))
//!     .await?;
//!
//! let mut sub = client.subscribe("orders.created", opts).await?;
//! let delivery = sub.recv().await?;
//! assert_eq!(delivery.attempt(), 1);
//! delivery.nack(Retry::after(Duration::from_millis(10))).await?; // comes back later
//! let again = sub.recv().await?;
//! assert_eq!(again.attempt(), 2);
//! again.ack().await?; // settled for good
//! # Ok(()) }
//! ```
//!
//! # Delivery semantics
//!
//! Publishing is confirmed (`publish` returns after the broker durably
//! accepted the message); delivery is at-least-once, so consumers
//! de-duplicate by [`Message::id`]. Nacked messages come back with
//! `attempt + 1`; after `max_attempts` (or on [`Delivery::dead_letter`]) they
//! move to the subscription's dead-letter topic with `sy-*` headers saying
//! why, and [`Client::redrive`] moves them back. See [`switchyard_core`] for
//! the full contract.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub use switchyard_core::*;

/// The in-process broker (feature `memory`).
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use switchyard_memory as memory;

/// The Apache Kafka backend (feature `kafka`).
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use switchyard_kafka as kafka;

/// The NATS JetStream backend (feature `nats`).
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub use switchyard_nats as nats;

/// The RabbitMQ backend (feature `rabbitmq`).
#[cfg(feature = "rabbitmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
pub use switchyard_rabbitmq as rabbitmq;

/// The SQS backend (feature `sqs`).
#[cfg(feature = "sqs")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqs")))]
pub use switchyard_sqs as sqs;

/// Connects to the broker named by `url`, choosing the backend by scheme:
/// `memory://`, `kafka://`, `amqp://` / `amqps://`, `nats://` (or `tls://`), `sqs://`.
///
/// The returned [`Client`] is a cheap, cloneable handle.
///
/// # Errors
///
/// [`Error::InvalidUrl`] when the URL cannot be parsed or its scheme is
/// unknown (the message says what is wrong, without any password);
/// [`Error::FeatureNotEnabled`] naming the Cargo feature to enable when the
/// scheme's backend is not compiled in; the backend's connection errors
/// (within its connect timeout).
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let err = switchyard::connect("carrier-pigeon://loft").await.unwrap_err();
/// assert!(err.to_string().contains("unknown scheme"));
/// # }
/// ```
pub async fn connect(url: &str) -> Result<Client> {
    // The scheme alone picks the backend; each backend parses the rest its
    // own way (NATS, for one, takes several comma-separated servers).
    let scheme = match url.split_once("://") {
        Some((scheme, _))
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) =>
        {
            scheme.to_ascii_lowercase()
        }
        _ => {
            return Err(Error::InvalidUrl {
                url: redact_url(url),
                reason: "expected SCHEME://…, e.g. memory://, nats://127.0.0.1:4222, amqp://…"
                    .into(),
            });
        }
    };
    #[allow(unused_variables, reason = "unused when every backend is compiled in")]
    let missing = |feature: &'static str| Error::FeatureNotEnabled {
        scheme: scheme.clone(),
        feature,
    };
    match scheme.as_str() {
        "memory" => {
            #[cfg(feature = "memory")]
            return switchyard_memory::connect(url);
            #[cfg(not(feature = "memory"))]
            return Err(missing("memory"));
        }
        "kafka" => {
            #[cfg(feature = "kafka")]
            return switchyard_kafka::connect(url).await;
            #[cfg(not(feature = "kafka"))]
            return Err(missing("kafka"));
        }
        "amqp" | "amqps" => {
            #[cfg(feature = "rabbitmq")]
            return switchyard_rabbitmq::connect(url).await;
            #[cfg(not(feature = "rabbitmq"))]
            return Err(missing("rabbitmq"));
        }
        "nats" | "tls" => {
            #[cfg(feature = "nats")]
            return switchyard_nats::connect(url).await;
            #[cfg(not(feature = "nats"))]
            return Err(missing("nats"));
        }
        "sqs" => {
            #[cfg(feature = "sqs")]
            return switchyard_sqs::connect(url).await;
            #[cfg(not(feature = "sqs"))]
            return Err(missing("sqs"));
        }
        other => Err(Error::InvalidUrl {
            url: redact_url(url),
            reason: format!(
                "unknown scheme {other:?}; expected memory, kafka, amqp, amqps, nats or sqs"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scheme_without_feature_names_the_feature() {
        let mut cases = Vec::new();
        if cfg!(not(feature = "kafka")) {
            cases.push(("kafka://127.0.0.1:9092", "kafka"));
        }
        if cfg!(not(feature = "sqs")) {
            cases.push(("sqs://?region=us-east-1", "sqs"));
        }
        if cfg!(not(feature = "rabbitmq")) {
            cases.push(("amqp://guest:guest@127.0.0.1:5672/%2f", "rabbitmq"));
            cases.push(("amqps://u:p@host/vh", "rabbitmq"));
        }
        for (url, feature) in cases {
            match connect(url).await {
                Err(Error::FeatureNotEnabled { feature: f, .. }) => assert_eq!(f, feature, "{url}"),
                other => panic!("{url}: expected FeatureNotEnabled, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn malformed_urls_say_what_is_wrong_without_passwords() {
        let err = connect("not a url").await.unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }), "{err:?}");
        assert!(err.to_string().contains("expected SCHEME://"), "{err}");

        let err = connect("ftp://user:hunter2@host").await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("unknown scheme \"ftp\""), "{text}");
        assert!(!text.contains("hunter2"), "{text}");

        if cfg!(feature = "memory") {
            let err = connect("memory://x?bogus=1").await.unwrap_err();
            assert!(
                err.to_string().contains("unknown parameter \"bogus\""),
                "{err}"
            );
        }

        assert_eq!(redact_url("amqp://u:hunter2@[bad"), "amqp://***@[bad");
        assert_eq!(redact_url("nats://tok@h:1?token=x"), "nats://***@h:1?***");
    }

    #[cfg(not(feature = "nats"))]
    #[tokio::test]
    async fn nats_without_feature_names_it() {
        assert!(matches!(
            connect("nats://127.0.0.1:4222").await,
            Err(Error::FeatureNotEnabled {
                feature: "nats",
                ..
            })
        ));
    }

    #[cfg(feature = "nats")]
    #[tokio::test]
    async fn multi_server_nats_urls_reach_the_nats_backend() {
        // Two unreachable loopback servers: the NATS backend parses the list
        // and reports a connection error (not a URL error) within its timeout.
        let err = connect("nats://127.0.0.1:9,127.0.0.1:10?connect_timeout=1s")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    }

    #[cfg(feature = "rabbitmq")]
    #[tokio::test]
    async fn amqp_urls_reach_the_rabbitmq_backend() {
        // A loopback port nobody listens on: a connection error, not a URL
        // error, and no password in it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let err = connect(&format!(
            "amqp://u:hunter2@127.0.0.1:{port}/%2f?connect_timeout=1s"
        ))
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Connection { .. }), "{err:?}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn memory_urls_share_named_brokers() {
        let a = connect("memory://shared-by-name").await.unwrap();
        let b = connect("memory://shared-by-name").await.unwrap();
        let opts = SubscribeOptions::new("s");
        a.ensure_subscription("t", &opts).await.unwrap();
        b.publish("t", Message::new("x").with_id("one"))
            .await
            .unwrap();
        let mut sub = a.subscribe("t", opts).await.unwrap();
        let d = sub.recv().await.unwrap();
        assert_eq!(d.message().id(), "one");
        d.ack().await.unwrap();
        // Closing one connection does not close the broker for the other.
        a.close().await.unwrap();
        b.publish("t", Message::new("y")).await.unwrap();
    }
}
