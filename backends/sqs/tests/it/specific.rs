//! SQS-specific behaviour: bad input, faults, mapping.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use switchyard_core::{Message, SubscribeOptions};
use switchyard_sqs::{SqsBroker, SqsConfig};

fn url() -> Option<String> {
    switchyard_conformance::containers::suite_url(
        "SWITCHYARD_SQS_URL",
        switchyard_conformance::containers::Kind::Sqs,
    )
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

/// An SNS topic deleted under a fan-out client (by an operator, or an
/// emulator that lost its state): publishing works again by itself (the
/// cached ARN is forgotten on SNS's `NotFound`, the next publish creates
/// the topic), and ensuring the subscription again links its queue to the
/// new topic. Before, every publish failed with `NotFound` until restart.
#[tokio::test]
async fn fan_out_recovers_a_deleted_sns_topic() {
    let Some(url) = url() else { return };
    let url = format!("{url}&mode=fanout&wait=1s");
    let client = switchyard_sqs::connect(&url).await.unwrap();
    let topic = format!("sy-test.sns-gone.{}", &switchyard_core::new_id()[24..]);
    let opts = SubscribeOptions::new("s");
    client.ensure_subscription(&topic, &opts).await.unwrap();
    client.publish(&topic, Message::new("m1")).await.unwrap();

    // The operator deletes the SNS topic.
    let ops = SqsBroker::connect(SqsConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    let arn = ops
        .sns_client()
        .create_topic()
        .name(ops.sns_topic_name(&topic))
        .send()
        .await
        .unwrap()
        .topic_arn()
        .unwrap()
        .to_owned();
    ops.sns_client()
        .delete_topic()
        .topic_arn(&arn)
        .send()
        .await
        .unwrap();

    // The same client publishes again: retryable failures at most, then Ok.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut failures = 0;
    loop {
        match client.publish(&topic, Message::new("m2")).await {
            Ok(()) => break,
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                failures += 1;
                assert!(
                    Instant::now() < deadline,
                    "publishing never recovered from the deleted SNS topic ({failures} \
                     failures; last: {e})"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert!(
        failures <= 1,
        "{failures} failed publishes before the recovery"
    );
    // Ensuring the subscription again links its queue to the new topic.
    client.ensure_subscription(&topic, &opts).await.unwrap();
    client
        .publish(&topic, Message::new("m3").with_id("m3"))
        .await
        .unwrap();
    let mut sub = client.subscribe(&topic, opts).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            sub.recv(),
        )
        .await
        .expect("m3 reaches the subscription through the new topic")
        .unwrap();
        let id = d.message().id().to_owned();
        d.ack().await.unwrap();
        if id == "m3" {
            break;
        }
    }
    sub.close().await.unwrap();
    client.close().await.unwrap();
}
