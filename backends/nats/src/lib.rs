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
//! | prefetch | pull requests never ask for more than the consumer's free room, nor for more than 4 MiB together, or one message of the server's largest size ([`NatsConfig::with_pull_bytes`]: past the server's `max_pending` it would drop the connection as a slow consumer); what arrived and is not handed out yet keeps its ack wait (a progress ack once less than half of it is left, while the application holds what it has), so it never comes back to another consumer at a raised count |
//! | id, key, headers | NATS headers (`sy-id`, `sy-key`, user headers as they are; values NATS cannot carry are base64-encoded, reversibly) |
//! | cluster | every node in the URL (`nats://n1:4222,n2:4222,n3:4222?replicas=3`); streams with `replicas` copies, a publish confirmed once a majority stored it; `prefer` picks the node tried first ([`NatsConfig::with_prefer_server`]) |
//!
//! Names are escaped into single JetStream tokens (`_` → `__`, `.` → `_d`;
//! long names end in a SHA-256 digest), so every portable name works and
//! distinct names never share a stream. Interest retention means a message
//! published while a topic has no subscription is not kept — create
//! subscriptions ahead with `ensure_subscription`, as on every backend.
//!
//! # Details
//!
//! Topic → a stream capturing one subject (`orders.created` →
//! stream `sy-orders_dcreated`, subject `sy.orders_dcreated`; `_` → `__`, `.` →
//! `_d`, names over 120 characters end in a SHA-256 digest, so every portable
//! name maps and none collide), interest retention, file storage. Subscription →
//! a durable pull consumer (explicit ack, `ack_wait` = ack timeout, deliver
//! policy *new*). Publish awaits the PubAck; `publish_batch` keeps 256 PubAcks in
//! flight. Id and key travel as `sy-id` / `sy-key` headers, user headers as
//! themselves (values NATS would trim or reject are base64-encoded and listed in
//! `sy-enc`; user keys starting with `Nats-` are escaped). The message id is *not*
//! sent as `Nats-Msg-Id`, because JetStream would then drop an intentional
//! re-publish of the same id (redrive, bridging) as a duplicate. Each consumer
//! requests only as many messages as it has free prefetch room, with overlapping
//! pull requests on one inbox (which keeps stream order), and bounds their
//! bytes (`max_bytes`, 4 MiB together by default): the server queues for a
//! connection whatever its pull requests asked for, and past its
//! `max_pending` (64 MiB by default) drops the connection as a slow consumer,
//! after which everything it had queued comes back after the ack wait,
//! counted as delivered once more. Pull requests wait up
//! to 30 s with a 1 s idle heartbeat (a receiver that hears nothing for 5 s
//! has lost them in a server restart and asks again): nats-server before
//! 2.10.14 sends a redelivery that falls due just as the only waiting requests
//! expire as a first delivery of the message before it
//! (nats-io/nats-server#5305), so requests expire seldom. A consumer that closes
//! hands back what it pulled and did not settle with a NAK whose delay
//! outlasts its open pull requests, which it cannot withdraw: the server drops
//! them at the first heartbeat after the consumer's inbox is unsubscribed, and
//! another consumer gets the message within about 1.5 s. An ack is a NATS `+ACK` sent on
//! the connection (as AMQP's `basic.ack`, it is not confirmed by the server): `Ok`
//! means it was handed to the connection, close flushes it, and an ack lost with
//! a dropped connection shows up as a redelivery. Closing is bounded by the
//! request timeout even when the server is unreachable.
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

mod broker;
mod codec;
mod config;
mod error;
mod names;
mod receiver;

pub use async_nats;
pub use broker::{NatsBroker, connect};
pub use config::NatsConfig;
