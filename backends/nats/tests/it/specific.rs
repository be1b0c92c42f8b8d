//! NATS-specific behaviour: bad input, faults, mapping.

use std::time::{Duration, Instant};

use switchyard_core::{Error, Message, SubscribeOptions};
use switchyard_nats::{NatsBroker, NatsConfig};

fn url() -> Option<String> {
    switchyard_conformance::broker_url("SWITCHYARD_NATS_URL")
}

#[tokio::test]
async fn unreachable_server_fails_within_the_connect_timeout() {
    // A loopback port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let start = Instant::now();
    let err = switchyard_nats::connect(&format!("nats://127.0.0.1:{port}?connect_timeout=2s"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn silent_server_fails_within_the_connect_timeout() {
    // Accepts TCP but never speaks NATS.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let start = Instant::now();
    let err = switchyard_nats::connect(&format!("nats://127.0.0.1:{port}?connect_timeout=1s"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "took {:?}",
        start.elapsed()
    );
    keep.abort();
}

#[tokio::test]
async fn payload_limit_comes_from_the_server() {
    let Some(url) = url() else { return };
    let broker = NatsBroker::connect(NatsConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    let server_max = broker.nats_client().server_info().max_payload;
    let client = switchyard_core::Client::new(broker);
    let limit = client.capabilities().max_payload;
    assert!(
        limit < server_max && limit > server_max / 2,
        "limit {limit}, server {server_max}"
    );
    let err = client
        .publish("sy-test.limit", Message::new(vec![0u8; server_max + 1]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err:?}");
}

#[tokio::test]
async fn names_map_to_distinct_streams() {
    let Some(url) = url() else { return };
    let broker = NatsBroker::connect(NatsConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    let a = broker.stream_name("orders.created");
    let b = broker.stream_name("orders_created");
    let c = broker.stream_name("orders-created");
    assert!(a != b && b != c && a != c);
    assert!(!a.contains('.'));
    assert_eq!(broker.subject("a.b"), "sy.a_db");
}

#[tokio::test]
async fn ack_wait_expiry_redelivers_and_a_late_ack_is_harmless() {
    let Some(url) = url() else { return };
    let client = switchyard_nats::connect(&url).await.unwrap();
    let topic = format!("sy-test.expiry.{}", &switchyard_core::new_id()[24..]);
    let opts = SubscribeOptions::new("s")
        .ack_timeout(Duration::from_millis(500))
        .prefetch(2);
    client.ensure_subscription(&topic, &opts).await.unwrap();
    client
        .publish(&topic, Message::new("x").with_id("slow"))
        .await
        .unwrap();
    let mut sub = client.subscribe(&topic, opts).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.attempt(), 1);
    // Held past the ack wait: the server redelivers it (room for one more).
    let again = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.message().id(), "slow");
    assert_eq!(again.attempt(), 2);
    first.ack().await.unwrap();
    again.ack().await.unwrap();
    let more = tokio::time::timeout(Duration::from_secs(2), sub.recv()).await;
    assert!(more.is_err(), "acked message came back: {more:?}");
    client.close().await.unwrap();
}
