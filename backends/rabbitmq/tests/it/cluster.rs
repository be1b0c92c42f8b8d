//! A three-node RabbitMQ cluster of the test's own on loopback (distinct
//! node names, AMQP and distribution ports, data directories; joined with
//! `rabbitmqctl join_cluster`), whose quorum queues have a member on each
//! node, for the cluster cases.

use switchyard_conformance::fault::Cluster;
use switchyard_core::{Client, Result};

use crate::node::Node;

const NODES: usize = 3;

pub(crate) struct RabbitCluster {
    nodes: Vec<Node>,
}

impl RabbitCluster {
    /// Boots three nodes and joins the second and third to the first;
    /// `None` when RabbitMQ is not installed (a failure when
    /// `SWITCHYARD_REQUIRE_BROKERS` is set).
    pub(crate) async fn start() -> Option<Self> {
        let mut nodes = Vec::new();
        for _ in 0..NODES {
            nodes.push(Node::create("sy-cluster")?);
        }
        futures_util::future::join_all(nodes.iter_mut().map(Node::boot)).await;
        let first = nodes[0].name().to_owned();
        for node in &nodes[1..] {
            let _ = node.ctl(&["stop_app"]);
            let _ = node.ctl(&["join_cluster", &first]);
            let _ = node.ctl(&["start_app"]);
        }
        let status = nodes[0].ctl(&["cluster_status", "--formatter", "json"]);
        for node in &nodes {
            assert!(
                status.contains(node.name()),
                "{} is not in the cluster: {status}",
                node.name()
            );
        }
        Some(Self { nodes })
    }

    /// Every node's address, in node order.
    fn url(&self) -> String {
        format!(
            "amqp://guest:guest@{}/%2f?connect_timeout=5s&request_timeout=5s",
            self.nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port()))
                .collect::<Vec<_>>()
                .join(",")
        )
    }
}

#[async_trait::async_trait]
impl Cluster for RabbitCluster {
    async fn client(&self) -> Result<Client> {
        switchyard_rabbitmq::connect(&super::with_expiry(&self.url())).await
    }

    /// The quorum queue's leader, as `rabbitmqctl list_queues` names it on
    /// a node that is up.
    async fn leader(&self, topic: &str, subscription: &str) -> usize {
        let broker = switchyard_rabbitmq::RabbitBroker::connect(
            switchyard_rabbitmq::RabbitConfig::from_url(&self.url()).expect("the URL"),
        )
        .await
        .expect("connect to the cluster");
        let queue = broker.queue_name(topic, subscription);
        let _ = switchyard_core::driver::Publisher::close(&broker).await;
        let listing = self.nodes[0].ctl(&["list_queues", "name", "leader", "--quiet"]);
        let leader = listing
            .lines()
            .find_map(|l| {
                let mut fields = l.split('\t');
                let (name, leader) = (fields.next()?, fields.next()?);
                (name == queue).then(|| leader.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("no queue {queue:?} in: {listing}"));
        self.nodes
            .iter()
            .position(|n| n.name() == leader)
            .unwrap_or_else(|| panic!("the leader {leader:?} is not a node of the cluster"))
    }

    fn kill(&mut self, node: usize) {
        self.nodes[node].kill();
    }

    async fn restart(&mut self, node: usize) {
        self.nodes[node].restart().await;
    }
}
