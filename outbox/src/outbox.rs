//! The outbox table and `enqueue`.

use std::{sync::Arc, time::Duration};

use sqlx::{PgConnection, PgPool, SqlStr};
use switchyard_core::{Client, Message, NameKind, telemetry, validate_name};

use crate::{
    Relay, Result,
    error::bounded,
    sql::{Table, audited, fnv1a},
};

/// How many lanes the outbox's events are spread over: the unit that relays
/// divide between them (at most this many relays do work at once).
pub const LANES: i16 = 64;

/// The transactional outbox on a PostgreSQL table (default
/// `switchyard_outbox`).
///
/// [`enqueue`](Outbox::enqueue) stores an event in the caller's
/// transaction; a [`Relay`] publishes committed events. See the
/// [crate docs](crate) for what is guaranteed.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), switchyard_outbox::Error> {
/// use switchyard_core::Message;
/// use switchyard_outbox::Outbox;
///
/// let outbox = Outbox::with_table("billing.outbox")?;
/// outbox.migrate(&pool).await?;
/// let mut tx = pool.begin().await?;
/// outbox.enqueue(&mut tx, "invoices.issued", Message::new("invoice 7")).await?;
/// tx.commit().await?; // now, and only now, the relay can see it
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) table: Table,
    /// The `LISTEN/NOTIFY` channel a commit wakes relays on.
    pub(crate) channel: String,
    /// Advisory-lock classes: per key (enqueue), per lane and for relay
    /// membership (relays).
    pub(crate) key_class: i32,
    pub(crate) lane_class: i32,
    pub(crate) member_class: i32,
    insert: SqlStr,
    pub(crate) fetch: SqlStr,
    pub(crate) mark: SqlStr,
    pub(crate) park: SqlStr,
    pub(crate) prune: SqlStr,
    /// Bound of each database call the outbox makes on its own.
    pub(crate) op_timeout: Duration,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Outbox {
    /// The outbox in table `switchyard_outbox` (in the connection's search path).
    #[must_use]
    pub fn new() -> Self {
        Self::from_table(Table::new("switchyard_outbox").expect("a valid name"))
    }

    /// The outbox in table `name` (`table` or `schema.table`).
    ///
    /// # Errors
    ///
    /// [`Error::Config`](crate::Error::Config) when `name` is not a plain
    /// identifier (letters, digits, `_`; 50 characters at most).
    pub fn with_table(name: &str) -> Result<Self> {
        Ok(Self::from_table(Table::new(name)?))
    }

    fn from_table(table: Table) -> Self {
        let t = &table.qualified;
        let channel = format!("{}_wake", table.qualified.replace('.', "_"));
        let pending = "published_at IS NULL AND failed_at IS NULL";
        Self {
            inner: Arc::new(Inner {
                key_class: table.lock_class("key"),
                lane_class: table.lock_class("lanes"),
                member_class: table.lock_class("members"),
                insert: audited(format!(
                    // One round trip: the key's lock (keyed messages only) is
                    // taken before the row, whose sequence number comes after it.
                    "WITH locked AS (SELECT pg_advisory_xact_lock($7, $8) WHERE $4::text IS NOT NULL), \
                     row AS (INSERT INTO {t} (lane, topic, message_id, key, headers, payload) \
                     SELECT $1, $2, $3, $4, $5::jsonb, $6 FROM (SELECT count(*) FROM locked) AS l \
                     RETURNING lane) \
                     SELECT pg_notify('{channel}', lane::text) FROM row"
                )),
                fetch: audited(format!(
                    "SELECT seq, topic, message_id, key, headers::text, payload, \
                     extract(epoch FROM clock_timestamp() - created_at)::float8 \
                     FROM {t} WHERE {pending} AND lane = ANY($1) AND topic <> ALL($3) \
                     ORDER BY seq LIMIT $2"
                )),
                mark: audited(format!(
                    "UPDATE {t} SET published_at = clock_timestamp() WHERE seq = ANY($1) AND {pending}"
                )),
                park: audited(format!(
                    "UPDATE {t} SET failed_at = clock_timestamp(), error = $2 WHERE seq = $1 AND {pending}"
                )),
                prune: audited(format!(
                    "DELETE FROM {t} WHERE seq IN (SELECT seq FROM {t} \
                     WHERE published_at < clock_timestamp() - make_interval(secs => $1) \
                     ORDER BY published_at LIMIT 10000)"
                )),
                channel,
                table,
                op_timeout: Duration::from_secs(30),
            }),
        }
    }

    /// The table's name, as given.
    #[must_use]
    pub fn table(&self) -> &str {
        &self.inner.table.qualified
    }

    /// Creates the table and its indexes when they do not exist (safe to run
    /// from several processes at once, and on every start).
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) when the DDL fails (for
    /// example without the right to create tables).
    pub async fn migrate(&self, pool: &PgPool) -> Result<()> {
        let t = &self.inner.table;
        let (q, bare) = (&t.qualified, &t.bare);
        let ddl = [
            format!(
                "CREATE TABLE IF NOT EXISTS {q} (\
                 seq bigserial PRIMARY KEY, \
                 lane smallint NOT NULL, \
                 topic text NOT NULL, \
                 message_id text NOT NULL, \
                 key text, \
                 headers jsonb NOT NULL, \
                 payload bytea NOT NULL, \
                 created_at timestamptz NOT NULL DEFAULT clock_timestamp(), \
                 published_at timestamptz, \
                 failed_at timestamptz, \
                 error text)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {bare}_pending ON {q} (lane, seq) \
                 WHERE published_at IS NULL AND failed_at IS NULL"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {bare}_published ON {q} (published_at) \
                 WHERE published_at IS NOT NULL"
            ),
        ];
        migrate(pool, t, &ddl, self.inner.op_timeout).await
    }

    /// Stores `message` for `topic` in the transaction (or connection)
    /// `conn`: it is published by a [`Relay`] once that transaction commits,
    /// and never if it rolls back. The current trace context is stored with
    /// it (feature `otel` of switchyard), so the publish continues the trace
    /// of the code that wrote it.
    ///
    /// A message with a key takes a transaction-scoped advisory lock on the
    /// key, so transactions that enqueue for one key commit one after the
    /// other and their events are published in that order (keep such
    /// transactions short, as with any row lock).
    ///
    /// # Errors
    ///
    /// [`Error::Switchyard`](crate::Error::Switchyard) for an invalid topic
    /// name, header key or empty id (nothing is written);
    /// [`Error::Database`](crate::Error::Database) when the insert fails
    /// (the caller's transaction is then aborted, as for any failed statement).
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        topic: &str,
        message: Message,
    ) -> Result<()> {
        validate_name(NameKind::Topic, topic)?;
        message.validate()?;
        let message = telemetry::inject(message);
        let mut headers = serde_json::Map::with_capacity(message.headers().len());
        for (k, v) in message.headers().iter() {
            headers.insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
        }
        let headers = serde_json::Value::Object(headers).to_string();
        sqlx::query(self.inner.insert.clone())
            .bind(lane_of(&message))
            .bind(topic)
            .bind(message.id())
            .bind(message.key())
            .bind(headers)
            .bind(message.payload().as_ref())
            .bind(self.inner.key_class)
            .bind(message.key().map_or(0, key_lock))
            .execute(conn)
            .await?;
        Ok(())
    }

    /// A relay that publishes this outbox's committed events through `client`,
    /// reading and marking them through `pool`. Start it with [`Relay::run`].
    #[must_use]
    pub fn relay(&self, pool: PgPool, client: Client) -> Relay {
        Relay::new(self.clone(), pool, client)
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }
}

/// The lane of a message: a hash of its key, or of its id without one.
pub(crate) fn lane_of(message: &Message) -> i16 {
    let h = fnv1a(message.key().unwrap_or(message.id()).as_bytes());
    // Lossless: below LANES.
    i16::try_from(h % LANES.unsigned_abs() as u64).unwrap_or(0)
}

/// The second key of a key's advisory lock.
fn key_lock(key: &str) -> i32 {
    // Truncation intended: any 32 bits of the hash.
    fnv1a(key.as_bytes()) as i32
}

/// Runs `ddl` in one transaction under a transaction-scoped advisory lock
/// of the table, so concurrent migrations do not race on `IF NOT EXISTS`.
pub(crate) async fn migrate(
    pool: &PgPool,
    table: &Table,
    ddl: &[String],
    after: Duration,
) -> Result<()> {
    bounded("migrate", after, async {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1, 0)")
            .bind(table.lock_class("migrate"))
            .execute(&mut *tx)
            .await?;
        for statement in ddl {
            sqlx::query(audited(statement.clone()))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_has_one_lane_and_lanes_are_in_range() {
        let a = Message::new("1").with_key("customer-7");
        let b = Message::new("2").with_key("customer-7");
        assert_eq!(lane_of(&a), lane_of(&b));
        let lanes: std::collections::HashSet<i16> = (0..2000)
            .map(|i| lane_of(&Message::new("x").with_key(format!("k{i}"))))
            .collect();
        assert!(lanes.iter().all(|l| (0..LANES).contains(l)));
        assert_eq!(lanes.len(), LANES as usize, "2,000 keys cover every lane");
    }

    #[test]
    fn sql_names_the_table() {
        let o = Outbox::with_table("app.events").unwrap();
        assert!(o.inner().fetch.as_str().contains("FROM app.events "));
        assert_eq!(o.inner().channel, "app_events_wake");
        assert!(Outbox::with_table("events; drop").is_err());
    }
}
