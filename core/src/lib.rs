//! The core contract of [switchyard](https://docs.rs/switchyard): one API for
//! publishing and consuming messages over Kafka, RabbitMQ, NATS JetStream, SQS
//! and an in-process broker.
//!
//! This crate depends on no broker client. It holds:
//!
//! - the model: [`Message`], [`Headers`], [`Delivery`], [`Subscription`],
//!   [`SubscribeOptions`], [`Retry`], [`Capabilities`] and the typed [`Error`];
//! - the portable handle [`Client`], which validates names, headers and
//!   payload sizes for every backend and applies the dead-letter rules;
//! - the backend contract in [`driver`]: the small object-safe traits a
//!   backend implements (`Publisher`, `Subscriber`, `Receiver`, `Acker`).
//!   Applications do not need them; backend authors import them from
//!   [`driver`];
//! - [`PublisherExt`], generic conveniences for anything that publishes;
//! - [`consumer::Consumer`], the runtime that runs a handler per delivery with
//!   bounded concurrency, per-key order, retries with backoff and graceful shutdown.
//!
//! # Delivery semantics
//!
//! Publishing is **confirmed**: `publish` returns `Ok` only after the broker
//! durably accepted the message. Delivery is **at-least-once**: an acked
//! publish is never lost, but a message may be delivered more than once
//! (after a consumer crash, an ack timeout or a lost ack), so consumers
//! de-duplicate by [`Message::id`], which is stable across redeliveries,
//! retries, dead-lettering and bridging.
//!
//! Each delivery is settled exactly once: [`Delivery::ack`],
//! [`Delivery::nack`] (redelivered with `attempt + 1`, optionally after a
//! delay) or [`Delivery::dead_letter`]. The attempt count is kept by the
//! broker, so it survives consumer restarts: a message that crashes its
//! consumers is dead-lettered after `max_attempts` instead of looping forever.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use switchyard_core::{Client, Message, Retry, SubscribeOptions};
//!
//! async fn handle(client: &Client) -> switchyard_core::Result<()> {
//!     let opts = SubscribeOptions::new("billing").with_max_attempts(3);
//!     client.ensure_subscription("orders.created", &opts).await?;
//!     client
//!         .publish("orders.created", Message::new(r#"{"order":1}"#).with_key("customer-7"))
//!         .await?;
//!
//!     let mut sub = client.subscribe("orders.created", opts).await?;
//!     let delivery = sub.recv().await?;
//!     match delivery.message().payload().len() {
//!         0 => delivery.dead_letter("empty order").await?,
//!         _ if delivery.attempt() == 1 => {
//!             delivery.nack(Retry::after(Duration::from_secs(1))).await?
//!         }
//!         _ => delivery.ack().await?,
//!     }
//!     Ok(())
//! }
//! ```
#![warn(clippy::future_not_send)]

mod client;
pub mod consumer;
mod delivery;
pub mod driver;
mod error;
mod ext;
pub mod headers;
mod message;
pub mod migrate;
mod names;
mod options;
mod subscription;
pub mod telemetry;

pub use bytes::Bytes;
pub use client::Client;
pub use delivery::Delivery;

pub use error::{BoxError, Error, NameKind, Result, SharedError, redact_url};
pub use ext::PublisherExt;
pub use headers::Headers;
pub use message::{Message, new_id};
pub use names::{
    MAX_HEADER_KEY_LEN, MAX_NAME_LEN, RESERVED_HEADER_PREFIX, validate_header_key, validate_name,
    validate_user_header_key,
};
pub use options::{
    Capabilities, DEAD_LETTERS_SUBSCRIPTION, DEFAULT_ACK_TIMEOUT, DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PREFETCH, KeyOrdering, Retry, SubscribeOptions,
};
pub use subscription::Subscription;
