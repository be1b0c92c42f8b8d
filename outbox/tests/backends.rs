//! The outbox, its relay, the inbox and the Redis dedup store against the
//! real PostgreSQL (`SWITCHYARD_POSTGRES_URL`) and Redis
//! (`SWITCHYARD_REDIS_URL`), on every broker backend (`memory://` and the
//! `SWITCHYARD_*_URL` brokers; a missing one skips, or fails under
//! `SWITCHYARD_REQUIRE_BROKERS=1`).

use std::{
    collections::{HashMap, HashSet},
    io::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use sqlx::{PgPool, postgres::PgPoolOptions};
use switchyard::{
    Capabilities, Client, KeyOrdering, Message, SubscribeOptions, Subscription,
    consumer::{Backoff, Consumer, Dedup, HandlerContext, HandlerError},
    driver::{Broker, Publisher, Receiver, Subscriber},
};
use switchyard_conformance::broker_url;
use switchyard_outbox::{Inbox, Outbox, RedisDedupStore, Relay, RelayReport};
use tokio::task::JoinHandle;

/// Set in the environment of a child relay process: table, topic, URL.
const CHILD: &str = "SWITCHYARD_OUTBOX_CHILD";

fn short_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()[20..].to_owned()
}

async fn pool(url: &str, size: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .expect("connect to PostgreSQL")
}

/// A broker, a topic with one subscription, and an outbox table of their own.
struct Fixture {
    url: String,
    client: Client,
    pool: PgPool,
    outbox: Outbox,
    topic: String,
    opts: SubscribeOptions,
}

impl Fixture {
    async fn new(broker: Option<String>, tag: &str) -> Option<Self> {
        Self::with_options(broker, tag, |o| o).await
    }

    async fn with_options(
        broker: Option<String>,
        tag: &str,
        options: impl FnOnce(SubscribeOptions) -> SubscribeOptions,
    ) -> Option<Self> {
        let url = broker?;
        let pg = broker_url("SWITCHYARD_POSTGRES_URL")?;
        let id = short_id();
        let client = switchyard::connect(&url)
            .await
            .expect("connect to the broker");
        let pool = pool(&pg, 8).await;
        let outbox = Outbox::with_table(&format!("sy_test_outbox_{id}")).unwrap();
        outbox.migrate(&pool).await.unwrap();
        let topic = format!("sy-outbox.{tag}.{id}");
        let opts = options(
            SubscribeOptions::new(format!("sub-{id}")).with_ack_timeout(Duration::from_secs(30)),
        );
        client.ensure_subscription(&topic, &opts).await.unwrap();
        Some(Self {
            url,
            client,
            pool,
            outbox,
            topic,
            opts,
        })
    }

    async fn subscribe(&self) -> Subscription {
        self.client
            .subscribe(&self.topic, self.opts.clone())
            .await
            .unwrap()
    }

    /// Enqueues `messages` in transactions of `per_tx`, committed.
    async fn enqueue(&self, messages: &[Message], per_tx: usize) {
        for chunk in messages.chunks(per_tx) {
            let mut tx = self.pool.begin().await.unwrap();
            for m in chunk {
                self.outbox
                    .enqueue(&mut tx, &self.topic, m.clone())
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        }
    }

    fn relay(&self) -> Relay {
        self.outbox
            .relay(self.pool.clone(), self.client.clone())
            .with_poll_interval(Duration::from_millis(500))
    }

    /// Rows not yet published.
    async fn pending(&self) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {} WHERE published_at IS NULL",
            self.outbox.table()
        )))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    async fn drop_table(&self) {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {}",
            self.outbox.table()
        )))
        .execute(&self.pool)
        .await;
    }
}

/// A relay running until `stop` is sent.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<switchyard_outbox::Result<RelayReport>>,
}

fn start(relay: Relay) -> Running {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(relay.run(async {
        let _ = stopped.await;
    }));
    Running { stop, task }
}

impl Running {
    async fn stop(self) -> RelayReport {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the relay stops within 60 s")
            .unwrap()
            .unwrap()
    }
}

/// Receives until `want` distinct ids arrived (acking each), then `quiet`
/// more without a new delivery; one delivery per publish, in arrival
/// order: every attempt-1 delivery (two of them for one id would be two
/// publishes), and an id's first delivery whatever its attempt (SQS counts
/// a receive whose answer was lost on the way — a ReceiveMessage timed out
/// under load — so the first copy the application sees can be attempt 2).
async fn receive(
    sub: &mut Subscription,
    want: usize,
    within: Duration,
    quiet: Duration,
) -> Vec<Message> {
    let until = Instant::now() + within;
    let mut got = Vec::new();
    let mut ids = HashSet::new();
    loop {
        let left = if ids.len() >= want {
            quiet
        } else {
            until.saturating_duration_since(Instant::now())
        };
        match tokio::time::timeout(left, sub.recv()).await {
            Ok(Ok(d)) => {
                let first_seen = ids.insert(d.message().id().to_owned());
                // A broker's own redelivery of a copy already seen
                // (attempt > 1: delivery is at-least-once, e.g. a lease that
                // lapsed while the copy waited in the prefetch under load)
                // is not a publish.
                if d.attempt() == 1 || first_seen {
                    got.push(d.message().clone());
                }
                // An ack that comes too late is answered by that redelivery.
                let _ = d.ack().await;
            }
            Ok(Err(e)) => panic!("receive failed: {e}"),
            Err(_) if ids.len() >= want => return got,
            Err(_) => panic!("{} of {want} events arrived within {within:?}", ids.len()),
        }
    }
}

/// 10,000 events in 100 transactions, 50 keys: every one arrives, none
/// twice, and each key's events in commit order where the broker keeps it.
async fn delivers_every_event_in_key_order(broker: Option<String>, _test: &str) {
    let Some(f) = Fixture::new(broker, "all").await else {
        return;
    };
    let n = 10_000;
    let messages: Vec<Message> = (0..n)
        .map(|i| Message::new(format!("{}", i / 50)).with_key(format!("key-{}", i % 50)))
        .collect();
    f.enqueue(&messages, 100).await;
    let mut sub = f.subscribe().await;
    let relay = start(f.relay().with_batch_size(500));
    let got = receive(
        &mut sub,
        n,
        Duration::from_secs(600),
        Duration::from_millis(500),
    )
    .await;
    let report = relay.stop().await;
    assert_eq!(report.published, n as u64);
    let ids: HashSet<&str> = got.iter().map(Message::id).collect();
    assert_eq!(ids.len(), n, "every event arrived");
    assert_eq!(got.len(), n, "and none twice");
    let sent: HashSet<&str> = messages.iter().map(Message::id).collect();
    assert_eq!(ids, sent);
    if f.client.capabilities().ordering == KeyOrdering::PerKey {
        let mut last: HashMap<&str, i64> = HashMap::new();
        for m in &got {
            let seq: i64 = std::str::from_utf8(m.payload()).unwrap().parse().unwrap();
            let key = m.key().unwrap();
            if let Some(prev) = last.insert(key, seq) {
                assert!(seq > prev, "{key}: {seq} after {prev}");
            }
        }
    }
    assert_eq!(f.pending().await, 0);
    f.drop_table().await;
}

/// A rolled-back transaction's event never arrives; a committed one does,
/// with its id, key, headers and payload.
async fn rolled_back_events_never_arrive(broker: Option<String>, _test: &str) {
    let Some(f) = Fixture::new(broker, "rollback").await else {
        return;
    };
    let lost = Message::new("rolled back").with_key("k");
    let kept = Message::new("committed")
        .with_key("k")
        .with_header("tenant", "acme");
    let mut tx = f.pool.begin().await.unwrap();
    f.outbox
        .enqueue(&mut tx, &f.topic, lost.clone())
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    f.enqueue(std::slice::from_ref(&kept), 1).await;
    let mut sub = f.subscribe().await;
    let relay = start(f.relay());
    // Two more seconds after the committed one, for anything else.
    let got = receive(&mut sub, 1, Duration::from_secs(60), Duration::from_secs(2)).await;
    relay.stop().await;
    assert_eq!(got.len(), 1, "{got:?}");
    let m = &got[0];
    assert_eq!((m.id(), m.key()), (kept.id(), Some("k")));
    assert_eq!(m.payload().as_ref(), b"committed");
    assert_eq!(m.headers().get("tenant"), Some("acme"));
    f.drop_table().await;
}

/// With polling as good as off (once an hour), an event enqueued while the
/// relay waits still arrives: the commit's `NOTIFY` woke it.
async fn a_commit_wakes_the_relay(broker: Option<String>, _test: &str) {
    let Some(f) = Fixture::new(broker, "notify").await else {
        return;
    };
    let mut sub = f.subscribe().await;
    let relay = start(f.relay().with_poll_interval(Duration::from_secs(3600)));
    // The relay's first rounds find nothing; then it waits.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let event = Message::new("wake up");
    f.enqueue(std::slice::from_ref(&event), 1).await;
    let got = receive(
        &mut sub,
        1,
        Duration::from_secs(60),
        Duration::from_millis(200),
    )
    .await;
    relay.stop().await;
    assert_eq!(got[0].id(), event.id());
    f.drop_table().await;
}

/// An event larger than the broker accepts is parked (marked failed with
/// the error), and the next event of its key is still published.
async fn an_event_the_broker_refuses_is_parked(broker: Option<String>, _test: &str) {
    let Some(f) = Fixture::new(broker, "parked").await else {
        return;
    };
    let limit = f.client.capabilities().max_payload;
    if limit > 8 << 20 {
        return f.drop_table().await; // too large to be worth storing in a test
    }
    let big = Message::new(vec![b'x'; limit + 1]).with_key("k");
    let next = Message::new("next").with_key("k");
    f.enqueue(&[big.clone(), next.clone()], 2).await;
    let mut sub = f.subscribe().await;
    let relay = start(f.relay());
    let got = receive(&mut sub, 1, Duration::from_secs(60), Duration::from_secs(1)).await;
    let report = relay.stop().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id(), next.id());
    assert_eq!((report.published, report.parked), (1, 1));
    let (id, error): (String, String) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT message_id, error FROM {} WHERE failed_at IS NOT NULL",
        f.outbox.table()
    )))
    .fetch_one(&f.pool)
    .await
    .unwrap();
    assert_eq!(id, big.id());
    assert!(error.contains("exceeds"), "{error}");
    f.drop_table().await;
}

/// Publishes to one topic fail for good (more rows than a batch, enqueued
/// first): the rows of another topic are still published meanwhile.
async fn a_failing_topic_does_not_hold_back_the_others(broker: Option<String>, _test: &str) {
    let Some(f) = Fixture::new(broker, "blocked").await else {
        return;
    };
    let bad = format!("{}-missing", f.topic);
    let stuck: Vec<Message> = (0..300)
        .map(|i| Message::new("x").with_key(format!("k{i}")))
        .collect();
    let mut tx = f.pool.begin().await.unwrap();
    for m in stuck {
        f.outbox.enqueue(&mut tx, &bad, m).await.unwrap();
    }
    tx.commit().await.unwrap();
    let good: Vec<Message> = (0..10).map(|i| Message::new(format!("{i}"))).collect();
    f.enqueue(&good, 10).await;
    let client = Client::new(Faulty {
        inner: Arc::clone(f.client.broker()),
        fault: Fault::Refuse(bad),
    });
    let mut sub = f.subscribe().await;
    let relay = start(f.outbox.relay(f.pool.clone(), client).with_batch_size(256));
    let got = receive(
        &mut sub,
        10,
        Duration::from_secs(60),
        Duration::from_millis(200),
    )
    .await;
    let report = relay.stop().await;
    assert_eq!(got.len(), 10);
    assert_eq!(report.published, 10);
    assert_eq!(f.pending().await, 300, "the refused topic's rows wait");
    f.drop_table().await;
}

/// Published rows are deleted once older than the retention.
async fn published_rows_are_pruned(broker: Option<String>, _test: &str) {
    let Some(f) = Fixture::new(broker, "prune").await else {
        return;
    };
    let events: Vec<Message> = (0..20).map(|i| Message::new(format!("{i}"))).collect();
    f.enqueue(&events, 5).await;
    let mut sub = f.subscribe().await;
    let relay = start(
        f.relay()
            .with_retention(Duration::ZERO)
            .with_prune_interval(Duration::from_millis(100)),
    );
    receive(
        &mut sub,
        20,
        Duration::from_secs(60),
        Duration::from_millis(200),
    )
    .await;
    let count = format!("SELECT count(*) FROM {}", f.outbox.table());
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count.clone()))
            .fetch_one(&f.pool)
            .await
            .unwrap();
        if rows == 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "{rows} published rows still there after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await;
    f.drop_table().await;
}

/// Two transactions enqueue for one key, the first to enqueue committing
/// last if it could: the events are published in the order the
/// transactions committed, which `enqueue`'s key lock makes the order they
/// enqueued in.
async fn same_key_transactions_publish_in_commit_order(broker: Option<String>, _test: &str) {
    let Some(f) = Fixture::new(broker, "commit").await else {
        return;
    };
    if f.client.capabilities().ordering != KeyOrdering::PerKey {
        return f.drop_table().await;
    }
    let f = Arc::new(f);
    let committed = Arc::new(Mutex::new(Vec::<String>::new()));
    let first = Message::new("first").with_key("order-9");
    let mut t1 = f.pool.begin().await.unwrap();
    f.outbox
        .enqueue(&mut t1, &f.topic, first.clone())
        .await
        .unwrap();
    // The second transaction enqueues for the same key and commits at once...
    let second = {
        let (f, committed) = (Arc::clone(&f), Arc::clone(&committed));
        tokio::spawn(async move {
            let m = Message::new("second").with_key("order-9");
            let mut t2 = f.pool.begin().await.unwrap();
            f.outbox
                .enqueue(&mut t2, &f.topic, m.clone())
                .await
                .unwrap();
            t2.commit().await.unwrap();
            committed.lock().unwrap().push(m.id().to_owned());
        })
    };
    // ...while the first is still open: the key lock holds it back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        committed.lock().unwrap().is_empty(),
        "the second transaction committed while the first held the key"
    );
    // Recorded before the commit that releases the second (recorded after
    // it, the second could record its commit first on a busy machine).
    committed.lock().unwrap().push(first.id().to_owned());
    t1.commit().await.unwrap();
    second.await.unwrap();
    let mut sub = f.subscribe().await;
    let relay = start(f.relay());
    let got = receive(
        &mut sub,
        2,
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .await;
    relay.stop().await;
    let got: Vec<String> = got.iter().map(|m| m.id().to_owned()).collect();
    assert_eq!(got, *committed.lock().unwrap(), "published in commit order");
    f.drop_table().await;
}

/// Two relays running together share the lanes and publish every event
/// exactly once between them.
async fn two_relays_share_without_duplicates(broker: Option<String>, _test: &str) {
    let Some(f) = Fixture::new(broker, "pair").await else {
        return;
    };
    let (a, b) = (start(f.relay()), start(f.relay()));
    // Both hold lanes once each has rebalanced (every second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = 2_000;
    let messages: Vec<Message> = (0..n)
        .map(|i| Message::new(format!("{i}")).with_key(format!("key-{}", i % 200)))
        .collect();
    let mut sub = f.subscribe().await;
    f.enqueue(&messages, 20).await;
    let got = receive(
        &mut sub,
        n,
        Duration::from_secs(300),
        Duration::from_secs(1),
    )
    .await;
    let (a, b) = (a.stop().await, b.stop().await);
    assert_eq!(got.len(), n, "no event published twice");
    assert_eq!(a.published + b.published, n as u64);
    assert!(
        a.published > 0 && b.published > 0,
        "both relays did work: {} and {}",
        a.published,
        b.published
    );
    f.drop_table().await;
}

/// A broker in front of a real one that misbehaves on publish.
#[derive(Debug)]
struct Faulty {
    inner: Arc<dyn Broker>,
    fault: Fault,
}

#[derive(Debug)]
enum Fault {
    /// Confirms a publish, reports its id in the log, then never returns:
    /// the relay in front of it is stuck between publish and mark.
    StallAfterPublish(std::path::PathBuf),
    /// Refuses every publish to this topic, as a broker without it would.
    Refuse(String),
}

#[async_trait]
impl Publisher for Faulty {
    async fn publish(&self, topic: &str, message: Message) -> switchyard::Result<()> {
        match &self.fault {
            Fault::Refuse(t) if t == topic => Err(switchyard::Error::not_found(
                "topic",
                topic,
                "refused by the test",
                None,
            )),
            Fault::Refuse(_) => self.inner.publish(topic, message).await,
            Fault::StallAfterPublish(log) => {
                let id = message.id().to_owned();
                self.inner.publish(topic, message).await?;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap();
                writeln!(f, "{id}").unwrap();
                std::future::pending().await
            }
        }
    }
    async fn close(&self) -> switchyard::Result<()> {
        Publisher::close(&*self.inner).await
    }
}

#[async_trait]
impl Subscriber for Faulty {
    async fn ensure_topic(&self, topic: &str) -> switchyard::Result<()> {
        self.inner.ensure_topic(topic).await
    }
    async fn ensure_subscription(&self, t: &str, o: &SubscribeOptions) -> switchyard::Result<()> {
        self.inner.ensure_subscription(t, o).await
    }
    async fn receiver(
        &self,
        t: &str,
        o: &SubscribeOptions,
    ) -> switchyard::Result<Box<dyn Receiver>> {
        self.inner.receiver(t, o).await
    }
    async fn close(&self) -> switchyard::Result<()> {
        Subscriber::close(&*self.inner).await
    }
}

impl Broker for Faulty {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

/// The child's part: a relay whose broker stalls after its first confirmed
/// publish, until the parent kills the process.
async fn child_relay(spec: &str) {
    let parts: Vec<&str> = spec.split('\t').collect();
    let [table, url, log] = parts[..] else {
        panic!("bad child spec {spec:?}")
    };
    let pg = std::env::var("SWITCHYARD_POSTGRES_URL").unwrap();
    let inner = switchyard::connect(url).await.unwrap();
    let client = Client::new(Faulty {
        inner: Arc::clone(inner.broker()),
        fault: Fault::StallAfterPublish(log.into()),
    });
    let outbox = Outbox::with_table(table).unwrap();
    let _ = outbox
        .relay(pool(&pg, 2).await, client)
        .run(std::future::pending())
        .await;
}

/// The relay process is SIGKILLed after the broker confirmed an event and
/// before the relay marked it: the next relay publishes it again with the
/// same id — a duplicate, never a loss.
async fn relay_killed_between_publish_and_mark(broker: Option<String>, test: &str) {
    if let Ok(spec) = std::env::var(CHILD) {
        return child_relay(&spec).await;
    }
    let Some(f) = Fixture::new(broker, "killed").await else {
        return;
    };
    if f.url.starts_with("memory://") {
        return; // the memory broker lives in its process: nothing survives the kill
    }
    let event = Message::new("order 1").with_key("order-1");
    f.enqueue(std::slice::from_ref(&event), 1).await;
    let log = std::env::temp_dir().join(format!("sy-outbox-child-{}.log", short_id()));
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(
            CHILD,
            format!("{}\t{}\t{}", f.outbox.table(), f.url, log.display()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&log).unwrap_or_default().is_empty() {
        assert!(
            Instant::now() < until,
            "the child relay published nothing within 60 s"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child relay exited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let published = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert_eq!(published.trim(), event.id());
    assert_eq!(f.pending().await, 1, "the child never marked it");

    let mut sub = f.subscribe().await;
    let relay = start(f.relay());
    let got = receive(&mut sub, 1, Duration::from_secs(60), Duration::from_secs(2)).await;
    let report = relay.stop().await;
    assert_eq!(report.published, 1, "published again by the next relay");
    assert_eq!(
        got.len(),
        2,
        "the child's copy and the next relay's: {got:?}"
    );
    assert!(got.iter().all(|m| m.id() == event.id()), "same id");
    assert_eq!(f.pending().await, 0);
    f.drop_table().await;
}

/// Every message delivered twice, the copies side by side, to two consumers
/// of one subscription that allows a single attempt: each id is processed
/// exactly once, every copy is acked, and none is dead-lettered (a copy that
/// failed for finding its twin in progress would be, having no attempt left).
async fn processed_once_under_concurrent_redelivery(broker: Option<String>, store: Store) {
    let Some(f) = Fixture::with_options(broker, "dedup", |o| o.with_max_attempts(1)).await else {
        return;
    };
    let n = 300;
    for i in 0..n {
        // The redelivery: the same message (same id) published twice.
        let m = Message::new(format!("{i}"));
        f.client.publish(&f.topic, m.clone()).await.unwrap();
        f.client.publish(&f.topic, m).await.unwrap();
    }
    let work = Work::default();
    // The handler, behind the store under test.
    type Handler = Arc<
        dyn Fn(HandlerContext) -> BoxFuture<'static, Result<(), HandlerError>>
            + Send
            + Sync
            + 'static,
    >;
    let (handler, duplicates, inbox): (Handler, Option<Dedup>, Option<(PgPool, Inbox)>) =
        match store {
            Store::Redis => {
                let Some(redis) = broker_url("SWITCHYARD_REDIS_URL") else {
                    return;
                };
                let namespace = format!("sy-test-{}", short_id());
                let store = RedisDedupStore::connect(&redis, &namespace).await.unwrap();
                let dedup = Dedup::new(Arc::new(store), Duration::from_secs(600));
                let w = work.clone();
                let h = dedup.wrap(move |ctx| w.clone().run(ctx));
                (Arc::new(h), Some(dedup), None)
            }
            Store::Postgres => {
                let pool = pool(&broker_url("SWITCHYARD_POSTGRES_URL").unwrap(), 20).await;
                let inbox = Inbox::with_table(&format!("sy_test_inbox_{}", short_id())).unwrap();
                inbox.migrate(&pool).await.unwrap();
                let w = work.clone();
                let h = inbox.wrap(pool.clone(), move |ctx, tx| {
                    let w = w.clone();
                    async move { w.run(ctx).await.map(|()| tx) }
                });
                (Arc::new(h), None, Some((pool, inbox)))
            }
        };
    // Two consumers of the subscription, 8 handlers each.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (sub, handler, mut stopped) =
            (f.subscribe().await, Arc::clone(&handler), stopped.clone());
        let consumer = Consumer::new()
            .with_concurrency(8)
            .with_backoff(Backoff::new(
                Duration::from_millis(10),
                Duration::from_millis(200),
            ));
        tasks.push(tokio::spawn(async move {
            let until_stopped = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            consumer
                .run(sub, move |ctx| handler(ctx), until_stopped)
                .await
        }));
    }
    // Every id processed, then time for every copy to be settled.
    let all =
        tokio::time::timeout(Duration::from_secs(120), work.done.acquire_many(n as u32)).await;
    assert!(
        all.is_ok(),
        "{} of {n} ids processed within 120 s",
        work.runs().len()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send(true).unwrap();
    let mut reports = Vec::new();
    for t in tasks {
        reports.push(t.await.unwrap().unwrap());
    }
    let runs = work.runs();
    assert_eq!(runs.len(), n);
    let twice: Vec<_> = runs.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "processed more than once: {twice:?}");
    let acked: u64 = reports.iter().map(|r| r.acked).sum();
    let dead: u64 = reports.iter().map(|r| r.dead_lettered).sum();
    assert_eq!(dead, 0, "no copy dead-lettered: {reports:?}");
    assert_eq!(
        acked,
        2 * n as u64,
        "both copies of every id acked: {reports:?}"
    );
    if let Some(dedup) = duplicates {
        assert_eq!(
            dedup.duplicates(),
            n as u64,
            "every second copy was a duplicate"
        );
    }
    if let Some((pool, inbox)) = inbox {
        let drop = format!("DROP TABLE IF EXISTS {}", inbox.table());
        let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&pool).await;
    }
    f.drop_table().await;
}

/// The handlers' work: counts runs per id, takes 100 ms, and releases a
/// permit of `done` per run.
#[derive(Clone)]
struct Work {
    runs: Arc<Mutex<HashMap<String, u32>>>,
    done: Arc<tokio::sync::Semaphore>,
}

impl Default for Work {
    fn default() -> Self {
        Self {
            runs: Arc::default(),
            done: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

impl Work {
    async fn run(self, ctx: HandlerContext) -> Result<(), HandlerError> {
        *self
            .runs
            .lock()
            .unwrap()
            .entry(ctx.message.id().to_owned())
            .or_default() += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.done.add_permits(1);
        Ok(())
    }

    fn runs(&self) -> HashMap<String, u32> {
        self.runs.lock().unwrap().clone()
    }
}

async fn redis_dedup_processes_once_under_concurrent_redelivery(
    broker: Option<String>,
    _test: &str,
) {
    processed_once_under_concurrent_redelivery(broker, Store::Redis).await;
}

async fn inbox_processes_once_under_concurrent_redelivery(broker: Option<String>, _test: &str) {
    processed_once_under_concurrent_redelivery(broker, Store::Postgres).await;
}

#[derive(Debug, Clone, Copy)]
enum Store {
    Redis,
    Postgres,
}

/// One test per case for the backend `$name` (URL from `$url`); each case
/// gets the broker URL and its own test name (for a child process).
macro_rules! backend {
    ($name:ident, $url:expr) => {
        backend!(@cases $name, $url;
            delivers_every_event_in_key_order,
            rolled_back_events_never_arrive,
            same_key_transactions_publish_in_commit_order,
            a_commit_wakes_the_relay,
            an_event_the_broker_refuses_is_parked,
            published_rows_are_pruned,
            a_failing_topic_does_not_hold_back_the_others,
            two_relays_share_without_duplicates,
            relay_killed_between_publish_and_mark,
            redis_dedup_processes_once_under_concurrent_redelivery,
            inbox_processes_once_under_concurrent_redelivery,
        );
    };
    (@cases $name:ident, $url:expr; $($case:ident),* $(,)?) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case($url, concat!(stringify!($name), "::", stringify!($case))).await;
                }
            )*
        }
    };
}

backend!(
    memory,
    Some(format!("memory://outbox-{}", super::short_id()))
);
backend!(nats, super::broker_url("SWITCHYARD_NATS_URL"));
backend!(rabbitmq, super::broker_url("SWITCHYARD_RABBITMQ_URL"));
backend!(kafka, super::broker_url("SWITCHYARD_KAFKA_URL"));
backend!(sqs, super::broker_url("SWITCHYARD_SQS_URL"));
