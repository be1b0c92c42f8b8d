//! A live migration between two different real brokers (RabbitMQ → Kafka)
//! following the playbook in docs/MIGRATION.md, while publishing goes on:
//!
//! 1. publishers write to the old broker; `switchyard bridge` (a process)
//!    copies its stream to the new broker;
//! 2. dual write: publishers confirm every message on both brokers
//!    ([`Tee`]), so the new broker gets those messages twice (directly and
//!    through the bridge);
//! 3. cutover: publishers write to the new broker only; the bridge drains
//!    the old one and stops when it is idle.
//!
//! The application on the new broker de-duplicates by id ([`Dedup`]). At the
//! end the set of ids it processed equals the set published, and no id was
//! processed twice.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use switchyard::{
    Client, Message, SubscribeOptions,
    consumer::{Consumer, Dedup},
    migrate::Tee,
};
use switchyard_conformance::broker_url;

use crate::unique;

/// Messages per phase (old only, both, new only).
const PHASE: usize = 150;
const BOUND: Duration = Duration::from_secs(240);

async fn publish_phase(client: &Client, topic: &str, phase: &str, published: &mut Vec<String>) {
    for i in 0..PHASE {
        let m = Message::new(format!("{phase} {i}")).with_key(format!("customer-{}", i % 7));
        published.push(m.id().to_owned());
        client.publish(topic, m).await.expect("confirmed publish");
        // Live traffic, not one burst.
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn live_migration_rabbitmq_to_kafka() {
    let (Some(old_url), Some(new_url)) = (
        broker_url("SWITCHYARD_RABBITMQ_URL"),
        broker_url("SWITCHYARD_KAFKA_URL"),
    ) else {
        return;
    };
    tokio::time::timeout(BOUND, migrate(&old_url, &new_url))
        .await
        .expect("the migration ends within its bound");
}

async fn migrate(old_url: &str, new_url: &str) {
    let old = switchyard::connect(old_url).await.expect("old broker");
    let new = switchyard::connect(new_url).await.expect("new broker");
    let topic = unique("migration.orders");
    let bridge_opts = SubscribeOptions::new("bridge");
    let app_opts = SubscribeOptions::new("app");
    old.ensure_subscription(&topic, &bridge_opts)
        .await
        .expect("bridge subscription on the old broker");
    new.ensure_subscription(&topic, &app_opts)
        .await
        .expect("application subscription on the new broker");

    // The application, already reading the new broker, de-duplicating by id.
    let processed = Arc::new(Mutex::new(Vec::<String>::new()));
    let dedup = Dedup::in_memory(Duration::from_secs(3600));
    let seen = Arc::clone(&processed);
    let handler = dedup.wrap(move |ctx| {
        let seen = Arc::clone(&seen);
        async move {
            seen.lock().unwrap().push(ctx.message.id().to_owned());
            Ok(())
        }
    });
    let sub = new
        .subscribe(&topic, app_opts.clone().with_prefetch(256))
        .await
        .expect("subscribe on the new broker");
    let (stop_app, app_stopped) = tokio::sync::oneshot::channel::<()>();
    let app = tokio::spawn(
        Consumer::new()
            .with_concurrency(8)
            .run(sub, handler, async {
                let _ = app_stopped.await;
            }),
    );

    // The bridge, as an operator runs it, while publishing goes on.
    let bridge = {
        let (old_url, new_url, topic) = (old_url.to_owned(), new_url.to_owned(), topic.clone());
        tokio::spawn(async move {
            crate::ok(
                &[
                    "bridge",
                    "--from",
                    &old_url,
                    "--topic",
                    &topic,
                    "--subscription",
                    "bridge",
                    "--to",
                    &new_url,
                    "--idle-timeout",
                    "5s",
                    "--quiet",
                ],
                b"",
            )
            .await
        })
    };

    let mut published = Vec::new();
    publish_phase(&old, &topic, "old", &mut published).await;
    let both = Client::new(Tee::new(old.clone(), new.clone()));
    publish_phase(&both, &topic, "both", &mut published).await;
    publish_phase(&new, &topic, "new", &mut published).await;

    let report = bridge.await.expect("bridge task");
    let bridged: usize = report
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bridge report: {report}"));
    assert!(
        bridged >= 2 * PHASE,
        "the bridge moved old and dual-written messages: {report}"
    );

    // Wait until the application has processed every id and skipped the
    // second copies of the dual-written ones.
    let expected: HashSet<String> = published.iter().cloned().collect();
    assert_eq!(expected.len(), 3 * PHASE);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let done: HashSet<String> = processed.lock().unwrap().iter().cloned().collect();
        let settled = done.is_superset(&expected) && dedup.duplicates() >= PHASE as u64;
        if settled || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Anything else still arriving would show up as a second run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_app.send(());
    let report = app.await.expect("app task").expect("consumer");

    let processed = processed.lock().unwrap().clone();
    let done: HashSet<String> = processed.iter().cloned().collect();
    let missing: Vec<&String> = expected.difference(&done).collect();
    assert!(
        missing.is_empty(),
        "{} ids never processed: {missing:?}",
        missing.len()
    );
    let extra: Vec<&String> = done.difference(&expected).collect();
    assert!(extra.is_empty(), "ids nobody published: {extra:?}");
    assert_eq!(
        processed.len(),
        done.len(),
        "an id was processed twice ({} runs for {} ids)",
        processed.len(),
        done.len()
    );
    // The dual-write phase reached the new broker twice per message: the
    // de-duplication really had work to do.
    assert!(
        dedup.duplicates() >= PHASE as u64,
        "{} duplicates skipped, report {report:?}",
        dedup.duplicates()
    );
    old.close().await.expect("close old");
    new.close().await.expect("close new");
}
