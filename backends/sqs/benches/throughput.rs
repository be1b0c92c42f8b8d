//! switchyard-sqs (queue mode) vs raw aws-sdk-sqs against the same endpoint,
//! same run: publish in batches of 10 with 16 batches in flight, and
//! consume+delete with 4 concurrent receives of up to 10 messages.
//!
//! `SWITCHYARD_SQS_URL='sqs://?region=us-east-1&endpoint=http://127.0.0.1:4566' cargo bench -p switchyard-sqs`
//! (credentials from the AWS chain; `SY_BENCH_MESSAGES`, default 500: moto
//! scans a queue on every receive, so large backlogs measure moto).
//! The raw consumer asks each receive for what switchyard reads (message
//! attributes for the id, the receive count for the attempt) and deletes
//! what it brought with one `DeleteMessageBatch` (as switchyard batches its
//! acks); without the attributes, and with one `DeleteMessage` per message,
//! are printed too.
//!
//! omniqueue (its SQS backend, on the same SDK client configuration) runs on
//! its own queue in the same rounds at its best: `send_raw_batch` of 10 with
//! 16 in flight, and 4 concurrent `receive_all(10)` loops whose deliveries
//! are acked concurrently (omniqueue deletes each message on its own).
//! Then switchyard's end-to-end latency at 20 msg/s.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{StreamExt, stream::FuturesUnordered};
use omniqueue::{QueueProducer as _, backends::sqs as omni};
use switchyard_bench::{self as bench, Others, Rounds, SIZE, rate};
use switchyard_core::{Client, SubscribeOptions, driver::support::ID_HEADER};
use switchyard_sqs::{
    SqsBroker, SqsConfig,
    aws_sdk_sqs::{
        self,
        types::{
            DeleteMessageBatchRequestEntry, MessageAttributeValue, MessageSystemAttributeName,
            SendMessageBatchRequestEntry,
        },
    },
};

const BOUND: Duration = Duration::from_secs(900);

/// Sends `n` messages as batches of 10 with 16 batches in flight, the way
/// both raw clients publish; `send(k)` sends one batch of `k` and checks it.
/// Returns the wall time.
async fn in_batches<F, Fut>(n: usize, mut send: F) -> Duration
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = ()>,
{
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut sent = 0;
    while sent < n || !in_flight.is_empty() {
        while sent < n && in_flight.len() < 16 {
            let k = (n - sent).min(10);
            in_flight.push(send(k));
            sent += k;
        }
        in_flight.next().await;
    }
    start.elapsed()
}

async fn raw_publish(sqs: &aws_sdk_sqs::Client, url: &str, n: usize) -> Duration {
    let body = "x".repeat(SIZE);
    in_batches(n, |k| {
        let entries: Vec<_> = (0..k)
            .map(|i| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(&body)
                    .message_attributes(
                        ID_HEADER,
                        MessageAttributeValue::builder()
                            .data_type("String")
                            .string_value(switchyard_core::new_id())
                            .build()
                            .unwrap(),
                    )
                    .build()
                    .unwrap()
            })
            .collect();
        let call = sqs
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send();
        async move {
            let out = call.await.unwrap();
            assert!(out.failed().is_empty());
        }
    })
    .await
}

/// How the raw consumer works: `batched` deletes each receive's messages
/// with one `DeleteMessageBatch` (else one `DeleteMessage` each);
/// `attributes` asks for what switchyard reads of every message (its
/// message attributes, for the id, and the receive count, for the attempt).
#[derive(Debug, Clone, Copy)]
struct RawConsume {
    batched: bool,
    attributes: bool,
}

async fn raw_consume(sqs: &aws_sdk_sqs::Client, url: &str, n: usize, how: RawConsume) -> Duration {
    let RawConsume {
        batched,
        attributes,
    } = how;
    let done = Arc::new(AtomicUsize::new(0));
    // When the last message was deleted: loops still in a long poll then
    // return empty up to a second later, which is not consume time.
    let finished = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let start = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..4 {
        let (sqs, url, done) = (sqs.clone(), url.to_owned(), done.clone());
        let finished = finished.clone();
        loops.push(tokio::spawn(async move {
            while done.load(Ordering::SeqCst) < n {
                let mut receive = sqs
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1);
                if attributes {
                    receive = receive
                        .message_system_attribute_names(
                            MessageSystemAttributeName::ApproximateReceiveCount,
                        )
                        .message_attribute_names("All");
                }
                let out = receive.send().await.unwrap();
                let messages = out.messages.unwrap_or_default();
                if batched && !messages.is_empty() {
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
                } else {
                    for m in &messages {
                        sqs.delete_message()
                            .queue_url(&url)
                            .receipt_handle(m.receipt_handle().unwrap())
                            .send()
                            .await
                            .unwrap();
                    }
                }
                let before = done.fetch_add(messages.len(), Ordering::SeqCst);
                if before < n && before + messages.len() >= n {
                    *finished.lock().unwrap() = Some(Instant::now());
                }
            }
        }));
    }
    for l in loops {
        l.await.unwrap();
    }
    let end = finished.lock().unwrap().unwrap_or_else(Instant::now);
    end - start
}

async fn omni_publish(producer: &omni::SqsProducer, n: usize) -> Duration {
    let body = Arc::new("x".repeat(SIZE));
    in_batches(n, |k| {
        let call = producer.send_raw_batch(vec![body.clone(); k]);
        async move { call.await.unwrap() }
    })
    .await
}

async fn omni_consume(consumer: Arc<omni::SqsConsumer>, n: usize) -> Duration {
    let done = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let start = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..4 {
        let (consumer, done, finished) = (consumer.clone(), done.clone(), finished.clone());
        loops.push(tokio::spawn(async move {
            while done.load(Ordering::SeqCst) < n {
                let batch = consumer
                    .receive_all(10, Duration::from_secs(1))
                    .await
                    .unwrap();
                let k = batch.len();
                for r in futures_util::future::join_all(batch.into_iter().map(|d| d.ack())).await {
                    r.map_err(|(e, _)| e).unwrap();
                }
                let before = done.fetch_add(k, Ordering::SeqCst);
                if before < n && before + k >= n {
                    *finished.lock().unwrap() = Some(Instant::now());
                }
            }
        }));
    }
    for l in loops {
        l.await.unwrap();
    }
    let end = finished.lock().unwrap().unwrap_or_else(Instant::now);
    end - start
}

/// Receives with prefetch 40 (the raw side's 4 receives of 10) and acks
/// each delivery without waiting for the ack before the next receive (so
/// acks gather into batches, as the raw side's deletes do); the clock stops
/// when the last ack is confirmed, as the raw side's stops at its last
/// delete. Closing (which lets long polls still out finish) is not timed,
/// as the raw side's loops ending is not.
async fn sy_consume(client: &Client, topic: &str, n: usize) -> Duration {
    let mut sub = client
        .subscribe(topic, SubscribeOptions::new("bench").with_prefetch(40))
        .await
        .unwrap();
    let start = Instant::now();
    let mut acks = FuturesUnordered::new();
    let (mut received, mut acked) = (0, 0);
    while acked < n {
        tokio::select! {
            biased;
            Some(r) = acks.next(), if !acks.is_empty() => {
                let r: switchyard_core::Result<()> = r;
                r.expect("switchyard ack");
                acked += 1;
            }
            d = tokio::time::timeout(Duration::from_secs(60), sub.recv()), if received < n => {
                let d = d.expect("switchyard consume stalled").expect("switchyard receive");
                received += 1;
                acks.push(d.ack());
            }
        }
    }
    let elapsed = start.elapsed();
    sub.close().await.unwrap();
    elapsed
}

/// Creates a standard queue; its URL.
async fn create_queue(sqs: &aws_sdk_sqs::Client, name: &str) -> String {
    sqs.create_queue()
        .queue_name(name)
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned()
}

async fn run(url: String, n: usize) {
    let url = url.as_str();
    let config = SqsConfig::from_url(&format!("{url}&mode=queue&wait=1s")).unwrap();
    let broker = SqsBroker::connect(config).await.unwrap();
    let client = Client::new(broker.clone());
    let sqs = broker.sqs_client().clone();
    let run_id = &switchyard_core::new_id()[24..];
    let raw_url = create_queue(&sqs, &format!("bench-raw-{run_id}")).await;
    let omni_url = create_queue(&sqs, &format!("bench-omniqueue-{run_id}")).await;
    let (omni_producer, omni_consumer) = omni::SqsBackend::builder(omni_url.as_str())
        .sqs_config(sqs.config().to_owned())
        .build_pair()
        .await
        .unwrap();
    let omni_consumer = Arc::new(omni_consumer);
    let topic = format!("bench.switchyard.{run_id}");
    let opts = SubscribeOptions::new("bench");
    client.ensure_subscription(&topic, &opts).await.unwrap();
    println!("SQS at {url}: {n} messages of {SIZE} B (queue mode)");
    let mut rounds = Rounds::default();
    let mut others = Others::default();
    for round in 1..=2 {
        let raw_p = raw_publish(&sqs, &raw_url, n).await;
        let sy_p = bench::publish(&client, &topic, n).await;
        let raw_c = raw_consume(
            &sqs,
            &raw_url,
            n,
            RawConsume {
                batched: true,
                attributes: true,
            },
        )
        .await;
        let sy_c = sy_consume(&client, &topic, n).await;
        rounds.push(round, n, [raw_p, sy_p, raw_c, sy_c]);
        let omni_p = omni_publish(&omni_producer, n).await;
        let omni_c = omni_consume(omni_consumer.clone(), n).await;
        others.push(round, "omniqueue", n, omni_p, omni_c);
    }
    for how in [
        RawConsume {
            batched: true,
            attributes: false,
        },
        RawConsume {
            batched: false,
            attributes: true,
        },
    ] {
        raw_publish(&sqs, &raw_url, n).await;
        let d = raw_consume(&sqs, &raw_url, n, how).await;
        println!("raw consume {how:?}: {:.0} msg/s", rate(n, d));
    }
    rounds.print_mean("raw aws-sdk-sqs");
    let latency = bench::latency(&client, &topic, opts, 200, SIZE, 20.0)
        .await
        .unwrap();
    rounds.print_rows(
        "SQS (moto)",
        "aws-sdk-sqs, batches of 10",
        "aws-sdk-sqs, batched deletes, id + count read",
    );
    others.print_rows("SQS (moto)", &rounds, "omniqueue", "omniqueue");
    bench::latency_row("SQS (moto)", &latency);
    let _ = sqs.delete_queue().queue_url(&omni_url).send().await;
    let _ = sqs.delete_queue().queue_url(&raw_url).send().await;
    client.close().await.unwrap();
}

fn main() {
    bench::main_with("SWITCHYARD_SQS_URL", 500, BOUND, run);
}
