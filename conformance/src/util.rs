//! Bounded helpers shared by the cases.

use std::{collections::HashSet, time::Duration};

use switchyard_core::{Client, Delivery, Message, Subscription};

pub(crate) fn short_id() -> String {
    switchyard_core::new_id().replace('-', "")
}

/// Receives one delivery or panics after `bound`.
pub(crate) async fn recv_one(sub: &mut Subscription, bound: Duration, what: &str) -> Delivery {
    match tokio::time::timeout(bound, sub.recv()).await {
        Err(_) => panic!("{what}: nothing received within {bound:?}"),
        Ok(Err(e)) => panic!("{what}: receive failed: {e}"),
        Ok(Ok(d)) => d,
    }
}

/// Asserts that nothing arrives within `wait`, not even a redelivery.
pub(crate) async fn expect_nothing(sub: &mut Subscription, wait: Duration, what: &str) {
    expect_no_new(sub, wait, &HashSet::new(), what).await;
}

/// Receives and acks until every id in `expected` was seen. Returns the
/// first delivery of each id, in arrival order. Panics on an unknown id, on
/// a first-attempt duplicate, or when `bound` passes without progress.
pub(crate) async fn collect_acked(
    sub: &mut Subscription,
    expected: &HashSet<String>,
    bound: Duration,
    what: &str,
) -> Vec<(Message, u32)> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(expected.len());
    while seen.len() < expected.len() {
        let d = match tokio::time::timeout(bound, sub.recv()).await {
            Err(_) => panic!(
                "{what}: {} of {} messages missing after {bound:?} without progress",
                expected.len() - seen.len(),
                expected.len()
            ),
            Ok(Err(e)) => panic!("{what}: receive failed: {e}"),
            Ok(Ok(d)) => d,
        };
        let id = d.message().id().to_owned();
        assert!(expected.contains(&id), "{what}: unexpected message id {id}");
        let attempt = d.attempt();
        let first = seen.insert(id.clone());
        assert!(
            first || attempt > 1,
            "{what}: message {id} delivered twice without being reported as a redelivery"
        );
        if first {
            out.push((d.message().clone(), attempt));
        }
        d.ack()
            .await
            .unwrap_or_else(|e| panic!("{what}: ack failed: {e}"));
    }
    out
}

/// Publishes every message, panicking on the first failure.
pub(crate) async fn publish_each(client: &Client, topic: &str, messages: Vec<Message>) {
    for m in messages {
        client
            .publish(topic, m)
            .await
            .unwrap_or_else(|e| panic!("publish to {topic} failed: {e}"));
    }
}

/// Publishes a batch, panicking on any failure.
pub(crate) async fn publish_batch_ok(client: &Client, topic: &str, messages: Vec<Message>) {
    for (i, r) in client
        .publish_batch(topic, messages)
        .await
        .into_iter()
        .enumerate()
    {
        r.unwrap_or_else(|e| panic!("batch publish #{i} to {topic} failed: {e}"));
    }
}

pub(crate) fn ids(messages: &[Message]) -> HashSet<String> {
    messages.iter().map(|m| m.id().to_owned()).collect()
}

/// Deterministic pseudo-random bytes (not valid UTF-8 in general).
pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Asserts that no new message arrives within `wait`. A redelivery of a
/// `known` id that the broker reports as such (attempt > 1) is tolerated and
/// acked: delivery is at-least-once.
pub(crate) async fn expect_no_new(
    sub: &mut Subscription,
    wait: Duration,
    known: &HashSet<String>,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(got) = tokio::time::timeout_at(deadline, sub.recv()).await {
        let d = got.unwrap_or_else(|e| panic!("{what}: expected nothing, receive failed: {e}"));
        let id = d.message().id();
        assert!(
            known.contains(id) && d.attempt() > 1,
            "{what}: expected nothing new within {wait:?}, got message {id} (attempt {})",
            d.attempt()
        );
        d.ack()
            .await
            .unwrap_or_else(|e| panic!("{what}: ack failed: {e}"));
    }
}
