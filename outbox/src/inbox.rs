//! The inbox: an idempotent consumer on PostgreSQL.

use std::{future::Future, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use sqlx::{PgPool, Postgres, SqlStr, Transaction};
use switchyard_core::consumer::{HandlerContext, HandlerError};

use crate::{
    Error, Result,
    error::bounded,
    outbox::migrate,
    sql::{Table, audited},
};

/// Processes each message once per consumer: the handler's own database
/// writes and the record "this message id was processed" commit in **one**
/// PostgreSQL transaction (table `switchyard_inbox` by default).
///
/// [`begin`](Inbox::begin) opens the transaction and records the id: a
/// message seen already gives `None` (ack it, change nothing). A duplicate
/// delivered to another consumer at the same time waits in `begin` until
/// the first transaction ends — it is then skipped if that one committed,
/// or processed if it rolled back — so it is never processed twice and never
/// spends a delivery attempt. The wait is bounded by
/// [`lock_timeout`](Inbox::lock_timeout) (a transient error after it).
///
/// Ids are kept per *consumer name* (the subscription, for
/// [`wrap`](Inbox::wrap)), so two subscriptions that both receive a message
/// each process it. Delete old ids with [`prune`](Inbox::prune) once no
/// redelivery can bring them back (keep them longer than the broker keeps
/// messages).
///
/// # Examples
///
/// With the consumer runtime, in one line around the handler:
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, sub: switchyard_core::Subscription) -> Result<(), Box<dyn std::error::Error>> {
/// use switchyard_core::consumer::{Consumer, HandlerError};
/// use switchyard_outbox::Inbox;
///
/// let inbox = Inbox::new();
/// inbox.migrate(&pool).await?;
/// let handler = inbox.wrap(pool.clone(), |ctx, mut tx| async move {
///     sqlx::query("UPDATE stock SET reserved = reserved + 1 WHERE order_id = $1")
///         .bind(ctx.message.id())
///         .execute(&mut *tx)
///         .await
///         .map_err(HandlerError::transient)?;
///     Ok(tx) // committed with the inbox record
/// });
/// Consumer::new().run(sub, handler, std::future::pending()).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Inbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    table: Table,
    insert: SqlStr,
    prune: SqlStr,
    lock_timeout: Duration,
}

impl Default for Inbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Inbox {
    /// The inbox in table `switchyard_inbox`.
    #[must_use]
    pub fn new() -> Self {
        Self::from_table(
            Table::new("switchyard_inbox").expect("a valid name"),
            Duration::from_secs(10),
        )
    }

    /// The inbox in table `name` (`table` or `schema.table`).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `name` is not a plain identifier.
    pub fn with_table(name: &str) -> Result<Self> {
        Ok(Self::from_table(Table::new(name)?, Duration::from_secs(10)))
    }

    fn from_table(table: Table, lock_timeout: Duration) -> Self {
        let t = &table.qualified;
        Self {
            inner: Arc::new(Inner {
                insert: audited(format!(
                    "INSERT INTO {t} (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
                )),
                prune: audited(format!(
                    "DELETE FROM {t} WHERE processed_at < clock_timestamp() - make_interval(secs => $1)"
                )),
                table,
                lock_timeout,
            }),
        }
    }

    /// The table's name, as given.
    #[must_use]
    pub fn table(&self) -> &str {
        &self.inner.table.qualified
    }

    /// How long [`begin`](Inbox::begin) waits for a concurrent transaction
    /// holding the same id (default 10 s); keep it above the handler's usual
    /// run time. Whole milliseconds, from 1 ms to 1 h.
    #[must_use]
    pub fn lock_timeout(self, d: Duration) -> Self {
        Self::from_table(
            self.inner.table.clone(),
            d.clamp(Duration::from_millis(1), Duration::from_secs(3600)),
        )
    }

    /// Creates the table when it does not exist.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the DDL fails.
    pub async fn migrate(&self, pool: &PgPool) -> Result<()> {
        let t = &self.inner.table;
        let (q, bare) = (&t.qualified, &t.bare);
        let ddl = [
            format!(
                "CREATE TABLE IF NOT EXISTS {q} (\
                 consumer text NOT NULL, \
                 message_id text NOT NULL, \
                 processed_at timestamptz NOT NULL DEFAULT clock_timestamp(), \
                 PRIMARY KEY (consumer, message_id))"
            ),
            format!("CREATE INDEX IF NOT EXISTS {bare}_processed ON {q} (processed_at)"),
        ];
        migrate(pool, t, &ddl, Duration::from_secs(30)).await
    }

    /// Opens a transaction that records message `id` as processed by
    /// `consumer`. `Some(tx)`: the id is new — do the work in `tx` and commit
    /// it (dropping it rolls back, and the id is free again). `None`: the id
    /// was processed already; nothing is open.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the database fails, or when a concurrent
    /// transaction held the id longer than the lock timeout (retryable:
    /// [`Error::is_retryable`]).
    pub async fn begin(
        &self,
        pool: &PgPool,
        consumer: &str,
        id: &str,
    ) -> Result<Option<Transaction<'static, Postgres>>> {
        let inner = &self.inner;
        let mut tx = pool.begin().await?;
        // A literal: SET takes no parameters (the value is a plain integer).
        sqlx::query(audited(format!(
            "SET LOCAL lock_timeout = {}",
            inner.lock_timeout.as_millis().max(1)
        )))
        .execute(&mut *tx)
        .await?;
        let inserted = bounded(
            "inbox record",
            inner.lock_timeout + Duration::from_secs(30),
            sqlx::query(inner.insert.clone())
                .bind(consumer)
                .bind(id)
                .execute(&mut *tx),
        )
        .await?
        .rows_affected();
        if inserted == 1 {
            Ok(Some(tx))
        } else {
            tx.rollback().await?;
            Ok(None)
        }
    }

    /// Wraps a [`Consumer`](switchyard_core::consumer::Consumer) handler
    /// that writes in the transaction it is given and returns it to be
    /// committed (see the type docs). A delivery whose id this subscription
    /// processed already is acked without running the handler; a handler
    /// error rolls the transaction back and is the delivery's outcome; a
    /// failed commit is transient.
    pub fn wrap<H, F>(
        &self,
        pool: PgPool,
        handler: H,
    ) -> impl Fn(HandlerContext) -> BoxFuture<'static, std::result::Result<(), HandlerError>>
    + Clone
    + Send
    + Sync
    + 'static
    where
        H: Fn(HandlerContext, Transaction<'static, Postgres>) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<Transaction<'static, Postgres>, HandlerError>>
            + Send
            + 'static,
    {
        let handler = Arc::new(handler);
        let this = self.clone();
        move |ctx: HandlerContext| {
            let (handler, this, pool) = (Arc::clone(&handler), this.clone(), pool.clone());
            Box::pin(async move {
                let tx = this
                    .begin(&pool, &ctx.subscription, ctx.message.id())
                    .await
                    .map_err(HandlerError::transient)?;
                let Some(tx) = tx else {
                    return Ok(()); // processed already
                };
                let tx = handler(ctx, tx).await?;
                tx.commit()
                    .await
                    .map_err(|e| HandlerError::transient(Error::from(e)))
            })
        }
    }

    /// Deletes ids processed more than `older_than` ago; returns how many.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the delete fails.
    pub async fn prune(&self, pool: &PgPool, older_than: Duration) -> Result<u64> {
        let done = sqlx::query(self.inner.prune.clone())
            .bind(older_than.as_secs_f64())
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }
}
