//! The conformance suite against a real RabbitMQ (`SWITCHYARD_RABBITMQ_URL`),
//! plus RabbitMQ-specific fault and mapping tests.

use std::time::Duration;

use switchyard_conformance::{
    Harness, Timing,
    containers::{Connect, Contained, Kind},
    fault::{Linked, PrivateBroker, ProcessBroker, Revocable, Via},
};
use switchyard_core::{Client, Result};

mod cluster;
mod node;
mod specific;

#[derive(Debug)]
struct RabbitHarness {
    url: String,
}

#[async_trait::async_trait]
impl Harness for RabbitHarness {
    async fn client(&self) -> Result<Client> {
        switchyard_rabbitmq::connect(&self.url).await
    }

    async fn connect(&self, url: &str) -> Result<Client> {
        switchyard_rabbitmq::connect(url).await
    }

    fn url_at(&self, addr: std::net::SocketAddr, connect_timeout: Duration) -> Option<String> {
        let ms = connect_timeout.as_millis();
        Some(format!(
            "amqp://guest:guest@{addr}/%2f?connect_timeout={ms}ms"
        ))
    }

    fn timing(&self) -> Timing {
        Timing::LOOPBACK
    }

    /// `queue.delete` of the subscription's queue, through a plain AMQP
    /// connection (as `rabbitmqctl delete_queue` or an operator's script).
    async fn delete_subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> std::result::Result<(), String> {
        use switchyard_rabbitmq::lapin::{
            Connection, ConnectionProperties, options::QueueDeleteOptions,
        };
        let broker = switchyard_rabbitmq::RabbitBroker::connect(
            switchyard_rabbitmq::RabbitConfig::from_url(&self.url).expect("the URL"),
        )
        .await
        .expect("connect");
        let queue = broker.queue_name(topic, subscription);
        let conn = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .expect("a plain AMQP connection");
        let channel = conn.create_channel().await.expect("a channel");
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("queue.delete");
        let _ = conn.close(200, "deleted".into()).await;
        let _ = switchyard_core::driver::Publisher::close(&broker).await;
        Ok(())
    }

    /// A container of its own with `SWITCHYARD_CONTAINERS=1`, else a node
    /// process.
    async fn private_broker(&self) -> Option<Box<dyn PrivateBroker>> {
        let connect = || -> Connect {
            Box::new(|url| {
                Box::pin(async move {
                    let url = with_expiry(&format!("{url}?connect_timeout=5s"));
                    switchyard_rabbitmq::connect(&url).await
                })
            })
        };
        if let Some(contained) = Contained::start_if_enabled(Kind::RabbitMq, connect()).await {
            return Some(Box::new(contained));
        }
        let process = node::Node::create("sy-fault")?.into_process();
        let url = Kind::RabbitMq.url(process.port());
        Some(Box::new(
            ProcessBroker::start(process, node::BOOT, url, connect()).await,
        ))
    }

    /// Three node processes joined in a cluster; quorum queues with a
    /// member on each.
    async fn cluster(&self) -> Option<Box<dyn switchyard_conformance::fault::Cluster>> {
        Some(Box::new(cluster::RabbitCluster::start().await?))
    }

    async fn revocable(&self) -> Option<Box<dyn Revocable>> {
        Some(Box::new(node::Node::start().await?))
    }

    /// The machine's broker behind a link; clients time requests out after
    /// 3 s (bound: 5 s).
    async fn linked(&self) -> Option<Box<dyn Linked>> {
        let url = url::Url::parse(&self.url).expect("SWITCHYARD_RABBITMQ_URL");
        let server = format!(
            "{}:{}",
            url.host_str().expect("a host"),
            url.port().unwrap_or(5672)
        );
        let linked = Via::to(&server, Duration::from_secs(5), move |addr| {
            let mut url = url.clone();
            async move {
                url.set_port(Some(addr.port())).expect("a port");
                let sep = if url.query().is_some() { '&' } else { '?' };
                switchyard_rabbitmq::connect(&format!(
                    "{url}{sep}request_timeout=3s&connect_timeout=2s"
                ))
                .await
            }
        })
        .await
        .expect("a link in front of RabbitMQ");
        Some(Box::new(linked))
    }
}

/// Test queues go away two minutes after their last use (`x-expires`; no
/// case leaves a queue unused that long): a quorum queue is a Raft group
/// holding open files on the broker, every run makes a few hundred, and a
/// broker at its file-descriptor limit (927 with systemd's default 1024)
/// stops accepting connections — as three runs within ten minutes did with
/// a ten-minute expiry.
fn with_expiry(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}queue_expires=2m")
}

async fn harness() -> Option<RabbitHarness> {
    switchyard_conformance::containers::suite_url("SWITCHYARD_RABBITMQ_URL", Kind::RabbitMq).map(
        |url| RabbitHarness {
            url: with_expiry(&url),
        },
    )
}

switchyard_conformance::conformance_tests!(harness);
switchyard_conformance::conformance_tests!(crash harness);
switchyard_conformance::conformance_tests!(faults harness);
switchyard_conformance::conformance_tests!(cluster harness);
