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
//! ([`RabbitConfig::with_delivery_limit`]) so RabbitMQ 4's default limit of 20
//! never drops a message before switchyard dead-letters it.
//!
//! # Details
//!
//! Topic → a durable fanout exchange `sy.<topic>` (the
//! prefix lets a topic be called `amq.…`); subscription → a durable quorum queue
//! `sy.<topic>:<subscription>` bound to it (`:` never occurs in a portable name,
//! so pairs never collide; names over 200 bytes end in a SHA-256 digest); fan-out
//! is one queue per subscription, competing consumers share a queue. Publishes
//! are persistent and go through one confirm-mode channel: `publish` returns on
//! the publisher confirm, `publish_batch` keeps 256 confirms in flight. Id →
//! `message_id` (a `sy-id` header past 255 bytes), key → `sy-key` header, user
//! headers → the headers table as long strings; user keys starting with `x-`
//! (RabbitMQ writes `x-delivery-count`, `x-death`, …) are escaped. Attempt =
//! the quorum queue's `x-delivery-count` + 1, plus the attempts a delayed copy
//! carries. Nack → `basic.reject` with requeue (which, unlike `basic.nack`,
//! advances the delivery count on RabbitMQ 4.3 too). Nack with delay → a copy,
//! published with a confirm, into a quorum wait queue per (subscription, delay,
//! hour) whose message TTL dead-letters it back to the subscription's queue
//! through the default exchange *at least once* (`x-dead-letter-strategy`; a
//! classic queue's dead-lettering is at most once: a broker killed while 1,000
//! delayed nacks waited lost all 1,000, now none); then the original is acked (a
//! crash in between duplicates, never loses). Delays are rounded up to two
//! significant digits of milliseconds so a subscription needs few wait queues;
//! each takes one hour's delayed nacks and RabbitMQ deletes it an hour after its
//! last message is due (a quorum queue's expiry is not renewed by use). Prefetch → `basic.qos` on each receiver's own
//! channel. AMQP returns unacked messages only when a channel closes, so each
//! receiver rejects (requeues) a delivery still unsettled after the ack timeout,
//! as JetStream's ack wait and SQS's visibility timeout do; a late ack of it is a
//! no-op. Acks are coalesced into `multiple` acks (sent at a quarter of the
//! prefetch, before a receive waits, on close, and within 5 ms), with single acks
//! for settled deliveries above a still-unsettled one, so a slow handler never
//! holds back the others' acks. Queues carry an explicit `x-delivery-limit` (1,000,000 by default) so
//! RabbitMQ 4's default of 20 never drops a message before switchyard
//! dead-letters it. A lost connection is re-established on the next publish
//! (which fails retryably meanwhile) and receivers reopen their consumer by
//! themselves with a growing pause; a settlement on the lost channel returns a
//! connection error and the broker redelivers. Wrong credentials are
//! `Error::Authentication` at once. Quorum queues need RabbitMQ ≥ 3.8; tested on
//! 3.10.8.
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

mod book;
mod broker;
mod codec;
mod config;
mod error;
mod names;
mod receiver;

pub use broker::{RabbitBroker, connect};
pub use config::RabbitConfig;
pub use lapin;
