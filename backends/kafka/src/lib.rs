//! The Apache Kafka backend of [switchyard](https://docs.rs/switchyard),
//! built on [`rdkafka`] (librdkafka).
//!
//! # Mapping
//!
//! | switchyard | Kafka |
//! |---|---|
//! | topic `orders.created` | topic `orders.created` (created through the admin API when missing; [`KafkaConfig::with_partitions`]) |
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
//! # Details
//!
//! Topic → a Kafka topic of the same name (every portable
//! name is a valid topic name), created through the admin API when missing with
//! `partitions` (3) and `replication_factor` (-1: the broker's default).
//! Subscription → consumer group `<topic>:<subscription>` (group ids are global,
//! subscriptions belong to a topic); `ensure_subscription` commits the topic's
//! current end offsets for a new group, so it gets exactly what is published
//! from then on, and a consumer whose partitions have no commit (partitions
//! added later) starts at the earliest offset. Key → record key (records with
//! one key share a partition, so per-key order holds); a record without a key
//! goes to a random partition (`sticky.partitioning.linger.ms=0`, where
//! librdkafka would otherwise stick to one partition for 10 ms), so a burst of
//! keyless messages divides among a subscription's consumers as it does on the
//! other brokers (set it in the URL to batch by partition instead). Id → header `sy-id`, user
//! headers → record headers, payload → value, publish time → `CreateTime`, all
//! byte-exact. Publish → an idempotent producer with `acks=all`, confirmed by
//! the delivery report; `publish_batch` enqueues everything and then collects
//! the reports (librdkafka batches and pipelines). Kafka has no per-message
//! ack: a group commits one offset per partition. switchyard tracks every
//! fetched record and commits only the lowest unsettled one (asynchronously,
//! 5 ms after acks), so a commit never passes an unsettled record; records
//! settled above it travel in the commit's metadata string (the technique of
//! Confluent's parallel-consumer), so after a crash or a rebalance the next
//! owner skips acked records. Crash redeliveries are counted in a journal that
//! never depends on a commit a crash can lose: two member-less groups of the
//! subscription, `<group>~h` and `<group>~n`, whose committed offsets hold a
//! reservation (no record above it was handed out; raised four prefetches at a
//! time, ahead of need, and confirmed before the records it covers go out) and the last *suspect* with
//! its count. A new owner hands the records between the committed offset and
//! the reservation out one at a time, each recorded with its raised count
//! first, so a record that kills its consumer counts one attempt per crash
//! whichever record was committed; a clean close or revoke gives the unused
//! reservation back, so a restart costs no attempt. Nack and nack
//! with delay → a copy in the retry topic `<topic>.<subscription>.retry` (a
//! digest past 249 characters) carrying the target subscription, the next
//! attempt and the due time; then the original is settled. The same group
//! consumes the retry topic and holds each record until due (at most 10,000
//! held; past that fetching pauses), so delays and attempts survive restarts.
//! A delivery unsettled after the ack timeout is re-published the same way and
//! a late ack of it is a no-op. A background task keeps polling the consumer, so
//! it takes part in rebalances while the application works; `subscribe` returns
//! once the consumer has its first assignment (bounded by `request_timeout`),
//! so a new consumer gets its share of what is published next. Closing (or
//! dropping) a subscription re-publishes its unsettled deliveries to the retry
//! topic with their next attempt, commits and leaves the group; on a revoke the
//! settled offsets are committed and unsettled deliveries go to the new owner.
//! Every other `kafka://` parameter containing a `.` is a librdkafka property
//! (security, SASL, TLS, tuning), given to every client. Unreachable brokers →
//! `Error::Connection` within `connect_timeout`; publishes fail after
//! `publish_timeout` (librdkafka's `message.timeout.ms`), never a silent
//! infinite retry. Nothing in the backend is specific to one broker
//! implementation; it needs no transactions and no compression.
//!
//! **Known broker deviation (tansu 0.6.0).** tansu accepts the metadata of an
//! offset commit and returns it empty. On tansu, therefore, a consumer that
//! *crashes* (killed, neither closed nor dropped) hands the next owner no list
//! of the records it acked above the lowest unsettled one, so those are
//! delivered again, with one attempt more (at-least-once still holds: nothing
//! is lost). Delivery counts do not depend on the metadata, and neither does
//! closing or dropping a subscription, which is why every conformance case
//! passes on tansu. The
//! test `specific::the_broker_keeps_commit_metadata` checks the metadata on
//! Apache Kafka and checks that the deviation is still there when
//! `scripts/brokers.sh` reports tansu (`SWITCHYARD_KAFKA_BROKER=tansu`). tansu's
//! other gaps (no transactions, snappy fetches) do not affect switchyard.
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

mod broker;
mod codec;
mod config;
mod error;
mod names;
mod offsets;
mod producer;
mod receiver;

pub use broker::{KafkaBroker, connect};
pub use config::KafkaConfig;
pub use producer::{Batch, DeliveryReports, KafkaProducer};
pub use rdkafka;
