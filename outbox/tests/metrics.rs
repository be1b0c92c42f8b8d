//! With the `metrics` feature, the relay counts published and parked
//! events and records each event's lag from insert to confirmed publish.
#![cfg(feature = "metrics")]

use std::time::Duration;

use metrics_util::{
    CompositeKey, MetricKind,
    debugging::{DebugValue, DebuggingRecorder},
};
use sqlx::postgres::PgPoolOptions;
use switchyard::{Message, SubscribeOptions};
use switchyard_conformance::broker_url;
use switchyard_outbox::Outbox;

#[test]
fn the_relay_counts_and_times_what_it_publishes() {
    let Some(pg) = broker_url("SWITCHYARD_POSTGRES_URL") else {
        return;
    };
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        // One thread, so every task records into this thread's recorder.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let id = uuid::Uuid::now_v7().simple().to_string();
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .connect(&pg)
                .await
                .unwrap();
            let outbox =
                Outbox::with_table(&format!("sy_test_outbox_metrics_{}", &id[20..])).unwrap();
            outbox.migrate(&pool).await.unwrap();
            let client = switchyard::connect(&format!("memory://metrics-{id}"))
                .await
                .unwrap();
            let opts = SubscribeOptions::new("s");
            client.ensure_subscription("orders", &opts).await.unwrap();
            let too_big = client.capabilities().max_payload + 1;
            let mut tx = pool.begin().await.unwrap();
            for i in 0..10 {
                let m = Message::new(format!("{i}"));
                outbox.enqueue(&mut tx, "orders", m).await.unwrap();
            }
            outbox
                .enqueue(&mut tx, "orders", Message::new(vec![0_u8; too_big]))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            let mut sub = client.subscribe("orders", opts).await.unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let relay = tokio::spawn(outbox.relay(pool.clone(), client.clone()).run(async {
                let _ = stopped.await;
            }));
            for _ in 0..10 {
                let d = tokio::time::timeout(Duration::from_secs(30), sub.recv())
                    .await
                    .expect("delivered within 30 s")
                    .unwrap();
                d.ack().await.unwrap();
            }
            let _ = stop.send(());
            let report = relay.await.unwrap().unwrap();
            assert_eq!((report.published, report.parked), (10, 1));
            let drop = format!("DROP TABLE {}", outbox.table());
            let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&pool).await;
        });
    });
    let metrics: Vec<(CompositeKey, DebugValue)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| (key, value))
        .collect();
    let find = |kind: MetricKind, name: &str| {
        metrics
            .iter()
            .find(|(k, _)| k.kind() == kind && k.key().name() == name)
            .map(|(_, v)| v)
    };
    assert_eq!(
        find(MetricKind::Counter, "switchyard_outbox_published_total"),
        Some(&DebugValue::Counter(10))
    );
    assert_eq!(
        find(MetricKind::Counter, "switchyard_outbox_parked_total"),
        Some(&DebugValue::Counter(1))
    );
    match find(MetricKind::Histogram, "switchyard_outbox_lag_seconds") {
        Some(DebugValue::Histogram(lags)) => {
            assert_eq!(lags.len(), 10);
            assert!(lags.iter().all(|l| l.into_inner() >= 0.0));
        }
        other => panic!("no lag histogram: {other:?}"),
    }
}
