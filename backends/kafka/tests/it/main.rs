//! The conformance suite against a Kafka-compatible broker
//! (`SWITCHYARD_KAFKA_URL`; tansu in CI), plus Kafka-specific tests.

use std::time::Duration;

use switchyard_conformance::{
    Harness, Timing,
    containers::{Connect, Contained, Kind},
    fault::{BrokerProcess, Link, Linked, PrivateBroker, ProcessBroker, Via, free_port},
};
use switchyard_core::{Client, Result};

mod specific;

#[derive(Debug)]
struct KafkaHarness {
    url: String,
}

#[async_trait::async_trait]
impl Harness for KafkaHarness {
    async fn client(&self) -> Result<Client> {
        switchyard_kafka::connect(&self.url).await
    }

    async fn connect(&self, url: &str) -> Result<Client> {
        switchyard_kafka::connect(url).await
    }

    fn url_at(&self, addr: std::net::SocketAddr, connect_timeout: Duration) -> Option<String> {
        let ms = connect_timeout.as_millis();
        Some(format!("kafka://{addr}?connect_timeout={ms}ms"))
    }

    /// A new consumer first joins its group: 20 s to receive.
    fn timing(&self) -> Timing {
        Timing {
            receive_timeout: Duration::from_secs(20),
            ..Timing::default()
        }
    }

    /// Deletes the subscription's topic (a subscription is a consumer group
    /// reading its topic, named as it is), as an operator would with
    /// `kafka-topics.sh --delete`. The case calls this once per subscription
    /// of the same topic: the second call finds it gone already.
    ///
    /// Not on tansu 0.6.0: it deletes topics, but answers a fetch of a topic
    /// it does not find — the deleted one, and for a moment any other (its
    /// sqlite lookup failing while the deletion runs is answered the same
    /// way) — with a zero topic id and a spurious `CurrentLeader`
    /// (`unknown_topic_response`, tansu-storage `service/fetch.rs`), and
    /// librdkafka 2.12 then looks the topic up by a null name and crashes
    /// the process (SIGSEGV in `rd_kafka_metadata_cache_find`, from
    /// `rd_kafka_metadata_update_op`). Measured on 2026-12-05: the case
    /// crashed 2 of 2 runs, and deleting an unrelated topic crashed a test
    /// consuming another one. A live consumer fetches its topic all the
    /// time, so the case cannot run there, and a deletion on the shared
    /// broker would take down the tests running beside it;
    /// `specific::a_deleted_topic_ends_recv_with_not_found` deletes a topic
    /// on a private tansu while its consumer is paused.
    async fn delete_subscription(
        &self,
        topic: &str,
        _subscription: &str,
    ) -> std::result::Result<(), String> {
        if specific::on_tansu() {
            return Err(
                "tansu 0.6.0 answers fetches of a deleted topic with a zero topic id, \
                        on which librdkafka 2.12 crashes the process (SIGSEGV); \
                        specific::a_deleted_topic_ends_recv_with_not_found covers Kafka on a \
                        private tansu, its consumer paused"
                    .into(),
            );
        }
        specific::delete_topic(&self.url, topic).await;
        Ok(())
    }

    /// A container of its own with `SWITCHYARD_CONTAINERS=1`, else a
    /// tansu process.
    async fn private_broker(&self) -> Option<Box<dyn PrivateBroker>> {
        let connect = || -> Connect {
            Box::new(|url| {
                Box::pin(async move {
                    switchyard_kafka::connect(&format!(
                        "{url}?session.timeout.ms=6000&heartbeat.interval.ms=1000"
                    ))
                    .await
                })
            })
        };
        if let Some(contained) = Contained::start_if_enabled(Kind::Kafka, connect()).await {
            return Some(Box::new(contained));
        }
        let process = own_tansu(None);
        let url = Kind::Kafka.url(process.port());
        Some(Box::new(
            ProcessBroker::start(process, TANSU_BOOT, url, connect()).await,
        ))
    }

    /// A private tansu behind a link: it advertises the link's address (a
    /// Kafka client connects to the address the broker advertises, so it
    /// would go around a link in front of the machine's broker). Clients
    /// time requests and publishes out after 3 s; a close takes at most
    /// both (bound: 8 s).
    ///
    /// Its producers are not idempotent: a librdkafka producer that loses
    /// produce requests in flight (the reset) bumps its producer epoch
    /// (KIP-360), and tansu 0.6.0 then panics in its idempotence check
    /// (`producer_select_for_update` finds no row for the new epoch,
    /// tansu-storage `lite.rs:503`) and fails every produce until it is
    /// restarted — 3 of 3 runs on 2026-12-03. Apache Kafka takes the bump.
    async fn linked(&self) -> Option<Box<dyn Linked>> {
        let port = free_port().expect("a spare port");
        let mut tansu = own_tansu(Some(port));
        tansu.boot(TANSU_BOOT).await;
        let target = ([127, 0, 0, 1], tansu.port()).into();
        let link = Link::start(port, target).await.expect("a link");
        Some(Box::new(
            Via::new(link, Duration::from_secs(8), |addr| async move {
                switchyard_kafka::connect(&format!(
                    "kafka://{addr}?request_timeout=3s&connect_timeout=2s&publish_timeout=3s\
                     &session.timeout.ms=6000&heartbeat.interval.ms=1000\
                     &enable.idempotence=false"
                ))
                .await
            })
            .keeping(tansu),
        ))
    }
}

/// How long a private tansu may take to start.
const TANSU_BOOT: Duration = Duration::from_secs(30);

/// A tansu of the test's own (sqlite storage in its own directory, removed
/// when it is dropped), for the fault cases: the Kafka-compatible broker
/// `scripts/brokers.sh` installs. Its clients are told to connect to
/// `127.0.0.1:advertised` (its own port by default). Not started.
fn own_tansu(advertised: Option<u16>) -> BrokerProcess {
    let bin = std::env::var_os("SWITCHYARD_TANSU").unwrap_or_else(|| "tansu".into());
    let port = free_port().expect("a spare port");
    let dir = std::env::temp_dir().join(format!("switchyard-tansu-{port}"));
    let _ = std::fs::remove_dir_all(&dir);
    let url = format!("tcp://127.0.0.1:{port}");
    let advertised = format!("tcp://127.0.0.1:{}", advertised.unwrap_or(port));
    let mut process = BrokerProcess::new(bin, port, &dir);
    process
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised,
        ])
        .args(["--storage-engine", "sqlite://tansu.db"])
        .scratch(true);
    process
}

async fn harness() -> Option<KafkaHarness> {
    switchyard_conformance::containers::suite_url("SWITCHYARD_KAFKA_URL", Kind::Kafka)
        .map(|url| KafkaHarness { url })
}

switchyard_conformance::conformance_tests!(harness);
/// For the cases that crash a consumer process: a crashed member holds its
/// partitions until its session times out (45 s by default), so these
/// consumers use 6 s.
async fn crash_harness() -> Option<KafkaHarness> {
    harness().await.map(|h| {
        let sep = if h.url.contains('?') { '&' } else { '?' };
        KafkaHarness {
            url: format!(
                "{}{sep}session.timeout.ms=6000&heartbeat.interval.ms=1000",
                h.url
            ),
        }
    })
}

switchyard_conformance::conformance_tests!(crash crash_harness);
/// A fault case that does not run by default (`--ignored` runs it), with
/// the reason: the ones tansu cannot yet pass.
macro_rules! manual_fault_case {
    ($case:ident, $why:literal) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[ignore = $why]
        async fn $case() {
            let Some(h) = harness().await else { return };
            switchyard_conformance::run(
                &h,
                stringify!($case),
                Box::pin(switchyard_conformance::fault::$case(&h)),
            )
            .await;
        }
    };
}

// The fault case against the private tansu above. Ignored (run it with
// `cargo test -p switchyard-kafka --test it -- --ignored fault_`): it passes
// in most runs, but tansu 0.6.0's sqlite storage panics after some restarts
// ("more or less than one row", tansu-storage `lite.rs:503`) and then fails
// every produce until it is restarted again — 3 of 8 runs on 2026-12-03.
manual_fault_case!(
    fault_broker_killed_twice,
    "tansu 0.6.0's sqlite storage panics after some restarts"
);
// The same with 3,000 messages: tansu's sqlite storage confirms about 110
// publishes a second one at a time, so 10,000 outlast the case's 90 s
// bound (9,703 confirmed, twice, on 2026-12-07). Run by hand for the fault
// cost in BENCHMARKS.md; the same storage defect can stop it.
manual_fault_case!(
    fault_broker_killed_twice_short,
    "tansu 0.6.0's sqlite storage panics after some restarts"
);

// Calls while the link is dead are bounded (a private tansu behind a link).
switchyard_conformance::conformance_tests!(@cases harness, fault;
    fault_dead_broker_calls_are_bounded,
    fault_delayed_retry_due_while_frozen,
);

// A private tansu frozen (SIGSTOP) for 10 s, then thawed. Ignored (run it
// with `cargo test -p switchyard-kafka --test it -- --ignored fault_`):
// tansu 0.6.0's group coordinator, as after a blackhole (below), expels
// the members whose sessions ran out while it was frozen and then never
// completes the rebalance. Measured on 2026-12-06 with its debug log:
// 64 JoinGroup ok, then SyncGroup answered REBALANCE_IN_PROGRESS (30) or
// UNKNOWN_MEMBER_ID (30) with 2 successes in 90 s, so 186 and 179 of 665
// confirmed messages were not delivered to the two groups (2 of 2 runs;
// the publishes themselves all went through). NATS and RabbitMQ pass it.
manual_fault_case!(
    fault_broker_frozen,
    "tansu 0.6.0's group coordinator does not complete a rebalance after a freeze"
);

// The link fault case against a private tansu behind a link. Ignored (run
// it with `cargo test -p switchyard-kafka --test it -- --ignored fault_`):
// tansu 0.6.0's group coordinator does not recover from a member that
// vanished in the blackhole. Measured on 2026-12-05 (its debug log): once
// the link heals, each of the case's consumer groups cycles every 3 s
// through JoinGroup (ok) and SyncGroup answered REBALANCE_IN_PROGRESS or
// UNKNOWN_MEMBER_ID, for the whole 90 s bound, so nothing is delivered
// after the heal — 4 of 4 runs with librdkafka reconnecting within 1 s
// (`reconnect.backoff.max.ms=1000`); with its default of 10 s the clients
// come back after tansu settled (5 of 5 passed, publishing back 16-19 s
// after the heal in 3 of them), which is timing, not a fix. Apache Kafka
// removes a member whose session timed out and completes the rebalance.
// Calls bounded while the link is dead (publish 4 s, was 14-18 s) are
// checked by fault_dead_broker_calls_are_bounded, which runs in CI.
manual_fault_case!(
    fault_link_reset_then_blackhole,
    "tansu 0.6.0's group coordinator livelocks after a blackhole (JoinGroup, then SyncGroup REBALANCE_IN_PROGRESS, every 3 s)"
);
