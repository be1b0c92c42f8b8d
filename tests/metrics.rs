//! With the `metrics` feature, the consumer runtime counts what it receives
//! and how each delivery ends, and records handler latency.
#![cfg(all(feature = "metrics", feature = "memory"))]

use std::time::Duration;

use metrics_util::{
    CompositeKey, MetricKind,
    debugging::{DebugValue, DebuggingRecorder},
};
use switchyard::{
    Message, SubscribeOptions,
    consumer::{Backoff, Consumer, HandlerError},
    memory::MemoryBroker,
};

#[test]
fn runtime_counts_outcomes_and_times_handlers() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        // One thread, so every task records into this thread's recorder.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = MemoryBroker::new().client();
            let opts = SubscribeOptions::new("billing");
            client.ensure_subscription("orders", &opts).await.unwrap();
            for id in ["ok", "flaky", "poison"] {
                client
                    .publish("orders", Message::new(id).with_id(id))
                    .await
                    .unwrap();
            }
            let sub = client.subscribe("orders", opts).await.unwrap();
            let report = Consumer::new()
                .with_backoff(Backoff::new(
                    Duration::from_millis(10),
                    Duration::from_millis(10),
                ))
                .run(
                    sub,
                    |ctx| async move {
                        match (ctx.message.id(), ctx.attempt) {
                            ("flaky", 1) => Err(HandlerError::transient("not yet")),
                            ("poison", _) => Err(HandlerError::permanent("bad order")),
                            _ => Ok(()),
                        }
                    },
                    tokio::time::sleep(Duration::from_millis(500)),
                )
                .await
                .unwrap();
            assert_eq!(
                (report.acked, report.retried, report.dead_lettered),
                (2, 1, 1)
            );
        });
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str| -> u64 {
        snapshot
            .iter()
            .filter(|(k, _, _, _): &&(CompositeKey, _, _, DebugValue)| {
                k.kind() == MetricKind::Counter && k.key().name() == name
            })
            .map(|(k, _, _, v)| {
                assert!(
                    k.key()
                        .labels()
                        .any(|l| l.key() == "subscription" && l.value() == "billing"),
                    "{name} is not labelled with its subscription"
                );
                match v {
                    DebugValue::Counter(n) => *n,
                    _ => 0,
                }
            })
            .sum()
    };
    assert_eq!(counter("switchyard_received_total"), 4);
    assert_eq!(counter("switchyard_acked_total"), 2);
    assert_eq!(counter("switchyard_nacked_total"), 1);
    assert_eq!(counter("switchyard_dead_lettered_total"), 1);
    let timed: usize = snapshot
        .iter()
        .filter(|(k, _, _, _)| k.key().name() == "switchyard_handler_seconds")
        .map(|(_, _, _, v)| match v {
            DebugValue::Histogram(samples) => samples.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(timed, 4, "one latency sample per handled delivery");
}
