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
use switchyard_core::{Bytes, Client, Message, SubscribeOptions};
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

const SIZE: usize = 256;
const BOUND: Duration = Duration::from_secs(600);

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

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

async fn sy_publish(client: &Client, topic: &str, n: usize) -> Duration {
    let payload = Bytes::from(vec![0xab; SIZE]);
    let start = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(10_000);
        let batch: Vec<Message> = (0..k).map(|_| Message::new(payload.clone())).collect();
        for r in client.publish_batch(topic, batch).await {
            r.unwrap();
        }
        left -= k;
    }
    start.elapsed()
}

async fn sy_consume(client: &Client, topic: &str, opts: SubscribeOptions, n: usize) -> Duration {
    let mut sub = client.subscribe(topic, opts).await.unwrap();
    let start = Instant::now();
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.recv())
            .await
            .expect("switchyard consume stalled")
            .unwrap();
        d.ack().await.unwrap();
    }
    let elapsed = start.elapsed();
    sub.close().await.unwrap();
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
    let mut figures = Vec::new();
    for round in 1..=4 {
        // Alternate who goes first: the second publisher writes into a
        // broker that already holds the first one's unconsumed messages.
        let (raw_p, sy_p, raw_c, sy_c);
        if round % 2 == 1 {
            raw_p = raw_publish(&publish, &raw_exchange, n, window).await;
            sy_p = sy_publish(&client, &topic, n).await;
            raw_c = raw_consume(&consume, &raw_queue, n, window, AckMode::Queued).await;
            sy_c = sy_consume(&client, &topic, opts.clone(), n).await;
        } else {
            sy_p = sy_publish(&client, &topic, n).await;
            raw_p = raw_publish(&publish, &raw_exchange, n, window).await;
            sy_c = sy_consume(&client, &topic, opts.clone(), n).await;
            raw_c = raw_consume(&consume, &raw_queue, n, window, AckMode::Queued).await;
        }
        let (rp, sp, rc, sc) = (rate(n, raw_p), rate(n, sy_p), rate(n, raw_c), rate(n, sy_c));
        println!(
            "round {round}: publish raw {rp:>9.0} msg/s  switchyard {sp:>9.0} msg/s  ratio {:.2}",
            sp / rp
        );
        println!(
            "round {round}: consume+ack raw {rc:>9.0} msg/s  switchyard {sc:>9.0} msg/s  ratio {:.2}",
            sc / rc
        );
        figures.push((rp, sp, rc, sc));
    }
    for mode in [AckMode::Awaited, AckMode::Multiple] {
        raw_publish(&publish, &raw_exchange, n, window).await;
        let d = raw_consume(&consume, &raw_queue, n, window, mode).await;
        println!("raw consume+ack, acks {mode:?}: {:.0} msg/s", rate(n, d));
    }
    let (rp, sp, rc, sc) = figures.iter().fold((0.0, 0.0, 0.0, 0.0), |a, f| {
        (a.0 + f.0, a.1 + f.1, a.2 + f.2, a.3 + f.3)
    });
    let k = figures.len() as f64;
    println!(
        "mean: publish raw {:.0} / switchyard {:.0} (ratio {:.2}); consume+ack raw {:.0} / switchyard {:.0} (ratio {:.2})",
        rp / k,
        sp / k,
        sp / rp,
        rc / k,
        sc / k,
        sc / rc
    );

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
    let n = env("SY_BENCH_MESSAGES", 50_000);
    let window = env("SY_BENCH_WINDOW", 256);
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
