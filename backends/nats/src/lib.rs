//! The NATS JetStream backend of [switchyard](https://docs.rs/switchyard),
//! built on [`async_nats`].
//!
//! # Mapping
//!
//! | switchyard | JetStream |
//! |---|---|
//! | topic `orders.created` | stream `sy-orders_dcreated` capturing subject `sy.orders_dcreated` (interest retention, file storage) |
//! | subscription | durable pull consumer, explicit ack, `ack_wait` = ack timeout, deliver policy *new* |
//! | publish | JetStream publish awaiting the PubAck; `publish_batch` keeps a window of PubAcks in flight |
//! | attempt | the server's delivery count (durable across consumer restarts) |
//! | nack / nack with delay | `NAK` / `NAK` with delay (held by the server) |
//! | prefetch | pull requests never ask for more than the consumer's free room; what arrived and is not handed out yet keeps its ack wait (a progress ack once less than half of it is left, while the application holds what it has), so it never comes back to another consumer at a raised count |
//! | id, key, headers | NATS headers (`sy-id`, `sy-key`, user headers as they are; values NATS cannot carry are base64-encoded, reversibly) |
//! | cluster | every node in the URL (`nats://n1:4222,n2:4222,n3:4222?replicas=3`); streams with `replicas` copies, a publish confirmed once a majority stored it; `prefer` picks the node tried first ([`NatsConfig::prefer_server`]) |
//!
//! Names are escaped into single JetStream tokens (`_` → `__`, `.` → `_d`;
//! long names end in a SHA-256 digest), so every portable name works and
//! distinct names never share a stream. Interest retention means a message
//! published while a topic has no subscription is not kept — create
//! subscriptions ahead with `ensure_subscription`, as on every backend.
//!
//! # Example
//!
//! ```no_run
//! use switchyard_core::{Message, SubscribeOptions};
//!
//! # #[tokio::main] async fn main() -> switchyard_core::Result<()> {
//! let client = switchyard_nats::connect("nats://127.0.0.1:4222").await?;
//! let opts = SubscribeOptions::new("billing");
//! client.ensure_subscription("orders.created", &opts).await?;
//! client.publish("orders.created", Message::new("hello")).await?;
//! let mut sub = client.subscribe("orders.created", opts).await?;
//! sub.recv().await?.ack().await?;
//! # Ok(()) }
//! ```

mod backend;
mod codec;
mod config;
mod names;

pub use async_nats;
pub use backend::{NatsBroker, connect};
pub use config::NatsConfig;
