//! A three-node NATS JetStream cluster of the test's own on loopback
//! (routes between the nodes, JetStream with its own store on each),
//! streams with three replicas, for the cluster cases.

use std::time::{Duration, Instant};

use switchyard_conformance::fault::{BrokerProcess, Cluster, free_port};
use switchyard_core::{Client, Result};

const NODES: usize = 3;
/// How long the cluster may take to elect its JetStream meta leader.
const FORMED: Duration = Duration::from_secs(60);

pub(crate) struct NatsCluster {
    nodes: Vec<BrokerProcess>,
    /// Every node's client address, in node order.
    url: String,
}

impl NatsCluster {
    /// Starts three nodes that route to each other and waits until
    /// JetStream answers on the cluster.
    pub(crate) async fn start() -> Self {
        let ports: Vec<(u16, u16)> = (0..NODES)
            .map(|_| {
                (
                    free_port().expect("a spare port"),
                    free_port().expect("a spare port"),
                )
            })
            .collect();
        let name = format!("sy-{}", ports[0].0);
        let mut nodes = Vec::new();
        for (i, (port, route)) in ports.iter().enumerate() {
            let dir = std::env::temp_dir().join(format!("switchyard-nats-cluster-{port}"));
            let _ = std::fs::remove_dir_all(&dir);
            let routes = ports
                .iter()
                .filter(|(p, _)| p != port)
                .map(|(_, r)| format!("nats://127.0.0.1:{r}"))
                .collect::<Vec<_>>()
                .join(",");
            let mut process = super::OwnNats::process(*port, &dir, &[]);
            process
                .args(["--name", &node_name(i)])
                .args(["--cluster_name", &name])
                .args(["--cluster", &format!("nats://127.0.0.1:{route}")])
                .args(["--routes", &routes]);
            nodes.push(process);
        }
        for node in &mut nodes {
            node.start(Duration::from_secs(20))
                .await
                .unwrap_or_else(|e| panic!("a node of the NATS cluster: {e}"));
        }
        let url = format!(
            "nats://{}?replicas={NODES}&connect_timeout=2s&request_timeout=5s",
            ports
                .iter()
                .map(|(p, _)| format!("127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let cluster = Self { nodes, url };
        cluster.formed().await;
        cluster
    }

    /// Waits until the cluster can create a stream with three replicas
    /// (a meta leader is elected and every node is a JetStream peer).
    async fn formed(&self) {
        let started = Instant::now();
        loop {
            let answer = match self.broker().await {
                Ok(broker) => {
                    let js = broker.jetstream();
                    let ok = js
                        .create_stream(async_nats::jetstream::stream::Config {
                            name: "sy-formed".into(),
                            subjects: vec!["sy-formed".into()],
                            num_replicas: NODES,
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| e.to_string());
                    let _ = js.delete_stream("sy-formed").await;
                    let _ = switchyard_core::driver::Publisher::close(&broker).await;
                    ok.map(drop)
                }
                Err(e) => Err(e.to_string()),
            };
            match answer {
                Ok(()) => return,
                Err(e) => assert!(
                    started.elapsed() < FORMED,
                    "the NATS cluster did not form within {FORMED:?}: {e}; logs: {}",
                    self.nodes
                        .iter()
                        .map(BrokerProcess::log_tail)
                        .collect::<Vec<_>>()
                        .join("\n---\n")
                ),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn broker(&self) -> Result<switchyard_nats::NatsBroker> {
        switchyard_nats::NatsBroker::connect(switchyard_nats::NatsConfig::from_url(&self.url)?)
            .await
    }
}

fn node_name(i: usize) -> String {
    format!("sy-node-{i}")
}

#[async_trait::async_trait]
impl Cluster for NatsCluster {
    async fn client(&self) -> Result<Client> {
        switchyard_nats::connect(&self.url).await
    }

    /// The stream's RAFT leader, as the stream info names it.
    async fn leader(&self, topic: &str, _subscription: &str) -> usize {
        let broker = self.broker().await.expect("connect to the cluster");
        let stream = broker
            .jetstream()
            .get_stream(broker.stream_name(topic))
            .await
            .expect("the topic's stream");
        let leader = stream
            .cached_info()
            .cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .expect("a clustered stream names its leader");
        let _ = switchyard_core::driver::Publisher::close(&broker).await;
        (0..NODES)
            .find(|i| node_name(*i) == leader)
            .unwrap_or_else(|| panic!("the leader {leader:?} is not a node of the cluster"))
    }

    fn kill(&mut self, node: usize) {
        self.nodes[node].kill();
    }

    async fn restart(&mut self, node: usize) {
        self.nodes[node]
            .start(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("restarting node {node} of the NATS cluster: {e}"));
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
            if !std::thread::panicking() {
                let _ = std::fs::remove_dir_all(node.dir());
            }
        }
    }
}
