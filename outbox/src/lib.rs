//! The transactional outbox and idempotent consumers for
//! [switchyard](https://docs.rs/switchyard), on the databases services use.
//!
//! **The dual-write problem.** A service that updates its database and then
//! publishes an event loses the event when it crashes between the two, and
//! publishes an event for a change that never happened when the publish
//! goes first. This crate closes both gaps:
//!
//! - [`Outbox`] (feature `postgres`): [`Outbox::enqueue`] writes the event
//!   into the service's own PostgreSQL database **inside the application's
//!   transaction**, so the event exists exactly when the change committed.
//!   A [`Relay`] publishes committed events through any switchyard
//!   [`Client`](switchyard_core::Client) — confirmed by the broker before it
//!   marks them — in commit order per key, woken by `LISTEN/NOTIFY` within
//!   milliseconds. Several relays share the work without publishing an event
//!   twice; a relay that crashes between publish and mark makes the next one
//!   publish the event again **with the same id** (a duplicate, never a loss).
//! - [`Inbox`] (feature `postgres`): the idempotent consumer. The handler's
//!   own writes and the record "this message id was processed" commit in one
//!   transaction, so a redelivery changes nothing, and a duplicate delivered
//!   concurrently to another consumer waits for the first and is skipped.
//! - [`RedisDedupStore`] (feature `redis`): for handlers without a database,
//!   a [`DedupStore`](switchyard_core::consumer::DedupStore) on Redis
//!   (`SET NX PX`) behind switchyard's [`Dedup`](switchyard_core::consumer::Dedup).
//!
//! # Example
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # async fn demo(pool: sqlx::PgPool, client: switchyard_core::Client) -> Result<(), switchyard_outbox::Error> {
//! use switchyard_core::Message;
//! use switchyard_outbox::Outbox;
//!
//! let outbox = Outbox::new();
//! outbox.migrate(&pool).await?; // creates the table once
//!
//! // The order and its event commit together, or neither does.
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id, total) VALUES ($1, $2)")
//!     .bind(42_i64).bind(1999_i64)
//!     .execute(&mut *tx).await?;
//! outbox
//!     .enqueue(&mut tx, "orders.created", Message::new(r#"{"order":42}"#).with_key("order-42"))
//!     .await?;
//! tx.commit().await?;
//!
//! // Elsewhere (any number of processes): publish what committed.
//! let relay = outbox.relay(pool.clone(), client);
//! tokio::spawn(relay.run(std::future::pending()));
//! # Ok(()) }
//! ```
//!
//! # What is guaranteed
//!
//! - An event enqueued in a transaction that commits is published at least
//!   once; one whose transaction rolls back is never published.
//! - Events of one key are published in the order their transactions
//!   committed: `enqueue` takes a transaction-scoped advisory lock on the key,
//!   so two transactions enqueueing for one key commit one after the other,
//!   and the relay publishes a key's events one at a time, in that order.
//! - Relays divide the table's 64 *lanes* (an event's lane is a hash of its
//!   key, or of its id when it has none) between them with session advisory
//!   locks, rebalanced each second; a lane has one relay at a time, so in
//!   normal running no event is published twice. A relay that dies releases
//!   its lanes with its connection.
//! - An event the broker can never accept (too large for it, an invalid
//!   header) is *parked*: marked failed with the error text, logged, and
//!   skipped, so it does not block its key for ever. Every other publish
//!   failure is retried with the same message id.

//!
//! # Tracing and metrics
//!
//! With switchyard's `otel` feature, `enqueue` stores the current span's
//! W3C trace context (`traceparent`) in the row's headers, and the publish
//! keeps it: the consumer's span joins the trace of the transaction that
//! wrote the event. The relay logs through [`tracing`](https://docs.rs/tracing)
//! (a parked event at `error`, a streak of failures at `warn`, pruning at
//! `debug`). With this crate's `metrics` feature it records
//! `switchyard_outbox_published_total` (counter), `switchyard_outbox_parked_total`
//! (counter) and `switchyard_outbox_lag_seconds` (histogram: insert to
//! confirmed publish) through the [`metrics`](https://docs.rs/metrics) facade.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
#[cfg(feature = "postgres")]
mod inbox;
#[cfg(feature = "postgres")]
mod outbox;
#[cfg(feature = "redis")]
mod redis_store;
#[cfg(feature = "postgres")]
mod relay;
#[cfg(feature = "postgres")]
mod sql;

pub use error::{Error, Result};
#[cfg(feature = "postgres")]
pub use inbox::Inbox;
#[cfg(feature = "postgres")]
pub use outbox::{LANES, Outbox};
#[cfg(feature = "redis")]
pub use redis_store::RedisDedupStore;
#[cfg(feature = "postgres")]
pub use relay::{Relay, RelayReport};
