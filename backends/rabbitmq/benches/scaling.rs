//! How consume throughput grows with consumers and payload size: 1, 2, 4
//! and 8 consumers on one subscription, 1 KiB and 64 KiB payloads,
//! switchyard next to raw lapin on the same broker in the same run.
//!
//! `SWITCHYARD_RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo bench -p switchyard-rabbitmq --bench scaling`
//! (`SY_BENCH_MESSAGES`: messages of 1 KiB per measurement, default 100,000;
//! a tenth of that of 64 KiB). Writes `scaling-rabbitmq.csv` to
//! `$SY_BENCH_OUT` (default `target/bench`), which `scripts/plot_scaling.py`
//! draws.
//!
//! Each measurement publishes the messages once, through switchyard, to a
//! topic with two subscriptions: one is consumed by switchyard handles, the
//! other (its quorum queue) by raw lapin consumers, each on a channel of
//! its own with `basic.qos` = the prefetch and one `multiple` ack per half
//! prefetch (lapin's best, as in the throughput benchmark). The clock runs
//! from the first delivery to the last ack. Each point is the mean of two
//! measurements, each client going first once.

use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use switchyard_bench::{self as bench, rate};
use switchyard_core::{Client, SubscribeOptions};
use switchyard_rabbitmq::{
    RabbitBroker, RabbitConfig,
    lapin::{
        Connection,
        options::{
            BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeleteOptions,
            QueueDeleteOptions,
        },
        types::FieldTable,
    },
};

const BOUND: Duration = Duration::from_secs(1_200);
const PREFETCH: usize = 256;
const CONSUMERS: [usize; 4] = [1, 2, 4, 8];

/// Raw lapin: `consumers` consumers on `queue`, each on its own channel;
/// from the first delivery to the last ack of `n`.
async fn raw_consume(conn: &Connection, queue: &str, n: usize, consumers: usize) -> Duration {
    let received = Arc::new(AtomicUsize::new(0));
    let first = Arc::new(Mutex::new(None::<Instant>));
    let (done, _) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for _ in 0..consumers {
        let channel = conn.create_channel().await.unwrap();
        channel
            .basic_qos(u16::try_from(PREFETCH).unwrap(), BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let (received, first) = (Arc::clone(&received), Arc::clone(&first));
        let (done_tx, mut done_rx) = (done.clone(), done.subscribe());
        tasks.push(tokio::spawn(async move {
            let mut unacked = None;
            let mut pending = 0;
            loop {
                let d = tokio::select! {
                    d = tokio::time::timeout(Duration::from_secs(60), consumer.next()) => {
                        d.expect("raw consume stalled").unwrap().unwrap()
                    }
                    _ = done_rx.wait_for(|d| *d) => break,
                };
                first.lock().unwrap().get_or_insert_with(Instant::now);
                pending += 1;
                if pending >= PREFETCH / 2 {
                    d.ack(BasicAckOptions { multiple: true }).await.unwrap();
                    pending = 0;
                    unacked = None;
                } else {
                    unacked = Some(d);
                }
                if received.fetch_add(1, Ordering::SeqCst) + 1 == n {
                    done_tx.send_replace(true);
                    break;
                }
            }
            if let Some(d) = unacked {
                d.ack(BasicAckOptions { multiple: true }).await.unwrap();
            }
            channel
                .basic_cancel(consumer.tag(), Default::default())
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let end = Instant::now();
    let start = first.lock().unwrap().expect("a delivery");
    end - start
}

async fn run(url: String, n: usize) {
    let url = url.as_str();
    let broker = RabbitBroker::connect(RabbitConfig::from_url(url).unwrap())
        .await
        .unwrap();
    let client = Client::new(broker.clone());
    let conn = broker.connection().await.unwrap();
    let run_id = &switchyard_core::new_id()[24..];
    let out = std::env::var("SY_BENCH_OUT").unwrap_or_else(|_| "target/bench".into());
    println!(
        "RabbitMQ at {}: consumers {CONSUMERS:?}, prefetch {PREFETCH} each",
        switchyard_core::redact_url(url)
    );
    let mut csv = String::from("backend,payload_bytes,consumers,client,msg_per_s\n");
    let mut round = 0;
    for (size, count) in [(1024, n), (64 * 1024, (n / 10).max(100))] {
        for consumers in CONSUMERS {
            round += 1;
            let topic = format!("bench.scaling.{run_id}.{size}.{consumers}");
            let sy_opts = SubscribeOptions::new("sy").with_prefetch(PREFETCH);
            let raw_opts = SubscribeOptions::new("raw").with_prefetch(PREFETCH);
            client.ensure_subscription(&topic, &sy_opts).await.unwrap();
            client.ensure_subscription(&topic, &raw_opts).await.unwrap();
            let raw_queue = broker.queue_name(&topic, "raw");
            // Twice, each client first once: the first consumer reads while
            // the broker still writes out the second queue's copies.
            let (mut raw, mut sy) = (0.0, 0.0);
            for raw_first in [round % 2 == 1, round % 2 == 0] {
                bench::publish_windowed(&client, &topic, count, size, PREFETCH)
                    .await
                    .unwrap();
                let (r, s);
                if raw_first {
                    r = raw_consume(&conn, &raw_queue, count, consumers).await;
                    s = bench::consume_shared(&client, &topic, sy_opts.clone(), count, consumers)
                        .await
                        .unwrap();
                } else {
                    s = bench::consume_shared(&client, &topic, sy_opts.clone(), count, consumers)
                        .await
                        .unwrap();
                    r = raw_consume(&conn, &raw_queue, count, consumers).await;
                }
                raw += rate(count, r) / 2.0;
                sy += rate(count, s) / 2.0;
            }
            println!(
                "{size:>6} B, {consumers} consumers, {count} messages: raw {raw:>8.0} msg/s  switchyard {sy:>8.0} msg/s  ratio {:.2}",
                sy / raw
            );
            for (who, v) in [("lapin", raw), ("switchyard", sy)] {
                let _ = writeln!(csv, "RabbitMQ,{size},{consumers},{who},{v:.0}");
            }
            let channel = conn.create_channel().await.unwrap();
            let mut exchanges = vec![broker.exchange_name(&topic)];
            let mut queues = Vec::new();
            for opts in [&sy_opts, &raw_opts] {
                queues.push(broker.queue_name(&topic, opts.name()));
                let dlq = opts.dead_letter_topic_for(&topic);
                queues.push(broker.queue_name(&dlq, "dead-letters"));
                exchanges.push(broker.exchange_name(&dlq));
            }
            for q in &queues {
                channel
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .unwrap();
            }
            queues.sort();
            queues.dedup();
            exchanges.sort();
            exchanges.dedup();
            for e in &exchanges {
                channel
                    .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                    .await
                    .unwrap();
            }
        }
    }
    std::fs::create_dir_all(&out).unwrap();
    let path = format!("{out}/scaling-rabbitmq.csv");
    std::fs::write(&path, csv).unwrap();
    println!("wrote {path}");
    client.close().await.unwrap();
}

fn main() {
    bench::main_with("SWITCHYARD_RABBITMQ_URL", 100_000, BOUND, run);
}
