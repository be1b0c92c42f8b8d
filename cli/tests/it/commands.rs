//! publish, tail and dead-letters against each broker, as processes.

use std::{collections::HashMap, time::Duration};

use base64::Engine as _;
use switchyard::SubscribeOptions;
use switchyard_conformance::broker_url;

use crate::{json_lines, ok, run, unique};

const WAIT: Duration = Duration::from_secs(30);

/// The whole command set against one broker.
async fn commands(url: &str) {
    let client = switchyard::connect(url).await.expect("connect");
    let topic = unique("cli.commands");
    let t = topic.as_str();
    let opts = SubscribeOptions::new("cli");
    // What `tail` will read must be kept from the first publish on.
    client.ensure_subscription(t, &opts).await.expect("ensure");

    // publish: id, key, headers and payload as given; the id is printed.
    let out = ok(
        &[
            "publish",
            url,
            t,
            "--id",
            "cli-1",
            "--key",
            "customer-7",
            "--header",
            "a=b",
            "--header",
            "note=x y=z:ü",
            "hello",
        ],
        b"",
    )
    .await;
    assert_eq!(out, "cli-1\n");
    // A payload from standard input, bytes that are not UTF-8.
    let binary = [0_u8, 159, 146, 150, 255];
    assert_eq!(
        ok(&["publish", url, t, "--id", "cli-2", "-"], &binary).await,
        "cli-2\n"
    );
    // --count: new ids, one per line.
    let bulk: Vec<String> = ok(&["publish", url, t, "--count", "3", "--quiet", "bulk"], b"")
        .await
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(bulk.len(), 3);

    // tail: one JSON object per message, acked.
    let wait = format!("{}s", WAIT.as_secs());
    let lines = tail_json(url, t, 5, &wait).await;
    let by_id: HashMap<&str, &serde_json::Value> = lines
        .iter()
        .map(|l| (l["id"].as_str().unwrap(), l))
        .collect();
    assert_eq!(by_id.len(), 5, "{lines:?}");
    let first = by_id["cli-1"];
    assert_eq!(first["key"], "customer-7");
    assert_eq!(first["payload"], "hello");
    assert_eq!(first["headers"]["a"], "b");
    assert_eq!(first["headers"]["note"], "x y=z:ü");
    assert_eq!(first["attempt"], 1);
    assert_eq!(first["topic"], t);
    assert_eq!(
        by_id["cli-2"]["payload_base64"],
        base64::engine::general_purpose::STANDARD.encode(binary)
    );
    for id in &bulk {
        assert_eq!(by_id[id.as_str()]["payload"], "bulk");
    }
    // Acked: nothing comes back.
    let again = ok(
        &["tail", url, t, "--subscription", "cli", "--timeout", "3s"],
        b"",
    )
    .await;
    assert!(again.is_empty(), "acked messages came back: {again}");

    // dead-letters: a message the application dead-lettered is listed
    // with its reasons, left in place, then redriven to the topic.
    ok(&["publish", url, t, "--id", "cli-3", "poison"], b"").await;
    let mut sub = client.subscribe(t, opts.clone()).await.expect("subscribe");
    let d = tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("the poison message arrives")
        .expect("receive");
    assert_eq!(d.message().id(), "cli-3");
    d.dead_letter("bad input").await.expect("dead-letter");
    sub.close().await.expect("close");
    let listed = json_lines(
        &ok(
            &[
                "dead-letters",
                url,
                t,
                "--subscription",
                "cli",
                "list",
                "--count",
                "1",
                "--timeout",
                &wait,
            ],
            b"",
        )
        .await,
    );
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], "cli-3");
    assert_eq!(listed[0]["payload"], "poison");
    assert_eq!(listed[0]["headers"]["sy-dead-letter-reason"], "bad input");
    assert_eq!(listed[0]["headers"]["sy-original-topic"], t);
    assert_eq!(listed[0]["headers"]["sy-original-subscription"], "cli");
    // Listing leaves it in place (a broker may hand it back only after the
    // ack timeout, hence the long idle bound; `--count` ends the wait).
    let moved = ok(
        &[
            "dead-letters",
            url,
            t,
            "--subscription",
            "cli",
            "redrive",
            "--count",
            "1",
            "--timeout",
            "60s",
        ],
        b"",
    )
    .await;
    assert!(moved.starts_with("redrove 1 "), "{moved}");
    let back = tail_json(url, t, 1, &wait).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0]["id"], "cli-3");
    assert_eq!(back[0]["attempt"], 1);
    assert!(back[0]["headers"].get("sy-dead-letter-reason").is_none());

    // Bad input: a clear message and a non-zero exit.
    let bad = run(&["publish", url, "not a topic", "x"], b"").await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("invalid"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    client.close().await.expect("close");
    bench(url).await;
}

/// `tail URL TOPIC --subscription cli --count COUNT --timeout WAIT`: its
/// JSON objects.
async fn tail_json(url: &str, topic: &str, count: u32, wait: &str) -> Vec<serde_json::Value> {
    let count = count.to_string();
    let args = [
        "tail",
        url,
        topic,
        "--subscription",
        "cli",
        "--count",
        &count,
        "--timeout",
        wait,
    ];
    json_lines(&ok(&args, b"").await)
}

/// `bench`: a publish run leaves its messages for a later consume run of
/// the same topic, which moves exactly that many; latency mode reports
/// ordered percentiles over every message.
async fn bench(url: &str) {
    let first = bench_json(&[
        "bench",
        url,
        "--mode",
        "publish",
        "--messages",
        "300",
        "--size",
        "100",
        "--window",
        "32",
    ])
    .await;
    assert_eq!(first["messages"], 300);
    assert_eq!(first["size"], 100);
    assert!(first["publish"]["msg_per_sec"].as_f64().unwrap() > 0.0);
    assert!(first["consume"].is_null());
    let topic = first["topic"].as_str().expect("topic").to_owned();
    let second = bench_json(&[
        "bench",
        url,
        "--mode",
        "consume",
        "--topic",
        &topic,
        "--messages",
        "300",
        "--window",
        "32",
    ])
    .await;
    assert!(second["publish"].is_null());
    assert!(second["consume"]["msg_per_sec"].as_f64().unwrap() > 0.0);
    let latency = bench_json(&[
        "bench",
        url,
        "--mode",
        "latency",
        "--messages",
        "40",
        "--rate",
        "100",
    ])
    .await;
    assert_latency(&latency["latency"], 40);
}

/// Runs `switchyard ARGS… --json`; its one JSON object.
async fn bench_json(args: &[&str]) -> serde_json::Value {
    let args = [args, &["--json"]].concat();
    let lines = json_lines(&ok(&args, b"").await);
    assert_eq!(lines.len(), 1, "one JSON object: {lines:?}");
    lines.into_iter().next().unwrap()
}

fn assert_latency(l: &serde_json::Value, count: u64) {
    assert_eq!(l["count"], count);
    let [p50, p99, max] = ["p50_ms", "p99_ms", "max_ms"].map(|k| l[k].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{l}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nats() {
    if let Some(url) = broker_url("SWITCHYARD_NATS_URL") {
        commands(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq() {
    if let Some(url) = broker_url("SWITCHYARD_RABBITMQ_URL") {
        commands(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka() {
    if let Some(url) = broker_url("SWITCHYARD_KAFKA_URL") {
        commands(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sqs() {
    if let Some(url) = broker_url("SWITCHYARD_SQS_URL") {
        let sep = if url.contains('?') { '&' } else { '?' };
        commands(&format!("{url}{sep}mode=fanout&wait=1s")).await;
    }
}

/// Usage errors exit with 2 and say what is wrong; a backend that is not
/// reachable or not known exits with 1 naming the problem.
#[tokio::test]
async fn bad_usage_is_explained() {
    let out = run(&["publish"], b"").await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("<URL>"));
    let out = run(
        &["publish", "memory://", "t", "--id", "x", "--count", "2"],
        b"",
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--count"));
    let out = run(&["tail", "carrier-pigeon://loft", "t", "-s", "s"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scheme"));
    let out = run(
        &["publish", "memory://", "t", "--header", "novalue", "x"],
        b"",
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NAME=VALUE"));
    // The in-process broker works within one command.
    assert_eq!(
        ok(&["publish", "memory://", "t", "--id", "m-1", "x"], b"").await,
        "m-1\n"
    );
    // `bench --mode consume` needs the topic an earlier run filled.
    let out = run(&["bench", "memory://", "--mode", "consume"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--topic"));
}

/// `bench` on the in-process broker: both directions in one process, then
/// latency; the text form names every figure.
#[tokio::test]
async fn bench_in_memory() {
    let both = bench_json(&["bench", "memory://", "--messages", "2000"]).await;
    assert_eq!(both["messages"], 2000);
    assert_eq!(both["window"], 256);
    for k in ["publish", "consume"] {
        assert!(both[k]["msg_per_sec"].as_f64().unwrap() > 0.0, "{both}");
        assert!(both[k]["seconds"].as_f64().unwrap() > 0.0, "{both}");
    }
    let latency = bench_json(&[
        "bench",
        "memory://",
        "--mode",
        "latency",
        "--messages",
        "200",
        "--rate",
        "1000",
    ])
    .await;
    assert_latency(&latency["latency"], 200);
    let text = ok(&["bench", "memory://", "--messages", "100"], b"").await;
    assert!(
        text.contains("publish") && text.contains("consume+ack"),
        "{text}"
    );
}
