//! switchyard-rabbitmq vs raw lapin, same broker, same run, same window:
//! confirmed publish (confirms in flight) and consume+ack of 256-byte
//! messages through a quorum queue.
//!
//! `SWITCHYARD_RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo bench -p switchyard-rabbitmq`
//! (`SY_BENCH_MESSAGES`, default 50,000; `SY_BENCH_WINDOW`, default 256).
//! The raw side declares what switchyard declares (a durable fanout
//! exchange, a durable quorum queue bound to it) and publishes persistent
//! messages with a UUIDv7 `message_id`, as switchyard does: the same work,
//! not less. Its consumer acks each delivery, with `basic.qos` = window.
//! Queues and exchanges are deleted afterwards.

use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt, stream::FuturesOrdered};
use switchyard_conformance::bench::{self, Rounds, SIZE, env_usize, rate};
use switchyard_core::{Client, SubscribeOptions};
use switchyard_rabbitmq::{
    RabbitBroker, RabbitConfig,
    lapin::{
        BasicProperties, Channel, ExchangeKind,
        options::{
            BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
            ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
            QueueDeclareOptions, QueueDeleteOptions,
        },
        types::{AMQPValue, FieldTable, LongString},
    },
};

const BOUND: Duration = Duration::from_secs(600);

async fn raw_publish(channel: &Channel, exchange: &str, n: usize, window: usize) -> Duration {
    let payload = vec![0xab; SIZE];
    let start = Instant::now();
    let mut in_flight = FuturesOrdered::new();
    for _ in 0..n {
        if in_flight.len() >= window {
            let c: switchyard_rabbitmq::lapin::Result<switchyard_rabbitmq::lapin::Confirmation> =
                in_flight.next().await.unwrap();
            assert!(c.unwrap().is_ack());
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(switchyard_core::new_id().into());
        let confirm = channel
            .basic_publish(
                exchange.into(),
                "".into(),
                BasicPublishOptions::default(),
                &payload,
                props,
            )
            .await
            .unwrap();
        in_flight.push_back(confirm);
    }
    while let Some(c) = in_flight.next().await {
        assert!(c.unwrap().is_ack());
    }
    start.elapsed()
}

#[derive(Clone, Copy, Debug)]
enum AckMode {
    /// Await each `basic.ack` (lapin reports when its I/O loop wrote it).
    Awaited,
    /// Queue each `basic.ack` on the channel without waiting for the I/O
    /// loop to write it (what switchyard does).
    Queued,
    /// One `basic.ack` with `multiple` per half window.
    Multiple,
}

async fn raw_consume(
    channel: &Channel,
    queue: &str,
    n: usize,
    window: usize,
    mode: AckMode,
) -> Duration {
    channel
        .basic_qos(u16::try_from(window).unwrap(), BasicQosOptions::default())
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
    let start = Instant::now();
    for i in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("raw consume stalled")
            .unwrap()
            .unwrap();
        match mode {
            AckMode::Awaited => assert!(d.ack(BasicAckOptions::default()).await.unwrap()),
            AckMode::Queued => {
                let _ = channel
                    .basic_ack(d.delivery_tag, BasicAckOptions::default())
                    .now_or_never();
            }
            AckMode::Multiple => {
                if (i + 1) % (window / 2).max(1) == 0 || i + 1 == n {
                    d.ack(BasicAckOptions { multiple: true }).await.unwrap();
                }
            }
        }
    }
    let elapsed = start.elapsed();
    channel
        .basic_cancel(consumer.tag(), Default::default())
        .await
        .unwrap();
    elapsed
}

async fn run(url: &str, n: usize, window: usize) {
    let broker = RabbitBroker::connect(RabbitConfig::from_url(url).unwrap().publish_window(window))
        .await
        .unwrap();
    let client = Client::new(broker.clone());
    let run_id = &switchyard_core::new_id()[24..];

    // Raw: the topology switchyard declares, on the same connection.
    let conn = broker.connection().await.unwrap();
    let publish = conn.create_channel().await.unwrap();
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let consume = conn.create_channel().await.unwrap();
    let raw_exchange = format!("bench-raw-{run_id}");
    let raw_queue = format!("bench-raw-{run_id}");
    publish
        .exchange_declare(
            raw_exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    publish
        .queue_declare(
            raw_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    publish
        .queue_bind(
            raw_queue.as_str().into(),
            raw_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let topic = format!("bench.switchyard.{run_id}");
    let opts = SubscribeOptions::new("bench").prefetch(window);
    client.ensure_subscription(&topic, &opts).await.unwrap();

    println!(
        "RabbitMQ at {}: {n} messages of {SIZE} B, window {window}",
        switchyard_core::redact_url(url)
    );
    let mut rounds = Rounds::default();
    for round in 1..=4 {
        // Alternate who goes first: the second publisher writes into a
        // broker that already holds the first one's unconsumed messages.
        let (raw_p, sy_p, raw_c, sy_c);
        if round % 2 == 1 {
            raw_p = raw_publish(&publish, &raw_exchange, n, window).await;
            sy_p = bench::publish(&client, &topic, n).await;
            raw_c = raw_consume(&consume, &raw_queue, n, window, AckMode::Queued).await;
            sy_c = bench::consume(&client, &topic, opts.clone(), n).await;
        } else {
            sy_p = bench::publish(&client, &topic, n).await;
            raw_p = raw_publish(&publish, &raw_exchange, n, window).await;
            sy_c = bench::consume(&client, &topic, opts.clone(), n).await;
            raw_c = raw_consume(&consume, &raw_queue, n, window, AckMode::Queued).await;
        }
        rounds.push(round, n, [raw_p, sy_p, raw_c, sy_c]);
    }
    for mode in [AckMode::Awaited, AckMode::Multiple] {
        raw_publish(&publish, &raw_exchange, n, window).await;
        let d = raw_consume(&consume, &raw_queue, n, window, mode).await;
        println!("raw consume+ack, acks {mode:?}: {:.0} msg/s", rate(n, d));
    }
    rounds.print_mean("raw lapin");

    let _ = publish
        .queue_delete(raw_queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = publish
        .exchange_delete(
            raw_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let dlq = opts.dead_letter_topic_for(&topic);
    for (t, s) in [(topic.as_str(), "bench"), (dlq.as_str(), "dead-letters")] {
        let _ = publish
            .queue_delete(
                broker.queue_name(t, s).as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await;
        let _ = publish
            .exchange_delete(
                broker.exchange_name(t).as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
    client.close().await.unwrap();
}

fn main() {
    let Ok(url) = std::env::var("SWITCHYARD_RABBITMQ_URL") else {
        println!(
            "SWITCHYARD_RABBITMQ_URL is not set: RabbitMQ benchmark skipped (scripts/brokers.sh start rabbitmq)"
        );
        return;
    };
    let n = env_usize("SY_BENCH_MESSAGES", 50_000);
    let window = env_usize("SY_BENCH_WINDOW", 256);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(BOUND, run(&url, n, window))
            .await
            .expect("benchmark exceeded its time bound");
    });
}
