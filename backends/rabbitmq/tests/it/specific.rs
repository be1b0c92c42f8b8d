//! RabbitMQ-specific behaviour: bad input, faults, mapping.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use switchyard_core::{Client, Error, Message, Retry, SubscribeOptions};
use switchyard_rabbitmq::{RabbitBroker, RabbitConfig};
use tokio::{net::TcpListener, task::JoinHandle};

fn url() -> Option<String> {
    switchyard_conformance::containers::suite_url(
        "SWITCHYARD_RABBITMQ_URL",
        switchyard_conformance::containers::Kind::RabbitMq,
    )
    .map(|u| super::with_expiry(&u))
}

fn unique(prefix: &str) -> String {
    format!("{prefix}.{}", &switchyard_core::new_id()[24..])
}

async fn recv(sub: &mut switchyard_core::Subscription, what: &str) -> switchyard_core::Delivery {
    tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .unwrap_or_else(|_| panic!("no {what} within 10 s"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

#[tokio::test]
async fn wrong_credentials_are_an_authentication_error_not_a_hang() {
    let Some(url) = url() else { return };
    let mut bad = url::Url::parse(&url).unwrap();
    bad.set_username("switchyard-nobody").unwrap();
    bad.set_password(Some("wrong-secret")).unwrap();
    let start = Instant::now();
    let err = switchyard_rabbitmq::connect(bad.as_str())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Authentication { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert!(!err.to_string().contains("wrong-secret"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn reserved_and_long_names_map_to_distinct_queues() {
    let Some(url) = url() else { return };
    let broker = RabbitBroker::connect(RabbitConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    let client = Client::new(broker.clone());
    let run = &switchyard_core::new_id()[24..];
    // `amq.` is reserved for exchanges and queues, not for topics.
    let reserved = format!("amq.{run}");
    let long_a = format!("{run}.{}", "a".repeat(180));
    let long_b = format!("{run}.{}", "a".repeat(179) + "b");
    let sub = "s".repeat(200);
    assert_ne!(
        broker.queue_name(&long_a, &sub),
        broker.queue_name(&long_b, &sub)
    );
    for topic in [&reserved, &long_a, &long_b] {
        let opts = SubscribeOptions::new(sub.clone());
        client.ensure_subscription(topic, &opts).await.unwrap();
        client
            .publish(topic, Message::new(topic.clone()).with_id(topic.clone()))
            .await
            .unwrap();
    }
    for topic in [&reserved, &long_a, &long_b] {
        let mut s = client
            .subscribe(topic, SubscribeOptions::new(sub.clone()))
            .await
            .unwrap();
        let d = recv(&mut s, "message on a mapped name").await;
        assert_eq!(d.message().id(), topic.as_str(), "isolation between names");
        d.ack().await.unwrap();
        s.close().await.unwrap();
    }
    client.close().await.unwrap();
}

#[tokio::test]
async fn configured_limit_is_enforced_before_sending() {
    let Some(url) = url() else { return };
    let broker = RabbitBroker::connect(
        RabbitConfig::from_url(&url)
            .unwrap()
            .with_max_message_size(200 * 1024),
    )
    .await
    .unwrap();
    let client = Client::new(broker);
    let limit = client.capabilities().max_payload;
    assert!(limit > 100 * 1024 && limit < 200 * 1024, "{limit}");
    let topic = unique("sy-test.limit");
    let opts = SubscribeOptions::new("s");
    client.ensure_subscription(&topic, &opts).await.unwrap();
    client
        .publish(&topic, Message::new(vec![7u8; limit]))
        .await
        .expect("exactly the limit fits");
    let err = client
        .publish(&topic, Message::new(vec![7u8; limit + 1]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::PayloadTooLarge { size, limit: l } if size == limit + 1 && l == limit),
        "{err:?}"
    );
    let mut sub = client.subscribe(&topic, opts).await.unwrap();
    let d = recv(&mut sub, "the message at the limit").await;
    assert_eq!(d.message().payload().len(), limit);
    d.ack().await.unwrap();
    client.close().await.unwrap();
}

/// A TCP proxy in front of the broker whose connections can be cut, to
/// lose the connection without touching the broker.
struct Proxy {
    port: u16,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let l = Arc::clone(&links);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                l.lock().unwrap().push(link);
            }
        });
        Self {
            port,
            links,
            accept,
        }
    }

    /// Drops every open connection (both sides see it closed).
    fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_recovers_without_losing_confirmed_messages() {
    let Some(url) = url() else { return };
    let parsed = url::Url::parse(&url).unwrap();
    let target = format!(
        "{}:{}",
        parsed.host_str().unwrap(),
        parsed.port().unwrap_or(5672)
    );
    let proxy = Proxy::start(target).await;
    let mut via = parsed.clone();
    via.set_port(Some(proxy.port)).unwrap();
    let client = switchyard_rabbitmq::connect(via.as_str()).await.unwrap();
    let topic = unique("sy-test.reconnect");
    let opts = SubscribeOptions::new("s").with_prefetch(20);
    client.ensure_subscription(&topic, &opts).await.unwrap();

    let mut confirmed = HashSet::new();
    let first: Vec<Message> = (0..100)
        .map(|i| Message::new("x").with_id(format!("a{i}")))
        .collect();
    for (m, r) in first
        .iter()
        .zip(client.publish_batch(&topic, first.clone()).await)
    {
        r.unwrap();
        confirmed.insert(m.id().to_owned());
    }
    let mut sub = client.subscribe(&topic, opts).await.unwrap();
    let mut seen = HashSet::new();
    for _ in 0..30 {
        let d = recv(&mut sub, "delivery before the cut").await;
        seen.insert(d.message().id().to_owned());
        d.ack().await.unwrap();
    }

    proxy.cut();

    // Publishing goes on: a failed publish is retryable, and a retry after
    // the reconnect is confirmed.
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..100 {
        let id = format!("b{i}");
        loop {
            match client
                .publish(&topic, Message::new("y").with_id(id.clone()))
                .await
            {
                Ok(()) => {
                    confirmed.insert(id);
                    break;
                }
                Err(e) => {
                    assert!(e.is_retryable(), "{e:?}");
                    assert!(Instant::now() < deadline, "publishing did not recover: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    // Consuming resumes by itself; unacked deliveries come back.
    while !confirmed.is_subset(&seen) {
        assert!(
            Instant::now() < deadline,
            "{} confirmed messages never arrived after the reconnect",
            confirmed.difference(&seen).count()
        );
        match tokio::time::timeout(Duration::from_secs(5), sub.recv()).await {
            Ok(Ok(d)) => {
                seen.insert(d.message().id().to_owned());
                // An ack of a delivery from the lost channel fails; the
                // broker redelivers it.
                let _ = d.ack().await;
            }
            Ok(Err(e)) => assert!(e.is_retryable(), "{e:?}"),
            Err(_) => {}
        }
    }
    client.close().await.unwrap();
}

#[tokio::test]
async fn delayed_nacks_of_different_delays_each_wait_their_own_time() {
    let Some(url) = url() else { return };
    let client = switchyard_rabbitmq::connect(&url).await.unwrap();
    let topic = unique("sy-test.delays");
    let opts = SubscribeOptions::new("s");
    client.ensure_subscription(&topic, &opts).await.unwrap();
    for id in ["long", "short"] {
        client
            .publish(&topic, Message::new(id).with_id(id))
            .await
            .unwrap();
    }
    let mut sub = client.subscribe(&topic, opts).await.unwrap();
    let start = Instant::now();
    for _ in 0..2 {
        let d = recv(&mut sub, "first delivery").await;
        let delay = if d.message().id() == "long" {
            1500
        } else {
            300
        };
        d.nack(Retry::after(Duration::from_millis(delay)))
            .await
            .unwrap();
    }
    // The shorter delay is not held up behind the longer one.
    let first = recv(&mut sub, "the shorter delay").await;
    assert_eq!(first.message().id(), "short");
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    first.ack().await.unwrap();
    let second = recv(&mut sub, "the longer delay").await;
    assert_eq!(second.message().id(), "long");
    assert!(start.elapsed() >= Duration::from_millis(1500));
    assert_eq!(second.attempt(), 2);
    second.ack().await.unwrap();
    client.close().await.unwrap();
}

#[tokio::test]
async fn out_of_order_acks_and_nacks_coalesce_without_redelivery() {
    let Some(url) = url() else { return };
    let client = switchyard_rabbitmq::connect(&url).await.unwrap();
    let topic = unique("sy-test.coalesce");
    let opts = SubscribeOptions::new("s").with_prefetch(16);
    client.ensure_subscription(&topic, &opts).await.unwrap();
    let msgs: Vec<Message> = (0..96)
        .map(|i| Message::new("x").with_id(format!("m{i}")))
        .collect();
    for r in client.publish_batch(&topic, msgs).await {
        r.unwrap();
    }
    let mut sub = client.subscribe(&topic, opts).await.unwrap();
    let mut acked = HashSet::new();
    let mut nacked = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.len() < 96 {
        assert!(Instant::now() < deadline, "only {} acked", acked.len());
        // Hold a batch, then settle it backwards: acks above unsettled
        // deliveries, nacks in between.
        let mut held = Vec::new();
        while held.len() < 6 && acked.len() + held.len() < 96 {
            held.push(recv(&mut sub, "a delivery").await);
        }
        for d in held.into_iter().rev() {
            let id = d.message().id().to_owned();
            if d.attempt() > 1 {
                assert!(nacked.contains(&id), "{id} redelivered without a nack");
            }
            if d.attempt() == 1 && id.trim_start_matches('m').parse::<u32>().unwrap() % 7 == 0 {
                nacked.insert(id);
                d.nack(Retry::now()).await.unwrap();
            } else {
                assert!(acked.insert(id.clone()), "{id} acked twice");
                d.ack().await.unwrap();
            }
        }
    }
    // Nothing comes back once every ack reached the broker.
    sub.close().await.unwrap();
    let mut again = client
        .subscribe(&topic, SubscribeOptions::new("s"))
        .await
        .unwrap();
    if let Ok(d) = tokio::time::timeout(Duration::from_secs(2), again.recv()).await {
        panic!(
            "{:?} delivered again after every message was acked",
            d.map(|d| d.message().id().to_owned())
        );
    }
    client.close().await.unwrap();
}

/// Delayed nacks wait in a queue of the broker's; a broker crash while they
/// wait, and their delay running out while it is down, loses none of them.
/// (RabbitMQ dead-letters out of a classic queue at most once: when the
/// TTL fires at recovery before the target queue is up, the copy is
/// dropped — 1,000 of 1,000 here.)
#[tokio::test]
async fn delayed_nacks_survive_a_broker_kill() {
    const N: usize = 1000;
    const DELAY: Duration = Duration::from_secs(14);
    // RabbitMQ 3.10 registers a new quorum queue's name with a write cache
    // of about 3 s (Ra's `names.dets`): a node killed within that window
    // comes back with the queue empty — any new quorum queue, not only a
    // wait queue (measured: 1,000 of 1,000 lost when killed 1.5 s after
    // the first nack, none at 5 s and 15 s). The crash comes later, with
    // room for a loaded machine.
    const SETTLED: Duration = Duration::from_secs(6);
    let Some(mut node) = super::node::Node::start().await else {
        return;
    };
    let url = super::with_expiry(&node.url());
    let topic = unique("sy-test.delay-kill");
    let opts = SubscribeOptions::new("s").with_prefetch(100);
    let client = switchyard_rabbitmq::connect(&url).await.unwrap();
    client.ensure_subscription(&topic, &opts).await.unwrap();
    let msgs: Vec<Message> = (0..N)
        .map(|i| Message::new("x").with_id(format!("m{i}")))
        .collect();
    for r in client.publish_batch(&topic, msgs).await {
        r.unwrap();
    }
    let mut sub = client.subscribe(&topic, opts.clone()).await.unwrap();
    let mut nacks = tokio::task::JoinSet::new();
    let mut first_nack = None;
    for _ in 0..N {
        let d = recv(&mut sub, "a first delivery").await;
        assert_eq!(d.attempt(), 1);
        while nacks.len() >= 100 {
            nacks.join_next().await.unwrap().unwrap();
        }
        first_nack.get_or_insert_with(Instant::now);
        nacks.spawn(async move { d.nack(Retry::after(DELAY)).await.unwrap() });
    }
    while let Some(r) = nacks.join_next().await {
        r.unwrap();
    }
    let start = first_nack.unwrap();
    sub.close().await.unwrap();
    client.close().await.unwrap();
    tokio::time::sleep(SETTLED.saturating_sub(start.elapsed())).await;
    assert!(
        start.elapsed() + Duration::from_secs(2) < DELAY,
        "nacking took {:?}: the first delays ran out before the crash",
        start.elapsed()
    );

    node.kill();
    // Every delay runs out while the broker is down.
    tokio::time::sleep(DELAY.saturating_sub(start.elapsed()) + Duration::from_secs(1)).await;
    node.restart().await;

    let client = switchyard_rabbitmq::connect(&url).await.unwrap();
    let mut sub = client.subscribe(&topic, opts).await.unwrap();
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < N {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(d) = tokio::time::timeout(left, sub.recv()).await else {
            panic!("{} of {N} delayed nacks lost in the crash", N - seen.len());
        };
        let d = d.unwrap();
        assert_eq!(d.attempt(), 2, "{}", d.message().id());
        seen.insert(d.message().id().to_owned());
        d.ack().await.unwrap();
    }
    client.close().await.unwrap();
}

/// A message nacked with a delay again and again keeps coming back for
/// longer than a wait queue's lease: RabbitMQ 3.10 deletes a quorum queue
/// its `x-expires` after it was declared however busy it is (publishes and
/// redeclaration do not renew it), taking the waiting copy with it.
#[tokio::test]
async fn delayed_nacks_keep_coming_back_past_a_wait_queue_lease() {
    let Some(url) = switchyard_conformance::containers::suite_url(
        "SWITCHYARD_RABBITMQ_URL",
        switchyard_conformance::containers::Kind::RabbitMq,
    ) else {
        return;
    };
    // Leases of 3 s: a wait queue expires 3 × 2 + 1 s after its
    // declaration.
    let sep = if url.contains('?') { '&' } else { '?' };
    let client = switchyard_rabbitmq::connect(&format!("{url}{sep}queue_expires=3s"))
        .await
        .unwrap();
    let topic = unique("sy-test.lease");
    let opts = SubscribeOptions::new("s").with_max_attempts(20);
    client.ensure_subscription(&topic, &opts).await.unwrap();
    client
        .publish(&topic, Message::new("x").with_id("a"))
        .await
        .unwrap();
    let mut sub = client.subscribe(&topic, opts).await.unwrap();
    let start = Instant::now();
    for round in 1..=15 {
        let d = recv(
            &mut sub,
            &format!("delivery {round} ({:?} in)", start.elapsed()),
        )
        .await;
        assert_eq!(d.attempt(), round);
        if round == 15 {
            d.ack().await.unwrap();
        } else {
            d.nack(Retry::after(Duration::from_secs(1))).await.unwrap();
        }
    }
    client.close().await.unwrap();
}
