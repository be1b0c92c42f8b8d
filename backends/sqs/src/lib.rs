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

mod backend;
mod codec;
mod config;
mod names;

pub use aws_sdk_sns;
pub use aws_sdk_sqs;
pub use backend::{SqsBroker, connect};
pub use config::{Mode, SqsConfig};
