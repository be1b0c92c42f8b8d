//! The AWS SQS backend of [switchyard](https://docs.rs/switchyard), built on
//! [`aws_sdk_sqs`] (and [`aws_sdk_sns`] for fan-out).
//!
//! # Mapping
//!
//! | switchyard | [`Mode::Queue`] (default) | [`Mode::FanOut`] |
//! |---|---|---|
//! | topic `orders.created` | SQS queue `sy-orders_dcreated` | SNS topic `sy-orders_dcreated` |
//! | subscription `billing` | the topic's queue (names share it: no fan-out) | SQS queue `sy-orders_dcreated_sbilling`, subscribed with raw message delivery |
//! | publish | `SendMessage`; `publish_batch` → `SendMessageBatch` of 10, pipelined | SNS `Publish` / `PublishBatch` of 10 |
//! | attempt | `ApproximateReceiveCount` (durable, counted by SQS) | same |
//! | ack / nack / nack with delay | `DeleteMessageBatch` (acks gathered up to 10 per call, each confirmed) / `ChangeMessageVisibility(0)` / `ChangeMessageVisibility(delay)` | same |
//! | ack timeout | the visibility timeout of each receive | same |
//! | prefetch | long polls ask for at most the free room (≤ 10 each); what is received and not handed out yet keeps its lease (`ChangeMessageVisibilityBatch` once less than half the visibility is left), so it never comes back to another consumer at a raised count; a copy SQS refuses to extend is dropped, not handed out | same |
//! | id, key, headers | attributes `sy-id` and `sy-meta` (JSON: key, headers, body encoding) | same |
//! | with `fifo=true` | FIFO queue `sy-orders_dcreated.fifo`; `MessageGroupId` = key (or the id, for a message without one) | FIFO SNS topic and FIFO queues |
//!
//! Bodies must be XML-safe text: a payload that is not is sent as base64 and
//! decoded on receipt; an empty one as `-`. Names are escaped into SQS's
//! `[A-Za-z0-9_-]{1,80}` (`_` → `__`, `.` → `_d`, long names end in a
//! SHA-256 digest). Standard queues do not keep order
//! ([`KeyOrdering::PerKeyInSpecialMode`](switchyard_core::KeyOrdering::PerKeyInSpecialMode));
//! FIFO queues ([`SqsConfig::with_fifo`], `fifo=true`) deliver each key in
//! publish order ([`KeyOrdering::PerKey`](switchyard_core::KeyOrdering::PerKey)),
//! holding a key's later messages while an earlier one is out or waiting
//! out a nack delay. Each FIFO publish gets a fresh `MessageDeduplicationId`,
//! so the SDK's retries of a call are de-duplicated but a deliberate
//! re-publish of one message id (redrive, a bridge) is not. Delays are
//! whole seconds (rounded up), at most 12 hours.
//!
//! # Details
//!
//! `mode=queue` (default): a topic is one SQS queue
//! (`orders.created` → `sy-orders_dcreated`; `_` → `__`, `.` → `_d`, names over
//! 80 characters end in a SHA-256 digest) and every subscription name on it
//! reads that queue, so consumers compete and there is no fan-out (capabilities
//! say so). `mode=fanout`: a topic is an SNS topic and each subscription an SQS
//! queue (`sy-<topic>_s<subscription>`) subscribed with raw message delivery and
//! a queue policy admitting the topic, so every subscription gets every message.
//! Publish is `SendMessage` / SNS `Publish`; `publish_batch` sends batches of 10
//! with 16 batches in flight. Id and metadata travel in two message attributes
//! (`sy-id`, and `sy-meta`: JSON with key, headers and body encoding), so SQS's
//! 10-attribute limit never applies; a payload that is not XML-safe text is sent
//! as base64, an empty one as `-`. Attempt = `ApproximateReceiveCount`. Ack =
//! `DeleteMessageBatch`: each receiver's deleter keeps 4 calls in flight and
//! acks that arrive while all 4 are out share the next call (up to 10); each
//! ack returns when SQS confirmed its own entry. Nack =
//! `ChangeMessageVisibility(0)`, nack with delay = `ChangeMessageVisibility`
//! (whole seconds, rounded up); the ack timeout is each receive's visibility
//! timeout. Each receiver runs 4 pollers asking for at most its free prefetch
//! room (≤ 10 per receive); while its consumer still has messages buffered, a
//! poller waits up to 25 ms for room to fill a receive of 10. A receive is never abandoned half-way (SQS would
//! hand messages to the abandoned request and hide them): after a receiver
//! closes, its running receives finish and release what they got, which counts
//! one receive on those messages; the long-poll wait is kept below the
//! visibility timeout (short polling for a one-second timeout), so messages the
//! closed receiver held are not caught that way. Credentials come from the
//! standard AWS chain (`SqsConfig::with_static_credentials` for emulators); throttling
//! is retried by the SDK with backoff and reported as retryable; credentials
//! refused → `Error::Authentication`, none found or no region → `Error::Config`.
//! With `fifo=true` queues (and, in fan-out mode, SNS topics) are FIFO and
//! their names end in `.fifo`; the key is the `MessageGroupId` (a message
//! without a key is a group of its own; keys SQS cannot take are replaced by a
//! digest), so each key reaches the subscription in publish order and SQS
//! holds a key's later messages while one is out or waiting out a nack delay.
//! Every publish gets a fresh `MessageDeduplicationId`, not the message id: the
//! SDK's retries of one call are de-duplicated, but a deliberate re-publish of
//! an id (redrive, a bridge) within SQS's five-minute window is not dropped.
//! Not built: a native `RedrivePolicy` safety net.
//!
//! # Example
//!
//! ```no_run
//! use switchyard_core::{Message, SubscribeOptions};
//!
//! # #[tokio::main] async fn main() -> switchyard_core::Result<()> {
//! let client = switchyard_sqs::connect("sqs://?region=us-east-1&mode=fanout").await?;
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

pub use aws_sdk_sns;
pub use aws_sdk_sqs;
pub use broker::{SqsBroker, connect};
pub use config::{Mode, SqsConfig};
