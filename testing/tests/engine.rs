//! switchyard-testing against a real container engine (`SWITCHYARD_CONTAINERS=1`,
//! `DOCKER_HOST` from scripts/containers.sh) and without one.

use std::{process::Command, time::Duration};

use switchyard::{Message, SubscribeOptions};
use switchyard_testing::{Broker, Error, Kind};

const CHILD: &str = "SWITCHYARD_TESTING_CHILD";

/// With no engine where `DOCKER_HOST` points, `start` returns
/// `Error::NoEngine` naming what is missing (checked in a child process,
/// whose environment can be set).
#[test]
fn no_engine_is_a_clear_error() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_without_an_engine",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .env("DOCKER_HOST", "unix:///nonexistent/switchyard/docker.sock")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the child failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
}

#[tokio::test]
#[ignore = "run by no_engine_is_a_clear_error, in a child process without an engine"]
async fn child_without_an_engine() {
    assert_eq!(
        std::env::var(CHILD).as_deref(),
        Ok("1"),
        "run as a child only"
    );
    let started = std::time::Instant::now();
    let err = Broker::start(Kind::Nats).await.expect_err("no engine");
    let text = err.to_string();
    println!("{text}");
    assert!(matches!(err, Error::NoEngine { .. }), "{err:?}");
    assert!(
        text.contains("DOCKER_HOST=unix:///nonexistent/switchyard/docker.sock"),
        "{text}"
    );
    assert!(text.contains("no container engine"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

fn containers() -> bool {
    let on = std::env::var("SWITCHYARD_CONTAINERS").is_ok_and(|v| v == "1");
    if !on {
        eprintln!("SWITCHYARD_CONTAINERS is not 1: container test SKIPPED");
        assert!(
            std::env::var("SWITCHYARD_REQUIRE_CONTAINERS").is_err(),
            "SWITCHYARD_REQUIRE_CONTAINERS is set but SWITCHYARD_CONTAINERS is not 1"
        );
    }
    on
}

/// Each broker starts, serves a switchyard round trip at its URL, stops
/// answering while paused and answers again after, and its container is
/// gone once the `Broker` is dropped.
async fn lifecycle(kind: Kind) {
    if !containers() {
        return;
    }
    let started = std::time::Instant::now();
    let broker = Broker::start(kind)
        .await
        .unwrap_or_else(|e| panic!("{kind}: {e}"));
    println!(
        "{kind}: {} ready on 127.0.0.1:{} after {:?}",
        broker.image(),
        broker.port(),
        started.elapsed()
    );
    assert!(
        broker
            .url()
            .contains(&format!("127.0.0.1:{}", broker.port()))
    );

    round_trip(&broker, "first").await;

    assert!(broker.answers().await, "{kind}: ready but not answering");
    broker.pause().await.unwrap();
    assert!(!broker.answers().await, "{kind}: answers while paused");
    broker.unpause().await.unwrap();
    assert!(broker.answers().await, "{kind}: silent after unpause");
    round_trip(&broker, "after-pause").await;

    broker.kill().await.unwrap();
    assert!(!broker.answers().await, "{kind}: answers after a kill");
    broker.restart().await.unwrap();
    round_trip(&broker, "after-restart").await;

    let port = broker.port();
    drop(broker);
    // Removed with its port forward: nothing listens on its port any more
    // (checked through the port, whatever the engine).
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await;
    assert!(
        matches!(refused, Ok(Err(_))),
        "{kind}: 127.0.0.1:{port} still accepts after the broker was dropped"
    );
}

async fn round_trip(broker: &Broker, round: &str) {
    let url = if broker.kind() == Kind::Sqs {
        format!("{}&wait=1s", broker.url())
    } else {
        broker.url().to_owned()
    };
    let client = switchyard::connect(&url).await.unwrap();
    let topic = format!("testing.{round}");
    let opts = SubscribeOptions::new("probe");
    client.ensure_subscription(&topic, &opts).await.unwrap();
    client
        .publish(&topic, Message::new(round.to_owned()))
        .await
        .unwrap();
    let mut sub = client.subscribe(&topic, opts).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(30), sub.recv())
        .await
        .unwrap_or_else(|_| panic!("{}: no delivery within 30s ({round})", broker.kind()))
        .unwrap();
    assert_eq!(delivery.message().payload().as_ref(), round.as_bytes());
    delivery.ack().await.unwrap();
    sub.close().await.ok();
    client.close().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_lifecycle() {
    lifecycle(Kind::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_lifecycle() {
    lifecycle(Kind::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_lifecycle() {
    lifecycle(Kind::Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_lifecycle() {
    lifecycle(Kind::Sqs).await;
}
