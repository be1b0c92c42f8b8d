//! The relay: publishes committed outbox rows, then marks them.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use sqlx::{Connection as _, PgConnection, PgPool, postgres::PgListener};
use switchyard_core::{Client, Error as SyError, Headers, Message, driver::FailureStreak};
use tokio::sync::Notify;
use tracing::{debug, error, warn};

use crate::{Error, LANES, Outbox, Result, error::bounded, sql::audited};

/// Publishes an [`Outbox`]'s committed events through a switchyard
/// [`Client`], in commit order per key; made by [`Outbox::relay`].
///
/// Run as many as you like (one per service instance is usual): they divide
/// the outbox's lanes between them. A relay retries every transient failure
/// (database or broker down) with the same message ids until it is stopped;
/// it logs the first failure of a streak and then every 30 s.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, client: switchyard_core::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use switchyard_outbox::Outbox;
///
/// let relay = Outbox::new()
///     .relay(pool, client)
///     .with_batch_size(500)
///     .with_retention(Duration::from_secs(3 * 24 * 3600));
/// let report = relay.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
/// println!("published {} events", report.published);
/// # Ok(()) }
/// ```
pub struct Relay {
    outbox: Outbox,
    pool: PgPool,
    client: Client,
    batch: usize,
    concurrency: usize,
    poll: Duration,
    rebalance: Duration,
    retention: Duration,
    prune_every: Duration,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the pool: its options hold the database password.
        f.debug_struct("Relay")
            .field("table", &self.outbox.table())
            .field("batch", &self.batch)
            .field("concurrency", &self.concurrency)
            .field("poll", &self.poll)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

/// What a [`Relay`] did before it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayReport {
    /// Events published (confirmed by the broker) and marked.
    pub published: u64,
    /// Events parked because the broker can never accept them.
    pub parked: u64,
}

/// One outbox row on its way to the broker.
struct Row {
    seq: i64,
    topic: String,
    message: Message,
    /// Seconds from the commit (more exactly, the insert) until now.
    age: f64,
}

impl Relay {
    pub(crate) fn new(outbox: Outbox, pool: PgPool, client: Client) -> Self {
        Self {
            outbox,
            pool,
            client,
            batch: 256,
            concurrency: 32,
            poll: Duration::from_secs(1),
            rebalance: Duration::from_secs(1),
            retention: Duration::from_secs(24 * 3600),
            prune_every: Duration::from_secs(60),
        }
    }

    /// At most this many rows read per round (default 256).
    #[must_use]
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// At most this many keys published concurrently (default 32); one
    /// key's events are always published one after another.
    #[must_use]
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// How often the relay looks for rows without being woken by a
    /// notification (default 1 s): the fallback when a `NOTIFY` is missed,
    /// for example while its listening connection reconnects.
    #[must_use]
    pub fn with_poll_interval(mut self, d: Duration) -> Self {
        self.poll = d.clamp(Duration::from_millis(10), DAY);
        self
    }

    /// How long published rows are kept before they are deleted (default
    /// 24 h). Parked rows are kept until an operator deletes them.
    #[must_use]
    pub fn with_retention(mut self, d: Duration) -> Self {
        self.retention = d.min(100 * 365 * DAY);
        self
    }

    /// How often the relay deletes published rows older than the
    /// [retention](Relay::with_retention) (default once a minute; any relay may).
    #[must_use]
    pub fn with_prune_interval(mut self, d: Duration) -> Self {
        self.prune_every = d.clamp(Duration::from_millis(10), DAY);
        self
    }

    /// Publishes committed events until `shutdown` completes; the batch in
    /// flight is finished (published and marked) first.
    ///
    /// # Errors
    ///
    /// Only when it cannot go on: the [`Client`] was closed
    /// ([`switchyard_core::Error::Closed`]). Database and broker failures
    /// are retried, never returned.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the relay at once; a batch published but
    /// not yet marked is published again (same ids) by the next relay.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<RelayReport> {
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(
            self.pool.clone(),
            self.outbox.inner().channel.clone(),
            Arc::clone(&wake),
            self.poll,
        ));
        let _listener = AbortOnDrop(listener);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut lanes = Lanes::default();
        let mut report = RelayReport::default();
        let mut streak = FailureStreak::default();
        let mut next_prune = Instant::now();
        let mut blocked = Blocked::default();
        let mut pause = self.poll;
        loop {
            let outcome = self.round(&mut lanes, &mut blocked, &mut report).await;
            let full = match outcome {
                Ok(read) => {
                    streak.recovered();
                    pause = self.poll;
                    read >= self.batch
                }
                Err(Error::Switchyard(SyError::Closed)) => return Err(SyError::Closed.into()),
                Err(e) => {
                    if streak.failed() {
                        warn!(table = self.outbox.table(), error = %e, "outbox relay: retrying");
                    }
                    // Back off, deaf to notifications: a commit must not
                    // make a relay hammer a broker or database that is down.
                    tokio::select! {
                        () = &mut shutdown => return Ok(report),
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(MAX_PAUSE);
                    continue;
                }
            };
            if Instant::now() >= next_prune {
                next_prune = Instant::now() + self.prune_every;
                match self.prune().await {
                    Ok(0) => {}
                    Ok(n) => {
                        debug!(table = self.outbox.table(), rows = n, "outbox: pruned");
                        if n >= PRUNE_BATCH {
                            next_prune = Instant::now(); // more to delete: again next round
                        }
                    }
                    Err(e) => {
                        debug!(table = self.outbox.table(), error = %e, "outbox: prune failed")
                    }
                }
            }
            if full {
                // More is waiting: go on at once, unless asked to stop.
                if futures_util::poll!(shutdown.as_mut()).is_ready() {
                    return Ok(report);
                }
                continue;
            }
            tokio::select! {
                () = &mut shutdown => return Ok(report),
                () = wake.notified() => {}
                () = tokio::time::sleep(self.poll) => {}
            }
        }
    }

    /// Holds the right lanes, then publishes and marks one batch of their
    /// rows; returns how many rows it read.
    async fn round(
        &self,
        lanes: &mut Lanes,
        blocked: &mut Blocked,
        report: &mut RelayReport,
    ) -> Result<usize> {
        let inner = self.outbox.inner();
        if let Err(e) = lanes.rebalance(&self.pool, inner, self.rebalance).await {
            lanes.reset();
            return Err(e);
        }
        if lanes.held.is_empty() {
            return Ok(0);
        }
        let rows = bounded("outbox read", inner.op_timeout, async {
            sqlx::query_as::<_, (i64, String, String, Option<String>, String, Vec<u8>, f64)>(
                inner.fetch.clone(),
            )
            .bind(&lanes.held)
            .bind(i64::try_from(self.batch).unwrap_or(i64::MAX))
            .bind(blocked.current())
            .fetch_all(&self.pool)
            .await
        })
        .await?;
        let read = rows.len();
        if read == 0 {
            return Ok(0);
        }
        // One group per key, in seq order; a keyless row is a group of its own.
        let mut groups: Vec<Vec<Row>> = Vec::new();
        let mut by_key: HashMap<String, usize> = HashMap::new();
        for (seq, topic, id, key, headers, payload, age) in rows {
            let headers = decode_headers(&headers);
            let group = match &key {
                Some(k) => *by_key.entry(k.clone()).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                }),
                None => {
                    groups.push(Vec::new());
                    groups.len() - 1
                }
            };
            groups[group].push(Row {
                seq,
                topic,
                message: Message::from_parts(id, key, headers, payload, None),
                age,
            });
        }
        let outcomes: Vec<Outcome> = futures_util::stream::iter(groups)
            .map(|group| self.publish_group(group))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let mut published = Vec::with_capacity(read);
        let mut parked = Vec::new();
        let mut failure = None;
        for outcome in outcomes {
            published.extend(outcome.published);
            parked.extend(outcome.parked);
            if let Some((topic, e)) = outcome.failure {
                // Its rows wait; other topics' rows are read meanwhile.
                blocked.block(topic, self.poll);
                failure.get_or_insert(e);
            }
        }
        if !published.is_empty() {
            let seqs: Vec<i64> = published.iter().map(|(seq, _)| *seq).collect();
            bounded("outbox mark", inner.op_timeout, async {
                sqlx::query(inner.mark.clone())
                    .bind(&seqs)
                    .execute(&self.pool)
                    .await
            })
            .await?;
            report.published += seqs.len() as u64;
            record_published(&published);
        }
        for (seq, why) in parked {
            bounded("outbox park", inner.op_timeout, async {
                sqlx::query(inner.park.clone())
                    .bind(seq)
                    .bind(&why)
                    .execute(&self.pool)
                    .await
            })
            .await?;
            report.parked += 1;
            #[cfg(feature = "metrics")]
            metrics::counter!("switchyard_outbox_parked_total").increment(1);
        }
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(read),
        }
    }

    /// Publishes one key's rows in order, stopping at the first failure
    /// that may pass (the rest wait for the next round, to keep the order).
    async fn publish_group(&self, group: Vec<Row>) -> Outcome {
        let mut outcome = Outcome::default();
        for row in group {
            let bound = self.outbox.inner().op_timeout;
            let published =
                tokio::time::timeout(bound, self.client.publish(&row.topic, row.message))
                    .await
                    .unwrap_or(Err(SyError::Timeout {
                        operation: "outbox publish",
                        after: bound,
                    }));
            match published {
                Ok(()) => outcome.published.push((row.seq, row.age)),
                Err(e) if never_accepted(&e) => {
                    error!(
                        table = self.outbox.table(),
                        seq = row.seq,
                        topic = row.topic,
                        error = %e,
                        "outbox: event parked, the broker cannot accept it"
                    );
                    outcome.parked.push((row.seq, e.to_string()));
                }
                Err(e) => {
                    outcome.failure = Some((row.topic, e));
                    break;
                }
            }
        }
        outcome
    }

    async fn prune(&self) -> Result<u64> {
        let inner = self.outbox.inner();
        let done = bounded("outbox prune", inner.op_timeout, async {
            sqlx::query(inner.prune.clone())
                .bind(self.retention.as_secs_f64())
                .execute(&self.pool)
                .await
        })
        .await?;
        Ok(done.rows_affected())
    }
}

/// What publishing one key's rows came to.
#[derive(Default)]
struct Outcome {
    /// (seq, age in seconds) of each published row.
    published: Vec<(i64, f64)>,
    /// (seq, why) of each row the broker can never accept.
    parked: Vec<(i64, String)>,
    /// The topic and error of the publish that stopped the key.
    failure: Option<(String, SyError)>,
}

const DAY: Duration = Duration::from_secs(24 * 3600);

/// The longest pause between retries after failures.
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// At most this many rows deleted per prune statement.
const PRUNE_BATCH: u64 = 10_000;

/// Topics whose publishes failed, left out of reads until their retry time
/// (doubling per failure, up to [`MAX_PAUSE`]), so one broken topic does not
/// hold back the rows of every other.
#[derive(Default)]
struct Blocked {
    topics: HashMap<String, (Instant, Duration)>,
}

impl Blocked {
    fn block(&mut self, topic: String, first: Duration) {
        let entry = self
            .topics
            .entry(topic)
            .or_insert((Instant::now(), Duration::ZERO));
        entry.1 = if entry.1.is_zero() {
            first
        } else {
            (entry.1 * 2).min(MAX_PAUSE)
        };
        entry.0 = Instant::now() + entry.1;
    }

    /// The topics to leave out now (forgetting those whose time came; a
    /// topic that fails again is blocked for longer).
    fn current(&mut self) -> Vec<String> {
        let now = Instant::now();
        self.topics
            .iter()
            .filter(|(_, (until, _))| *until > now)
            .map(|(t, _)| t.clone())
            .collect()
    }
}

/// Errors that say the message itself can never be published: retrying
/// would block its key for ever.
fn never_accepted(e: &SyError) -> bool {
    matches!(
        e,
        SyError::PayloadTooLarge { .. }
            | SyError::InvalidName { .. }
            | SyError::InvalidHeader { .. }
            | SyError::Codec { .. }
    )
}

fn decode_headers(json: &str) -> Headers {
    let mut headers = Headers::new();
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(json) {
        for (k, v) in map {
            if let serde_json::Value::String(v) = v {
                headers.insert(k, v);
            }
        }
    }
    headers
}

fn record_published(published: &[(i64, f64)]) {
    #[cfg(feature = "metrics")]
    {
        metrics::counter!("switchyard_outbox_published_total").increment(published.len() as u64);
        let histogram = metrics::histogram!("switchyard_outbox_lag_seconds");
        for (_, age) in published {
            histogram.record(*age);
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = published;
}

/// The lanes this relay holds, through session advisory locks on a
/// connection of its own (a relay that dies releases them with it).
#[derive(Default)]
struct Lanes {
    conn: Option<PgConnection>,
    held: Vec<i16>,
    checked: Option<Instant>,
}

impl Lanes {
    fn reset(&mut self) {
        // Dropping the connection releases its locks on the server.
        self.conn = None;
        self.held.clear();
        self.checked = None;
    }

    /// Takes this relay's share (`ceil(LANES / relays)`) of the lanes, giving
    /// extra ones back, at most once per `every`.
    async fn rebalance(
        &mut self,
        pool: &PgPool,
        inner: &crate::outbox::Inner,
        every: Duration,
    ) -> Result<()> {
        let bound = inner.op_timeout;
        if let Some(conn) = self
            .conn
            .as_mut()
            .filter(|_| self.checked.is_some_and(|at| at.elapsed() < every))
        {
            // Between rebalances, one cheap check that the connection
            // holding the locks still lives (a restarted database dropped
            // them): publishing lanes it no longer holds would duplicate.
            bounded(
                "outbox relay ping",
                bound,
                sqlx::query("SELECT 1").execute(conn),
            )
            .await?;
            return Ok(());
        }
        if self.conn.is_none() {
            let mut conn = bounded(
                "outbox relay connect",
                bound,
                PgConnection::connect_with(&pool.connect_options()),
            )
            .await?;
            // The server drops a silent peer's session (and its locks)
            // within about 25 s instead of the system's hours.
            bounded("outbox relay keepalive", bound, async {
                sqlx::query(
                    "SELECT set_config('tcp_keepalives_idle', '10', false), \
                     set_config('tcp_keepalives_interval', '5', false), \
                     set_config('tcp_keepalives_count', '3', false)",
                )
                .execute(&mut conn)
                .await
            })
            .await?;
            bounded("outbox relay join", bound, async {
                sqlx::query("SELECT pg_advisory_lock_shared($1, 0)")
                    .bind(inner.member_class)
                    .execute(&mut conn)
                    .await
            })
            .await?;
            self.conn = Some(conn);
            self.held.clear();
        }
        let conn = self.conn.as_mut().expect("connected above");
        let locks = "FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
                     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                     AND classid = $1::int8::oid";
        let relays: i64 = bounded("outbox relay count", bound, async {
            sqlx::query_scalar(audited(format!("SELECT count(*) {locks} AND objid = 0")))
                .bind(i64::from(inner.member_class))
                .fetch_one(&mut *conn)
                .await
        })
        .await?;
        let relays = usize::try_from(relays.max(1)).unwrap_or(1);
        let share = (LANES as usize).div_ceil(relays);
        while self.held.len() > share {
            let lane = self.held.pop().expect("more than the share");
            bounded("outbox relay release", bound, async {
                sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                    .bind(inner.lane_class)
                    .bind(i32::from(lane))
                    .execute(&mut *conn)
                    .await
            })
            .await?;
        }
        if self.held.len() < share {
            let taken: Vec<i64> = bounded("outbox relay lanes", bound, async {
                sqlx::query_scalar(audited(format!("SELECT objid::int8 {locks}")))
                    .bind(i64::from(inner.lane_class))
                    .fetch_all(&mut *conn)
                    .await
            })
            .await?;
            // Start at a random lane, so relays joining together do not
            // contend for the same ones.
            let start = (uuid::Uuid::new_v4().as_u128() % LANES as u128) as i16;
            for i in 0..LANES {
                if self.held.len() >= share {
                    break;
                }
                let lane = (start + i) % LANES;
                if self.held.contains(&lane) || taken.contains(&i64::from(lane)) {
                    continue;
                }
                let got: bool = bounded("outbox relay take", bound, async {
                    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                        .bind(inner.lane_class)
                        .bind(i32::from(lane))
                        .fetch_one(&mut *conn)
                        .await
                })
                .await?;
                if got {
                    self.held.push(lane);
                }
            }
            self.held.sort_unstable();
        }
        self.checked = Some(Instant::now());
        Ok(())
    }
}

/// Wakes the relay on each notification of `channel`; reconnects (after
/// `pause`) when its connection is lost.
async fn listen(pool: PgPool, channel: String, wake: Arc<Notify>, pause: Duration) {
    loop {
        match PgListener::connect_with(&pool).await {
            Ok(mut listener) => {
                if listener.listen(&channel).await.is_ok() {
                    // Rows may have committed while nobody listened.
                    wake.notify_one();
                    while listener.recv().await.is_ok() {
                        wake.notify_one();
                    }
                }
            }
            Err(e) => debug!(error = %e, "outbox relay: cannot listen, polling meanwhile"),
        }
        tokio::time::sleep(pause).await;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
