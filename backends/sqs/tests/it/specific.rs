//! SQS-specific behaviour: bad input, faults, mapping.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use switchyard_core::{Error, Message, SubscribeOptions};
use switchyard_sqs::{SqsBroker, SqsConfig};

fn url() -> Option<String> {
    switchyard_conformance::broker_url("SWITCHYARD_SQS_URL")
}

#[tokio::test]
async fn unreachable_endpoint_fails_within_the_connect_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    // Credentials given, so only the endpoint can fail.
    let config = SqsConfig::from_url(&format!(
        "sqs://?region=us-east-1&endpoint=http://127.0.0.1:{port}&connect_timeout=1s"
    ))
    .unwrap()
    .static_credentials("test", "test");
    let start = Instant::now();
    let err = SqsBroker::connect(config).await.unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn queue_mode_subscriptions_share_the_topic_queue() {
    let Some(url) = url() else { return };
    let client = switchyard_sqs::connect(&format!("{url}&mode=queue&wait=1s"))
        .await
        .unwrap();
    assert!(!client.capabilities().fan_out);
    let topic = format!("sy-test.shared.{}", &switchyard_core::new_id()[24..]);
    let a = SubscribeOptions::new("a");
    let b = SubscribeOptions::new("b");
    client.ensure_subscription(&topic, &a).await.unwrap();
    for i in 0..6 {
        client
            .publish(&topic, Message::new("x").with_id(format!("m{i}")))
            .await
            .unwrap();
    }
    // Both names read the one queue: together they see each message once.
    let mut sa = client.subscribe(&topic, a).await.unwrap();
    let mut sb = client.subscribe(&topic, b).await.unwrap();
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 6 {
        assert!(Instant::now() < deadline, "only {} of 6", seen.len());
        let next = async {
            tokio::select! {
                d = sa.recv() => d,
                d = sb.recv() => d,
            }
        };
        let d = tokio::time::timeout(Duration::from_secs(10), next)
            .await
            .unwrap_or_else(|_| panic!("nothing for 10 s; {} of 6 seen", seen.len()))
            .unwrap();
        assert!(
            seen.insert(d.message().id().to_owned()) || d.attempt() > 1,
            "{} delivered to both names",
            d.message().id()
        );
        d.ack().await.unwrap();
    }
    client.close().await.unwrap();
}
