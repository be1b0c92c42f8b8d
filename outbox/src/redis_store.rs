//! A `DedupStore` on Redis.

use std::{fmt, time::Duration};

use async_trait::async_trait;
use redis::{
    Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use switchyard_core::{
    Error as SyError,
    consumer::{Claim, DedupStore},
    redact_url,
};

use crate::{Error, Result};

/// Claims an id unless it is claimed or done: one round trip, atomic.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'new'
end
if v == 'done' then return 'done' end
return 'busy'
";

/// Deletes a claim only if it is still this store's.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// A [`DedupStore`] on Redis, for [`Dedup`](switchyard_core::consumer::Dedup):
/// consumers in any number of processes process each message id once
/// within the window (`ttl`). For handlers without a database; a handler
/// that writes to PostgreSQL should use the [`Inbox`](crate::Inbox), which
/// commits the record with its writes.
///
/// Keys are `{namespace}:{message id}`: give each subscription its own
/// namespace, or two subscriptions sharing a store would skip each other's
/// messages. A claim is `SET`-if-absent with the claim's lease as expiry, a
/// processed id is kept for the `ttl`; both expire in Redis, so the store
/// needs no cleaning. Every call is bounded (5 s by default) and the
/// connection is re-established after a failure.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(sub: switchyard_core::Subscription) -> Result<(), Box<dyn std::error::Error>> {
/// use std::{sync::Arc, time::Duration};
/// use switchyard_core::consumer::{Consumer, Dedup};
/// use switchyard_outbox::RedisDedupStore;
///
/// let store = RedisDedupStore::connect("redis://127.0.0.1:6379", "billing").await?;
/// let dedup = Dedup::new(Arc::new(store), Duration::from_secs(24 * 3600));
/// let handler = dedup.wrap(|ctx| async move {
///     println!("charging order {}", ctx.message.id()); // once per id
///     Ok(())
/// });
/// Consumer::new().run(sub, handler, std::future::pending()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisDedupStore {
    conn: ConnectionManager,
    namespace: String,
    /// This store's claim value: `busy:` and a random token.
    token: String,
    claim: Script,
    release: Script,
    url: String,
}

impl fmt::Debug for RedisDedupStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisDedupStore")
            .field("url", &self.url)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl RedisDedupStore {
    /// Connects to the Redis at `url` (`redis://[user:password@]host:port[/db]`,
    /// or `rediss://`), keeping ids under `namespace`.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an empty namespace; [`Error::Redis`] when the
    /// URL is invalid or Redis cannot be reached within 5 s.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        Self::connect_with_timeout(url, namespace, Duration::from_secs(5)).await
    }

    /// As [`connect`](Self::connect), with `timeout` bounding the connection
    /// and each call.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    pub async fn connect_with_timeout(
        url: &str,
        namespace: &str,
        timeout: Duration,
    ) -> Result<Self> {
        if namespace.is_empty() {
            return Err(Error::Config(
                "the Redis dedup namespace must not be empty".into(),
            ));
        }
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let conn = crate::error::bounded(
            "redis connect",
            timeout + Duration::from_secs(1),
            ConnectionManager::new_with_config(client, config),
        )
        .await?;
        Ok(Self {
            conn,
            namespace: namespace.to_owned(),
            token: format!("busy:{}", uuid::Uuid::new_v4().simple()),
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
            url: redact_url(url),
        })
    }

    fn key(&self, id: &str) -> String {
        format!("{}:{id}", self.namespace)
    }
}

fn store_error(e: redis::RedisError) -> SyError {
    let retryable = e.is_io_error() || e.is_timeout() || e.is_connection_dropped();
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        SyError::connection("redis dedup store unreachable", e)
    } else {
        SyError::broker("redis dedup store failed", retryable, Some(Box::new(e)))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl DedupStore for RedisDedupStore {
    async fn claim(&self, id: &str, lease: Duration) -> switchyard_core::Result<Claim> {
        let mut conn = self.conn.clone();
        let answer: String = self
            .claim
            .key(self.key(id))
            .arg(&self.token)
            .arg(millis(lease))
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(match answer.as_str() {
            "new" => Claim::New,
            "done" => Claim::Done,
            _ => Claim::Busy,
        })
    }

    async fn complete(&self, id: &str, ttl: Duration) -> switchyard_core::Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(self.key(id))
            .arg("done")
            .arg("PX")
            .arg(millis(ttl))
            .query_async::<()>(&mut conn)
            .await
            .map_err(store_error)
    }

    async fn release(&self, id: &str) -> switchyard_core::Result<()> {
        let mut conn = self.conn.clone();
        self.release
            .key(self.key(id))
            .arg(&self.token)
            .invoke_async::<i64>(&mut conn)
            .await
            .map(drop)
            .map_err(store_error)
    }
}
