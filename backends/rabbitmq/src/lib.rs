//! The RabbitMQ backend of [switchyard](https://docs.rs/switchyard), built
//! on [`lapin`].
//!
//! # Mapping
//!
//! | switchyard | RabbitMQ (AMQP 0-9-1) |
//! |---|---|
//! | topic `orders.created` | durable fanout exchange `sy.orders.created` |
//! | subscription `billing` | durable quorum queue `sy.orders.created:billing` bound to it |
//! | publish | persistent message on a confirm-mode channel, `Ok` on the publisher confirm; `publish_batch` keeps a window of confirms in flight |
//! | attempt | the quorum queue's `x-delivery-count` + 1 (durable, counted by the broker) |
//! | nack | `basic.reject` with requeue |
//! | nack with delay | a confirmed copy in a quorum wait queue (one per delay and hour, deleted when idle) whose message TTL dead-letters it back to the subscription's queue at least once, through broker restarts; then `basic.ack` |
//! | ack timeout | deliveries unsettled after it are rejected with requeue by the receiver |
//! | ack | `basic.ack`, coalesced into `multiple` acks (sent within milliseconds, and before close) |
//! | prefetch | `basic.qos` on the receiver's own channel |
//! | id, key, headers | `message_id`, header `sy-key`, headers table (long strings) |
//! | cluster | every node in the URL (`amqp://u:p@n1:5672,n2:5672,n3:5672/%2f`), tried in order, after a lost connection from the next one ([`RabbitConfig::from_url`]); quorum queues with a member on each node, a confirm once a majority wrote the message; a publish channel that got `basic.nack` is replaced (on 3.10 one can stay stuck on a dead leader) |
//!
//! Fanout means every subscription queue gets every message; consumers on one
//! queue compete. A message published while a topic has no subscription is
//! routed nowhere and dropped — create subscriptions ahead with
//! `ensure_subscription`, as on every backend. Names are prefixed with `sy.`
//! (so a topic may be called `amq.x`); queue names longer than 200 bytes end
//! in a SHA-256 digest.
//!
//! Quorum queues need RabbitMQ 3.8 or later, and delayed nacks need 3.10
//! (message TTL and at-least-once dead-lettering in quorum queues); the
//! backend is tested on 3.10. On 3.10 a quorum queue declared less than
//! about 3 s before its node is killed (not stopped) can come back empty
//! (measured; the broker writes a new queue's registration through a 3 s
//! cache): a crash right after a subscription or a delay is first used can
//! lose what it holds.
//! Queues get an explicit `x-delivery-limit`
//! ([`RabbitConfig::delivery_limit`]) so RabbitMQ 4's default limit of 20
//! never drops a message before switchyard dead-letters it.
//!
//! # Example
//!
//! ```no_run
//! use switchyard_core::{Message, SubscribeOptions};
//!
//! # #[tokio::main] async fn main() -> switchyard_core::Result<()> {
//! let client = switchyard_rabbitmq::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! let opts = SubscribeOptions::new("billing");
//! client.ensure_subscription("orders.created", &opts).await?;
//! client.publish("orders.created", Message::new("hello")).await?;
//! let mut sub = client.subscribe("orders.created", opts).await?;
//! sub.recv().await?.ack().await?;
//! # Ok(()) }
//! ```

mod backend;
mod book;
mod codec;
mod config;
mod names;

pub use backend::{RabbitBroker, connect};
pub use config::RabbitConfig;
pub use lapin;
