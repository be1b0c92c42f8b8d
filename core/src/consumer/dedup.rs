//! De-duplication by message id: [`Dedup`] wraps a
//! [`Consumer`](super::Consumer) handler so each id is processed once within
//! a window, whichever broker, bridge or redelivery brings it.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use futures_util::future::BoxFuture;

use super::{HandlerContext, HandlerError};
use crate::error::Result;

/// What a [`DedupStore`] knows about a message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// Not seen (or its earlier claim expired): the caller now holds it.
    New,
    /// Processed already, within the store's memory.
    Done,
    /// Being processed by another consumer right now.
    Busy,
}

/// Where [`Dedup`] remembers message ids. The in-memory store is
/// [`MemoryDedupStore`]; a shared store (Redis `SET NX PX`, an SQL table with
/// a unique key) lets consumers in several processes de-duplicate together.
///
/// # Contract
///
/// `claim` is atomic: of concurrent claims of one id, exactly one gets
/// [`Claim::New`]. A claim lapses after its `lease` unless completed; a
/// completed id is remembered for `ttl`.
#[async_trait]
pub trait DedupStore: Send + Sync + fmt::Debug {
    /// Claims `id` for processing, for at most `lease`.
    ///
    /// # Errors
    ///
    /// When the store cannot be reached.
    async fn claim(&self, id: &str, lease: Duration) -> Result<Claim>;

    /// Records that `id` was processed; remembered for `ttl`.
    ///
    /// # Errors
    ///
    /// When the store cannot be reached.
    async fn complete(&self, id: &str, ttl: Duration) -> Result<()>;

    /// Gives a claim up (processing failed), so a redelivery may try again.
    ///
    /// # Errors
    ///
    /// When the store cannot be reached.
    async fn release(&self, id: &str) -> Result<()>;
}

/// A [`DedupStore`] in process memory (one process's consumers share it).
/// Expired entries are dropped as new ones arrive.
#[derive(Debug, Default)]
pub struct MemoryDedupStore {
    /// id → (processed, until when the entry counts).
    entries: Mutex<HashMap<String, (bool, Instant)>>,
}

impl MemoryDedupStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// How many ids it currently remembers (claimed or done, not expired).
    #[must_use]
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.lock()
            .values()
            .filter(|(_, until)| *until > now)
            .count()
    }

    /// Whether it remembers no id.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (bool, Instant)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl DedupStore for MemoryDedupStore {
    async fn claim(&self, id: &str, lease: Duration) -> Result<Claim> {
        let now = Instant::now();
        let mut entries = self.lock();
        match entries.get(id) {
            Some((true, until)) if *until > now => Ok(Claim::Done),
            Some((false, until)) if *until > now => Ok(Claim::Busy),
            _ => {
                // Amortised pruning: before the map grows past a power of two.
                if entries.len() >= 1024 && entries.len().is_power_of_two() {
                    entries.retain(|_, (_, until)| *until > now);
                }
                entries.insert(id.to_owned(), (false, now + lease));
                Ok(Claim::New)
            }
        }
    }

    async fn complete(&self, id: &str, ttl: Duration) -> Result<()> {
        self.lock()
            .insert(id.to_owned(), (true, Instant::now() + ttl));
        Ok(())
    }

    async fn release(&self, id: &str) -> Result<()> {
        let mut entries = self.lock();
        if matches!(entries.get(id), Some((false, _))) {
            entries.remove(id);
        }
        Ok(())
    }
}

/// Processes each message id once within a time window, whichever broker
/// or redelivery brings it: a layer around a [`Consumer`](super::Consumer)
/// handler.
///
/// The wrapped handler claims the message id first. A new id runs the
/// handler: success marks it done (remembered for `ttl`), a failure gives
/// the claim up so the redelivery tries again. An id already done is acked
/// without running the handler. An id another consumer is processing right
/// now waits here for that consumer's outcome (polling the store, at most
/// the [lease](Dedup::with_lease)): acked once that one finished, or processed
/// here if it failed — never failed for being busy, which would spend a
/// delivery attempt.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use switchyard_core::consumer::{Consumer, Dedup};
///
/// # async fn run(old: switchyard_core::Subscription, new: switchyard_core::Subscription) -> switchyard_core::Result<()> {
/// // One window shared by the consumers of both brokers during a cutover.
/// let dedup = Dedup::in_memory(Duration::from_secs(3600));
/// let handler = dedup.wrap(|ctx| async move {
///     println!("order {}", ctx.message.id());
///     Ok(())
/// });
/// let (a, b) = tokio::join!(
///     Consumer::new().run(old, handler.clone(), std::future::pending()),
///     Consumer::new().run(new, handler, std::future::pending()),
/// );
/// # a?; b?; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Dedup {
    store: Arc<dyn DedupStore>,
    ttl: Duration,
    lease: Duration,
    duplicates: Arc<AtomicU64>,
}

impl Dedup {
    /// De-duplicates through `store`, remembering processed ids for `ttl`.
    /// A claim lapses after 5 minutes (see [`Dedup::with_lease`]).
    #[must_use]
    pub fn new(store: Arc<dyn DedupStore>, ttl: Duration) -> Self {
        Self {
            store,
            ttl,
            lease: Duration::from_secs(300),
            duplicates: Arc::new(AtomicU64::new(0)),
        }
    }

    /// De-duplicates in process memory ([`MemoryDedupStore`]).
    #[must_use]
    pub fn in_memory(ttl: Duration) -> Self {
        Self::new(Arc::new(MemoryDedupStore::new()), ttl)
    }

    /// How long a claim holds while its handler runs (a consumer that
    /// crashed mid-way holds an id at most this long). Default 5 minutes;
    /// keep it above the longest handler run.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How many deliveries were acked without running the handler because
    /// their id was processed already.
    #[must_use]
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// Wraps a [`Consumer`](crate::consumer::Consumer) handler (see the type docs).
    pub fn wrap<H, F>(
        &self,
        handler: H,
    ) -> impl Fn(HandlerContext) -> BoxFuture<'static, std::result::Result<(), HandlerError>>
    + Clone
    + Send
    + Sync
    + 'static
    where
        H: Fn(HandlerContext) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let this = self.clone();
        move |ctx: HandlerContext| {
            let handler = Arc::clone(&handler);
            let this = this.clone();
            Box::pin(async move {
                let id = ctx.message.id().to_owned();
                let store = &this.store;
                let mut claimed = store
                    .claim(&id, this.lease)
                    .await
                    .map_err(HandlerError::transient)?;
                // Another consumer is processing this id now: wait for its
                // outcome (done, or given up) rather than fail, which would
                // spend one of this delivery's attempts — and dead-letter a
                // message processed successfully, when it was the last.
                let now = tokio::time::Instant::now();
                let give_up = now
                    .checked_add(this.lease)
                    .unwrap_or(now + Duration::from_secs(86_400));
                let mut pause = Duration::from_millis(10);
                while claimed == Claim::Busy && tokio::time::Instant::now() < give_up {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                    claimed = store
                        .claim(&id, this.lease)
                        .await
                        .map_err(HandlerError::transient)?;
                }
                match claimed {
                    Claim::Done => {
                        this.duplicates.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    Claim::Busy => {
                        return Err(HandlerError::transient(
                            "another consumer held this message id for the whole lease",
                        ));
                    }
                    Claim::New => {}
                }
                let result = handler(ctx).await;
                match &result {
                    Ok(()) => this
                        .store
                        .complete(&id, this.ttl)
                        .await
                        .map_err(HandlerError::transient)?,
                    Err(_) => {
                        // The failure decides what happens; a failed
                        // release only delays a retry until the lease ends.
                        let _ = this.store.release(&id).await;
                    }
                }
                result
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    #[tokio::test]
    async fn claims_are_exclusive_and_expire() {
        let store = MemoryDedupStore::new();
        assert_eq!(
            store.claim("a", Duration::from_secs(60)).await.unwrap(),
            Claim::New
        );
        assert_eq!(
            store.claim("a", Duration::from_secs(60)).await.unwrap(),
            Claim::Busy
        );
        store.release("a").await.unwrap();
        assert_eq!(
            store.claim("a", Duration::from_secs(60)).await.unwrap(),
            Claim::New
        );
        store.complete("a", Duration::from_secs(60)).await.unwrap();
        assert_eq!(
            store.claim("a", Duration::from_secs(60)).await.unwrap(),
            Claim::Done
        );
        // A release does not forget a completed id.
        store.release("a").await.unwrap();
        assert_eq!(
            store.claim("a", Duration::from_secs(60)).await.unwrap(),
            Claim::Done
        );
        assert_eq!(store.claim("b", Duration::ZERO).await.unwrap(), Claim::New);
        // A lapsed claim can be taken again.
        assert_eq!(
            store.claim("b", Duration::from_secs(60)).await.unwrap(),
            Claim::New
        );
        assert_eq!(store.len(), 2);
    }

    fn ctx(id: &str) -> HandlerContext {
        HandlerContext {
            message: Message::new("x").with_id(id),
            attempt: 1,
            max_attempts: 5,
            topic: "t".into(),
            subscription: "s".into(),
        }
    }

    #[tokio::test]
    async fn each_id_is_processed_once_and_failures_retry() {
        let dedup = Dedup::in_memory(Duration::from_secs(60));
        let runs = Arc::new(Mutex::new(Vec::<String>::new()));
        let r = Arc::clone(&runs);
        let handler = dedup.wrap(move |ctx: HandlerContext| {
            let r = Arc::clone(&r);
            async move {
                r.lock().unwrap().push(ctx.message.id().to_owned());
                if ctx.message.id() == "fails-once" && ctx.attempt == 1 {
                    return Err(HandlerError::transient("not yet"));
                }
                Ok(())
            }
        });
        handler(ctx("a")).await.unwrap();
        handler(ctx("a")).await.unwrap();
        assert!(handler(ctx("fails-once")).await.is_err());
        let mut again = ctx("fails-once");
        again.attempt = 2;
        handler(again.clone()).await.unwrap();
        handler(again).await.unwrap();
        assert_eq!(*runs.lock().unwrap(), ["a", "fails-once", "fails-once"]);
        assert_eq!(dedup.duplicates(), 2);
    }

    /// A copy delivered while another consumer processes the same id, on
    /// its last attempt: it waits for the other's outcome and is acked as a
    /// duplicate. (A transient failure here would spend the attempt and
    /// dead-letter a message that was processed successfully.)
    #[tokio::test]
    async fn a_concurrent_copy_waits_instead_of_failing() {
        let dedup = Dedup::in_memory(Duration::from_secs(60));
        let runs = Arc::new(AtomicU64::new(0));
        let r = Arc::clone(&runs);
        let handler = dedup.wrap(move |_ctx: HandlerContext| {
            let r = Arc::clone(&r);
            async move {
                r.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(())
            }
        });
        let mut last = ctx("a");
        last.attempt = last.max_attempts;
        let (first, copy) = tokio::join!(handler(ctx("a")), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            handler(last).await
        });
        first.unwrap();
        assert!(copy.is_ok(), "the copy failed: {copy:?}");
        assert_eq!(runs.load(Ordering::Relaxed), 1);
        assert_eq!(dedup.duplicates(), 1);
    }

    /// A copy whose twin fails runs the handler itself once the twin gave
    /// its claim up.
    #[tokio::test]
    async fn a_concurrent_copy_takes_over_when_the_first_fails() {
        let dedup = Dedup::in_memory(Duration::from_secs(60));
        let runs = Arc::new(AtomicU64::new(0));
        let r = Arc::clone(&runs);
        let handler = dedup.wrap(move |_ctx: HandlerContext| {
            let r = Arc::clone(&r);
            async move {
                let n = r.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
                if n == 0 {
                    return Err(HandlerError::transient("first run fails"));
                }
                Ok(())
            }
        });
        let (first, copy) = tokio::join!(handler(ctx("b")), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            handler(ctx("b")).await
        });
        assert!(first.is_err());
        assert!(copy.is_ok(), "{copy:?}");
        assert_eq!(runs.load(Ordering::Relaxed), 2);
        assert_eq!(dedup.duplicates(), 0);
    }
}
