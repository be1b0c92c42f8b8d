//! The cluster cases: a broker cluster of the harness's own (several
//! nodes on loopback, replicated streams or queues) loses the node that
//! leads the subscription's stream, queue or partition while a client
//! publishes and consumes.

use std::{
    collections::HashSet,
    io::Write as _,
    time::{Duration, Instant},
};

use super::{FLOW_BOUND, Flow, RUNTIME};

/// A broker cluster of the harness's own
/// ([`Harness::cluster`](crate::Harness::cluster)): several nodes on
/// loopback whose streams or queues are replicated to all of them, each of
/// which the cases may kill and restart on its ports and data.
#[async_trait::async_trait]
pub trait Cluster: Send + Sync {
    /// A new client given the address of every node.
    ///
    /// # Errors
    ///
    /// When no node can be reached.
    async fn client(&self) -> switchyard_core::Result<switchyard_core::Client>;

    /// The index of the node that leads what subscription `subscription` of
    /// `topic` reads (the stream's leader on NATS, the quorum queue's
    /// leader on RabbitMQ, the partition leader or group coordinator on
    /// Kafka), asked of the cluster itself.
    async fn leader(&self, topic: &str, subscription: &str) -> usize;

    /// Kills node `node` with `SIGKILL` (a crash: nothing flushed).
    fn kill(&mut self, node: usize);

    /// Starts node `node` again on its ports and data; returns once it
    /// accepts connections.
    async fn restart(&mut self, node: usize);
}

/// Cluster case: the flow of [`fault_broker_killed_twice`](super::fault_broker_killed_twice)
/// (10,000 messages at a steady rate, a `Consumer` and a raw
/// `Subscription`) on a cluster whose node leading the subscription is
/// killed (`SIGKILL`) a third of the way through. Publishing and both
/// subscriptions go on on the surviving nodes, by themselves; the killed
/// node is restarted two thirds of the way through and rejoins. Every
/// confirmed message arrives; the seconds without a confirmed publish and
/// without a delivery after the kill are printed.
///
/// # Panics
///
/// When a confirmed message is lost, or publishing does not go on without
/// the killed node within the flow's bound.
pub async fn cluster_leader_killed(h: &dyn crate::Harness) -> crate::Outcome {
    const MESSAGES: usize = 10_000;

    let Some(mut cluster) = h.cluster().await else {
        return crate::Outcome::Skipped("the harness has no cluster".into());
    };
    let client = cluster.client().await.expect("connect to the cluster");
    let topic = h.unique("cluster-kill");
    let flow = Flow::steady(&client, &topic, MESSAGES).await;

    flow.wait_confirmed(MESSAGES / 3).await;
    let leader = cluster.leader(&topic, RUNTIME).await;
    cluster.kill(leader);
    let killed = Instant::now();
    // Publishing goes on without the node.
    flow.wait_confirmed(MESSAGES * 2 / 3).await;
    let without = killed.elapsed();
    cluster.restart(leader).await;
    let back = Instant::now();

    let end = flow.finish(&[killed, back]).await;
    end.report("cluster_leader_killed", "the leader's kill and its restart");
    let (publishing, delivering) = end.longest_gaps_after(killed);
    let _ = writeln!(
        std::io::stderr(),
        "cluster_leader_killed: node {leader} killed; unavailable after the kill: \
         {:.1} s without a confirmed publish, {:.1} s without a delivery; \
         {:.1} s on the surviving nodes before the restart",
        publishing.as_secs_f64(),
        delivering.as_secs_f64(),
        without.as_secs_f64(),
    );
    end.assert_nothing_lost("the kill of the leader");
    let _ = client.close().await;
    crate::Outcome::Passed
}

/// Cluster case: 500 messages confirmed by the cluster, then the node
/// leading their subscription is killed (`SIGKILL`) at once, before any of
/// them is consumed. A new client reads every one of them from the
/// surviving nodes, with the killed node still down: a confirm means a
/// majority holds the message, not the node that answered.
///
/// # Panics
///
/// When a confirmed message is missing from the surviving nodes.
pub async fn cluster_confirmed_survive_node_loss(h: &dyn crate::Harness) -> crate::Outcome {
    use switchyard_core::{Message, SubscribeOptions};
    const MESSAGES: usize = 500;

    let Some(mut cluster) = h.cluster().await else {
        return crate::Outcome::Skipped("the harness has no cluster".into());
    };
    let client = cluster.client().await.expect("connect to the cluster");
    let topic = h.unique("cluster-confirm");
    let subscription = "survivor";
    client
        .ensure_subscription(&topic, &SubscribeOptions::new(subscription))
        .await
        .expect("declare the subscription");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let ids: Vec<String> = (0..MESSAGES).map(|i| format!("c{i:04}")).collect();
    for id in &ids {
        tokio::time::timeout(
            FLOW_BOUND,
            client.publish(&topic, Message::new("x").with_id(id)),
        )
        .await
        .unwrap_or_else(|_| panic!("publishing {id} timed out"))
        .unwrap_or_else(|e| panic!("publishing {id}: {e}"));
    }
    let leader = cluster.leader(&topic, subscription).await;
    cluster.kill(leader);
    let killed = Instant::now();
    drop(client);

    let survivor = cluster
        .client()
        .await
        .expect("connect to the surviving nodes");
    let mut sub = loop {
        match survivor
            .subscribe(&topic, SubscribeOptions::new(subscription))
            .await
        {
            Ok(sub) => break sub,
            Err(e) if e.is_retryable() && killed.elapsed() < FLOW_BOUND => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("subscribing on the surviving nodes: {e}"),
        }
    };
    let mut missing: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut first = None;
    while !missing.is_empty() && killed.elapsed() < FLOW_BOUND {
        match tokio::time::timeout(Duration::from_secs(5), sub.recv()).await {
            Ok(Ok(d)) => {
                first.get_or_insert_with(|| killed.elapsed());
                missing.remove(d.message().id());
                let _ = d.ack().await;
            }
            Ok(Err(e)) if e.is_retryable() => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(e)) => panic!("receiving on the surviving nodes: {e}"),
            Err(_) => {}
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "cluster_confirmed_survive_node_loss: node {leader} killed after {MESSAGES} confirms; \
         {} missing on the survivors; first delivery {:.1?} s after the kill, all in {:.1} s",
        missing.len(),
        first.map(|d| d.as_secs_f64()),
        killed.elapsed().as_secs_f64(),
    );
    let mut missing: Vec<&str> = missing.into_iter().collect();
    missing.sort_unstable();
    assert!(
        missing.is_empty(),
        "{} of {MESSAGES} confirmed messages are not on the surviving nodes, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let _ = sub.close().await;
    let _ = survivor.close().await;
    crate::Outcome::Passed
}
