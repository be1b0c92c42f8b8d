//! Behaviour of the in-process broker beyond the shared suite.

use std::time::Duration;

use switchyard_core::{Error, Message, SubscribeOptions};
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
    let opts = SubscribeOptions::new("s").with_ack_timeout(Duration::from_millis(100));
    client.ensure_subscription("t", &opts).await.unwrap();
    client
        .publish("t", Message::new("slow").with_id("slow"))
        .await
        .unwrap();
    let mut sub = client.subscribe("t", opts).await.unwrap();
    let first = tokio::time::timeout(BOUND, sub.recv())
        .await
        .unwrap()
        .unwrap();
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

#[tokio::test]
async fn ack_timeout_runs_from_hand_out_not_from_buffering() {
    // A slow consumer: each message takes 150 ms with a 250 ms ack timeout.
    // The receiver buffers all four at once; none may time out while waiting
    // in the buffer (that would duplicate them and inflate their attempts).
    let client = MemoryBroker::new().client();
    let opts = SubscribeOptions::new("s")
        .with_prefetch(4)
        .with_ack_timeout(Duration::from_millis(250));
    client.ensure_subscription("t", &opts).await.unwrap();
    for i in 0..4 {
        client
            .publish("t", Message::new("x").with_id(format!("m{i}")))
            .await
            .unwrap();
    }
    let mut sub = client.subscribe("t", opts.clone()).await.unwrap();
    let first = tokio::time::timeout(BOUND, sub.recv())
        .await
        .unwrap()
        .unwrap();
    // A competing consumer keeps polling: it would pick up anything that
    // (wrongly) expired while buffered in the first one.
    let mut other = client.subscribe("t", opts).await.unwrap();
    let stolen = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_millis(1200), other.recv()).await
    });
    let mut next = Some(first);
    for i in 0..4 {
        let d = match next.take() {
            Some(d) => d,
            None => tokio::time::timeout(BOUND, sub.recv())
                .await
                .unwrap()
                .unwrap(),
        };
        assert_eq!(d.message().id(), format!("m{i}"));
        assert_eq!(d.attempt(), 1, "m{i} was redelivered while buffered");
        tokio::time::sleep(Duration::from_millis(150)).await;
        d.ack().await.unwrap();
    }
    let stolen = stolen.await.unwrap();
    assert!(
        stolen.is_err(),
        "a buffered delivery expired and went to the other consumer: {stolen:?}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.recv())
            .await
            .is_err()
    );
}
