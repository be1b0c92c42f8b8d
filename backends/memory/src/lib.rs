//! The in-process broker of [switchyard](https://docs.rs/switchyard): the
//! reference backend, and the one to test services against without a broker.
//!
//! It behaves like a real broker, so it does not hide the bugs a real one
//! would expose:
//!
//! - a topic keeps nothing by itself: a message published while a topic has
//!   no subscription is dropped (as RabbitMQ and SNS do) — create
//!   subscriptions ahead with `ensure_subscription`;
//! - each subscription gets every message (fan-out); the consumers of one
//!   subscription compete for them;
//! - the attempt count is kept by the broker: a delivery dropped unsettled is
//!   redelivered after the ack timeout with `attempt + 1`, and when a consumer
//!   closes (or is dropped) its unsettled deliveries go to the others at once;
//! - `nack` with a delay is held by the broker; prefetch bounds each
//!   consumer's unsettled deliveries; payloads over the configured limit are
//!   refused.
//!
//! State lives as long as the [`MemoryBroker`]; nothing is written to disk.
//! Every [`MemoryBroker::connect`] (or `memory://NAME` URL) is a separate
//! connection to the same broker, and closing it does not delete anything.
//!
//! # Example
//!
//! ```
//! use switchyard_core::{Message, Retry, SubscribeOptions};
//! use switchyard_memory::MemoryBroker;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> switchyard_core::Result<()> {
//! let client = MemoryBroker::new().client();
//! let opts = SubscribeOptions::new("billing");
//! client.ensure_subscription("orders", &opts).await?;
//! client.publish("orders", Message::new("hello")).await?;
//!
//! let mut sub = client.subscribe("orders", opts).await?;
//! let first = sub.recv().await?;
//! first.nack(Retry::now()).await?;
//! let again = sub.recv().await?;
//! assert_eq!(again.attempt(), 2);
//! again.ack().await?;
//! # Ok(()) }
//! ```

mod broker;
mod config;
mod queue;
mod receiver;

pub use broker::{MemoryBroker, MemoryConnection, connect};
pub use config::MemoryBuilder;
