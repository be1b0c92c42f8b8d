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

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use switchyard_bench::{
    self as bench,
    scaling::{self, CONSUMERS, PREFETCH, Table, Tally},
};
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

/// Raw lapin: `consumers` consumers on `queue`, each on its own channel;
/// from the first delivery to the last ack of `n`.
async fn raw_consume(conn: &Connection, queue: &str, n: usize, consumers: usize) -> Duration {
    let tally = Tally::new(n);
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
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            let mut unacked = None;
            let mut pending = 0;
            loop {
                let d = tokio::select! {
                    d = tokio::time::timeout(Duration::from_secs(60), consumer.next()) => {
                        d.expect("raw consume stalled").unwrap().unwrap()
                    }
                    () = tally.finished() => break,
                };
                tally.started();
                pending += 1;
                if pending >= PREFETCH / 2 {
                    d.ack(BasicAckOptions { multiple: true }).await.unwrap();
                    pending = 0;
                    unacked = None;
                } else {
                    unacked = Some(d);
                }
                if tally.add(1) {
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
    // The last multiple acks go out after the n-th delivery: the clock
    // stops once they are sent, not at the n-th count.
    tally.until(Instant::now()).expect("a delivery")
}

async fn run(url: String, n: usize) {
    let url = url.as_str();
    let broker = RabbitBroker::connect(RabbitConfig::from_url(url).unwrap())
        .await
        .unwrap();
    let client = Client::new(broker.clone());
    let conn = broker.connection().await.unwrap();
    let run_id = &switchyard_core::new_id()[24..];
    println!(
        "RabbitMQ at {}: consumers {CONSUMERS:?}, prefetch {PREFETCH} each",
        switchyard_core::redact_url(url)
    );
    let mut table = Table::new("RabbitMQ", "lapin");
    for (size, count) in scaling::sizes(n) {
        for consumers in CONSUMERS {
            let topic = format!("bench.scaling.{run_id}.{size}.{consumers}");
            let sy_opts = SubscribeOptions::new("sy").with_prefetch(PREFETCH);
            let raw_opts = SubscribeOptions::new("raw").with_prefetch(PREFETCH);
            client.ensure_subscription(&topic, &sy_opts).await.unwrap();
            client.ensure_subscription(&topic, &raw_opts).await.unwrap();
            let raw_queue = broker.queue_name(&topic, "raw");
            let (client, conn, topic, raw_queue) = (&client, &conn, &topic, &raw_queue);
            table
                .point(
                    size,
                    count,
                    consumers,
                    async || {
                        bench::publish_windowed(client, topic, count, size, PREFETCH)
                            .await
                            .unwrap();
                    },
                    async || raw_consume(conn, raw_queue, count, consumers).await,
                    async || {
                        bench::consume_shared(client, topic, sy_opts.clone(), count, consumers, 1)
                            .await
                            .unwrap()
                    },
                )
                .await;
            let channel = conn.create_channel().await.unwrap();
            let mut exchanges = vec![broker.exchange_name(topic)];
            let mut queues = Vec::new();
            for opts in [&sy_opts, &raw_opts] {
                queues.push(broker.queue_name(topic, opts.name()));
                let dlq = opts.dead_letter_topic_for(topic);
                queues.push(broker.queue_name(&dlq, "dead-letters"));
                exchanges.push(broker.exchange_name(&dlq));
            }
            queues.sort();
            queues.dedup();
            exchanges.sort();
            exchanges.dedup();
            for q in &queues {
                channel
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .unwrap();
            }
            for e in &exchanges {
                channel
                    .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                    .await
                    .unwrap();
            }
        }
    }
    table.write("rabbitmq").unwrap();
    client.close().await.unwrap();
}

fn main() {
    bench::main_with("SWITCHYARD_RABBITMQ_URL", 100_000, BOUND, run);
}
