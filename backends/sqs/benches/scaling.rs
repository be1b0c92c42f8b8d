//! How consume throughput grows with consumers and payload size: 1, 2, 4
//! and 8 consumers on one subscription, 1 KiB and 64 KiB payloads,
//! switchyard next to raw aws-sdk-sqs on the same endpoint in the same run.
//!
//! `SWITCHYARD_SQS_URL='sqs://?region=us-east-1&endpoint=http://127.0.0.1:4566' cargo bench -p switchyard-sqs --bench scaling`
//! (credentials from the AWS chain; `SY_BENCH_MESSAGES`: messages of 1 KiB
//! per measurement, default 1,000, since moto scans a queue on every
//! receive; a tenth of that, at least 100, of 64 KiB). Writes
//! `scaling-sqs.csv` to `$SY_BENCH_OUT` (default `target/bench`), which
//! `scripts/plot_scaling.py` draws.
//!
//! Fan-out mode: each measurement publishes the messages once, through
//! switchyard, to a topic (an SNS topic) with two subscriptions (two
//! queues). One queue is consumed by switchyard handles, each with a
//! prefetch of 10 and its acks not awaited before the next receive (so
//! they gather into `DeleteMessageBatch` calls); the other by raw loops,
//! one per consumer, each receiving up to 10 messages (asking for the
//! attributes switchyard reads) and deleting them with one
//! `DeleteMessageBatch`. The clock runs from the first delivery to the
//! last confirmed delete. Each point is the mean of two measurements, each
//! client going first once.

use std::time::Duration;

use switchyard_bench::{
    self as bench,
    scaling::{self, CONSUMERS, Table, Tally},
};
use switchyard_core::{Client, SubscribeOptions};
use switchyard_sqs::{
    SqsBroker, SqsConfig,
    aws_sdk_sqs::{
        self,
        types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName},
    },
};

const BOUND: Duration = Duration::from_secs(1_200);
/// Messages a receive asks for (SQS's most), and each handle's prefetch.
const BATCH: usize = 10;

/// Raw aws-sdk-sqs: `consumers` receive-and-delete loops on `url`; from the
/// first delivery to the delete that completes `n`.
async fn raw_consume(sqs: &aws_sdk_sqs::Client, url: &str, n: usize, consumers: usize) -> Duration {
    let tally = Tally::new(n);
    let mut loops = Vec::new();
    for _ in 0..consumers {
        let (sqs, url, tally) = (sqs.clone(), url.to_owned(), tally.clone());
        loops.push(tokio::spawn(async move {
            loop {
                let receive = sqs
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(BATCH as i32)
                    .wait_time_seconds(1)
                    .message_system_attribute_names(
                        MessageSystemAttributeName::ApproximateReceiveCount,
                    )
                    .message_attribute_names("All")
                    .send();
                let out = tokio::select! {
                    out = tokio::time::timeout(Duration::from_secs(60), receive) => {
                        out.expect("raw receive stalled").unwrap()
                    }
                    () = tally.finished() => break,
                };
                let messages = out.messages.unwrap_or_default();
                if messages.is_empty() {
                    continue;
                }
                tally.started();
                let entries: Vec<_> = messages
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(m.receipt_handle().unwrap())
                            .build()
                            .unwrap()
                    })
                    .collect();
                sqs.delete_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .unwrap();
                if tally.add(messages.len()) {
                    break;
                }
            }
        }));
    }
    for l in loops {
        l.await.unwrap();
    }
    tally.span().expect("a delivery")
}

async fn run(url: String, n: usize) {
    let url = url.as_str();
    let config = SqsConfig::from_url(&format!("{url}&mode=fanout&wait=1s")).unwrap();
    let broker = SqsBroker::connect(config).await.unwrap();
    let client = Client::new(broker.clone());
    let sqs = broker.sqs_client().clone();
    let run_id = &switchyard_core::new_id()[24..];
    println!(
        "SQS at {} (fan-out mode): consumers {CONSUMERS:?}, receives of {BATCH}",
        switchyard_core::redact_url(url)
    );
    let mut table = Table::new("SQS", "aws-sdk-sqs");
    for (size, count) in scaling::sizes(n) {
        for consumers in CONSUMERS {
            let topic = format!("bench.scaling.{run_id}.{size}.{consumers}");
            let sy_opts = SubscribeOptions::new("sy").with_prefetch(BATCH);
            let raw_opts = SubscribeOptions::new("raw").with_prefetch(BATCH);
            client.ensure_subscription(&topic, &sy_opts).await.unwrap();
            client.ensure_subscription(&topic, &raw_opts).await.unwrap();
            let raw_url = sqs
                .get_queue_url()
                .queue_name(broker.queue_name(&topic, "raw"))
                .send()
                .await
                .unwrap()
                .queue_url()
                .unwrap()
                .to_owned();
            let (client, sqs, topic, raw_url) = (&client, &sqs, &topic, &raw_url);
            table
                .point(
                    size,
                    count,
                    consumers,
                    async || {
                        bench::publish_windowed(client, topic, count, size, 64)
                            .await
                            .unwrap();
                    },
                    async || raw_consume(sqs, raw_url, count, consumers).await,
                    async || {
                        bench::consume_shared(
                            client,
                            topic,
                            sy_opts.clone(),
                            count,
                            consumers,
                            BATCH,
                        )
                        .await
                        .unwrap()
                    },
                )
                .await;
            for sub in ["sy", "raw"] {
                if let Ok(q) = sqs
                    .get_queue_url()
                    .queue_name(broker.queue_name(topic, sub))
                    .send()
                    .await
                    && let Some(q) = q.queue_url()
                {
                    let _ = sqs.delete_queue().queue_url(q).send().await;
                }
            }
        }
    }
    table.write("sqs").unwrap();
    client.close().await.unwrap();
}

fn main() {
    bench::main_with("SWITCHYARD_SQS_URL", 1_000, BOUND, run);
}
