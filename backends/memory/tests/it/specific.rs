//! Behaviour of the in-process broker beyond the shared suite.

use std::time::Duration;

use switchyard_core::{Error, Message, Retry, SubscribeOptions};
use switchyard_memory::MemoryBroker;

const BOUND: Duration = Duration::from_secs(5);

#[tokio::test]
async fn publish_without_subscription_is_dropped_like_a_real_broker() {
    let client = MemoryBroker::new().client();
    client.publish("t", Message::new("lost")).await.unwrap();
    let mut sub = client
        .subscribe("t", SubscribeOptions::new("late"))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), sub.recv())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn settling_after_the_subscription_closed_is_closed() {
    let client = MemoryBroker::new().client();
    let opts = SubscribeOptions::new("s");
    client.ensure_subscription("t", &opts).await.unwrap();
    client.publish("t", Message::new("x")).await.unwrap();
    let mut sub = client.subscribe("t", opts.clone()).await.unwrap();
    let d = tokio::time::timeout(BOUND, sub.recv())
        .await
        .unwrap()
        .unwrap();
    sub.close().await.unwrap();
    assert!(matches!(d.ack().await, Err(Error::Closed)));
    // ... and the message went back to the subscription.
    let mut other = client.subscribe("t", opts).await.unwrap();
    let again = tokio::time::timeout(BOUND, other.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
}

#[tokio::test]
async fn closing_the_connection_ends_its_subscriptions() {
    let client = MemoryBroker::new().client();
    let mut sub = client
        .subscribe("t", SubscribeOptions::new("s"))
        .await
        .unwrap();
    let waiter = tokio::spawn(async move { sub.recv().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.close().await.unwrap();
    let res = tokio::time::timeout(BOUND, waiter).await.unwrap().unwrap();
    assert!(matches!(res, Err(Error::Closed)), "{res:?}");
}

#[tokio::test]
async fn late_ack_after_ack_timeout_is_accepted_and_message_redelivered() {
    let client = MemoryBroker::new().client();
    let opts = SubscribeOptions::new("s").ack_timeout(Duration::from_millis(100));
    client.ensure_subscription("t", &opts).await.unwrap();
    client
        .publish("t", Message::new("slow").with_id("slow"))
        .await
        .unwrap();
    let mut sub = client.subscribe("t", opts).await.unwrap();
    let first = sub.recv().await.unwrap();
    let second = tokio::time::timeout(BOUND, sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.message().id(), "slow");
    assert_eq!(second.attempt(), 2);
    first.ack().await.unwrap();
    second.ack().await.unwrap();
}

#[tokio::test]
async fn delayed_nack_is_held_by_the_broker_across_consumers() {
    let broker = MemoryBroker::new();
    let client = broker.client();
    let opts = SubscribeOptions::new("s");
    client.ensure_subscription("t", &opts).await.unwrap();
    client.publish("t", Message::new("d")).await.unwrap();
    let mut sub = client.subscribe("t", opts.clone()).await.unwrap();
    let d = sub.recv().await.unwrap();
    let start = tokio::time::Instant::now();
    d.nack(Retry::after(Duration::from_millis(300)))
        .await
        .unwrap();
    drop(sub); // the consumer goes away; the delay is the broker's
    let mut other = broker.client().subscribe("t", opts).await.unwrap();
    let again = tokio::time::timeout(BOUND, other.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(again.attempt(), 2);
}

#[tokio::test]
async fn url_parameters() {
    let name = format!("limits-{}", switchyard_core::new_id());
    let client = switchyard_memory::connect(&format!("memory://{name}?max_payload=10")).unwrap();
    assert_eq!(client.capabilities().max_payload, 10);
    assert!(matches!(
        client.publish("t", Message::new(vec![0u8; 11])).await,
        Err(Error::PayloadTooLarge {
            size: 11,
            limit: 10
        })
    ));
    let err = switchyard_memory::connect(&format!("memory://{name}?max_payload=20")).unwrap_err();
    assert!(
        err.to_string()
            .contains("already exists with max_payload=10"),
        "{err}"
    );
    let err = switchyard_memory::connect("memory://x?max_payload=lots").unwrap_err();
    assert!(
        err.to_string().contains("max_payload must be a byte count"),
        "{err}"
    );
    assert!(switchyard_memory::connect("nats://x").is_err());
}
