//! The Apache Kafka backend of [switchyard](https://docs.rs/switchyard),
//! built on [`rdkafka`] (librdkafka).
//!
//! # Mapping
//!
//! | switchyard | Kafka |
//! |---|---|
//! | topic `orders.created` | topic `orders.created` (created through the admin API when missing; [`KafkaConfig::partitions`]) |
//! | subscription `billing` | consumer group `orders.created:billing`, which `ensure_subscription` starts at the topic's current end |
//! | key, id, headers, payload | record key, header `sy-id`, record headers, record value (byte-exact); a keyless record goes to a random partition (`sticky.partitioning.linger.ms=0`), so a burst divides among consumers |
//! | publish | idempotent producer, `acks=all`, confirmed by the delivery report; `publish_batch` enqueues everything, then waits once for the batch's reports (counted in librdkafka's delivery callback, no future per record) |
//! | ack | the record is settled; the group's offset advances to the lowest unsettled record, settled records above it ride in the commit metadata |
//! | nack, nack with delay | a copy goes to the retry topic `orders.created.billing.retry` with its next attempt and due time, then the original is settled; the same group consumes the retry topic and holds each record until due |
//! | ack timeout | a delivery unsettled that long is re-published to the retry topic (next attempt) and settled; a late ack is a no-op |
//! | attempt | 1 + nacks and expiries (in the retry record) + crash redeliveries (counted in the subscription's journal: the committed offsets of the member-less groups `<group>~h` and `<group>~n`) |
//! | prefetch | at most `prefetch` records handed out and unsettled per consumer; while the application holds them (over 1 s), the consumer pauses fetching and keeps polling, so it stays in its group past `max.poll.interval.ms` |
//! | rebalance | before a partition goes to another consumer (one joins or leaves: a rolling deploy), its revoke waits for the application to settle what it holds of it — deliveries whose lease it keeps alive — up to half of `max.poll.interval.ms` (the group's rebalance timeout), then commits; only what is still held after that (or whose lease ran out) comes to the new owner at the next attempt |
//! | topic deleted | every `recv` of its subscriptions returns [`Error::NotFound`](switchyard_core::Error::NotFound) once two metadata readings 1 s apart miss it (a broker that does not answer is a transient fault, never `NotFound`) |
//!
//! Kafka has no per-message acknowledgement: a group commits one offset per
//! partition. switchyard never commits past an unsettled record, so a crash
//! or a rebalance redelivers (at-least-once) and never loses; acks above it
//! travel in the commit's metadata string, so an acked record is not
//! delivered again. Before records are handed out, a journal records how far
//! they reach, and a new owner hands the records a crashed one may have held
//! out one at a time, each with its count recorded first, so a record that
//! kills its consumer is dead-lettered after `max_attempts`, on any broker
//! that stores committed offsets. Delays and attempts live in the
//! retry topic, so both survive restarts.
//!
//! Per-key order holds for one consumer while nothing is nacked (records
//! with one key share a partition). Nothing here is specific to one broker
//! implementation: no transactions, no compression is required.
//!
//! # Example
//!
//! ```no_run
//! use switchyard_core::{Message, SubscribeOptions};
//!
//! # #[tokio::main] async fn main() -> switchyard_core::Result<()> {
//! let client = switchyard_kafka::connect("kafka://127.0.0.1:9092?partitions=6").await?;
//! let opts = SubscribeOptions::new("billing");
//! client.ensure_subscription("orders.created", &opts).await?;
//! client.publish("orders.created", Message::new("hello").with_key("customer-7")).await?;
//! let mut sub = client.subscribe("orders.created", opts).await?;
//! sub.recv().await?.ack().await?;
//! # Ok(()) }
//! ```

mod backend;
mod codec;
mod config;
mod names;
mod offsets;
mod producer;
mod receiver;

pub use backend::{KafkaBroker, connect};
pub use config::KafkaConfig;
pub use producer::{Batch, DeliveryReports, KafkaProducer};
pub use rdkafka;
