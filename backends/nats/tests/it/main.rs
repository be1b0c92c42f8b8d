//! The conformance suite against a real nats-server (`SWITCHYARD_NATS_URL`),
//! plus NATS-specific fault and mapping tests.

use std::time::Duration;

use switchyard_conformance::{
    Harness, Timing,
    containers::{Connect, Contained, Kind},
    fault::{BrokerProcess, Linked, PrivateBroker, ProcessBroker, Revocable, Via, free_port},
};
use switchyard_core::{Client, Result};

mod cluster;
mod specific;

#[derive(Debug)]
struct NatsHarness {
    url: String,
}

#[async_trait::async_trait]
impl Harness for NatsHarness {
    async fn client(&self) -> Result<Client> {
        switchyard_nats::connect(&self.url).await
    }

    async fn connect(&self, url: &str) -> Result<Client> {
        switchyard_nats::connect(url).await
    }

    fn url_at(&self, addr: std::net::SocketAddr, connect_timeout: Duration) -> Option<String> {
        let ms = connect_timeout.as_millis();
        Some(format!("nats://{addr}?connect_timeout={ms}ms"))
    }

    fn timing(&self) -> Timing {
        Timing::LOOPBACK
    }

    /// A container of its own with `SWITCHYARD_CONTAINERS=1`, else a
    /// process.
    async fn private_broker(&self) -> Option<Box<dyn PrivateBroker>> {
        let connect = || -> Connect {
            Box::new(|url| Box::pin(async move { switchyard_nats::connect(&url).await }))
        };
        if let Some(contained) = Contained::start_if_enabled(Kind::Nats, connect()).await {
            return Some(Box::new(contained));
        }
        let process = OwnNats::fresh(&[]);
        let url = Kind::Nats.url(process.port());
        Some(Box::new(
            ProcessBroker::start(process, BOOT, url, connect()).await,
        ))
    }

    /// Three private servers forming a JetStream cluster; streams with
    /// three replicas.
    async fn cluster(&self) -> Option<Box<dyn switchyard_conformance::fault::Cluster>> {
        Some(Box::new(cluster::NatsCluster::start().await))
    }

    /// A private server with a user and password; revoking restarts it
    /// with another password (as an operator rotating it does).
    async fn revocable(&self) -> Option<Box<dyn Revocable>> {
        Some(Box::new(OwnNats::with_password("first").await))
    }

    /// Deletes the subscription's durable consumer through the JetStream
    /// API (as `nats consumer rm` does).
    async fn delete_subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> std::result::Result<(), String> {
        let config = switchyard_nats::NatsConfig::from_url(&self.url).expect("the URL");
        let broker = switchyard_nats::NatsBroker::connect(config)
            .await
            .expect("connect");
        broker
            .jetstream()
            .delete_consumer_from_stream(
                broker.consumer_name(subscription),
                broker.stream_name(topic),
            )
            .await
            .expect("deleting the consumer");
        let _ = switchyard_core::driver::Publisher::close(&broker).await;
        Ok(())
    }

    /// The machine's server behind a link; clients time requests out after
    /// 3 s (bound: 5 s).
    async fn linked(&self) -> Option<Box<dyn Linked>> {
        let server = self
            .url
            .trim_start_matches("nats://")
            .split(['/', '?', ','])
            .next()
            .and_then(|s| s.rsplit('@').next())
            .expect("a server in SWITCHYARD_NATS_URL");
        let linked = Via::to(server, Duration::from_secs(5), |addr| async move {
            switchyard_nats::connect(&format!(
                "nats://{addr}?request_timeout=3s&connect_timeout=2s"
            ))
            .await
        })
        .await
        .expect("a link in front of the NATS server");
        Some(Box::new(linked))
    }
}

/// How long a private nats-server may take to start.
const BOOT: Duration = Duration::from_secs(20);

/// A nats-server of the test's own (JetStream, file storage in its own
/// directory), for the credential case.
struct OwnNats {
    process: BrokerProcess,
}

impl OwnNats {
    /// One that accepts the user `app` with `password` only.
    async fn with_password(password: &str) -> Self {
        let mut process = Self::fresh(&["--user", "app", "--pass", password]);
        process.boot(BOOT).await;
        Self { process }
    }

    /// On a spare port with a fresh store, with `extra` arguments; not
    /// started.
    fn fresh(extra: &[&str]) -> BrokerProcess {
        let port = free_port().expect("a spare port");
        let dir = std::env::temp_dir().join(format!("switchyard-nats-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        let mut process = Self::process(port, &dir, extra);
        process.scratch(true);
        process
    }

    /// The server on `port` with its store in `dir`, not started.
    fn process(port: u16, dir: &std::path::Path, extra: &[&str]) -> BrokerProcess {
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nats-server");
        let mut process = BrokerProcess::new(bin, port, dir);
        process
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.join("store"))
            .args(extra);
        process
    }
}

#[async_trait::async_trait]
impl Revocable for OwnNats {
    async fn client(&self) -> Result<Client> {
        switchyard_nats::connect(&format!(
            "nats://app:first@127.0.0.1:{}?request_timeout=2s",
            self.process.port()
        ))
        .await
    }

    /// Restarts the server on the same port and store with another
    /// password.
    async fn revoke(&mut self) {
        self.process.kill();
        let (port, dir) = (self.process.port(), self.process.dir().to_owned());
        // The store stays for the new process.
        self.process.scratch(false);
        self.process = Self::process(port, &dir, &["--user", "app", "--pass", "second"]);
        self.process.scratch(true).boot(BOOT).await;
    }
}

async fn harness() -> Option<NatsHarness> {
    switchyard_conformance::containers::suite_url("SWITCHYARD_NATS_URL", Kind::Nats)
        .map(|url| NatsHarness { url })
}

switchyard_conformance::conformance_tests!(harness);
switchyard_conformance::conformance_tests!(crash harness);
switchyard_conformance::conformance_tests!(faults harness);
switchyard_conformance::conformance_tests!(cluster harness);
