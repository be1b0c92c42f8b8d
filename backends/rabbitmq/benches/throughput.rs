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
//!
//! The compared raw consumer is lapin's best: one `basic.ack` with
//! `multiple` per half window (acking each delivery, queued or awaited, is
//! printed too). omniqueue (its RabbitMQ backend on lapin 2, with tokio's
//! executor and reactor) runs on its own quorum queue in the same rounds:
//! it publishes without publisher confirms (so its publish figure is not the
//! same guarantee), and its consumer acks every delivery, each ack in its own
//! task so they do not wait on one another. Then switchyard's end-to-end
//! latency at 1,000 msg/s.

use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt, stream::FuturesOrdered};
use omniqueue::backends::rabbitmq as omni;
use switchyard_bench::{self as bench, Others, Rounds, SIZE, env_usize, rate};
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

/// omniqueue on lapin 2, with the best settings it offers: tokio's executor
/// and reactor, prefetch = window, persistent messages.
async fn omni_pair(
    url: &str,
    exchange: &str,
    queue: &str,
    window: usize,
) -> (omni::RabbitMqProducer, omni::RabbitMqConsumer) {
    let config = omni::RabbitMqConfig {
        uri: url.to_owned(),
        connection_properties: omni::ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio),
        publish_exchange: exchange.to_owned(),
        publish_routing_key: String::new(),
        publish_options: omni::BasicPublishOptions::default(),
        publish_properties: omni::BasicProperties::default().with_delivery_mode(2),
        consume_queue: queue.to_owned(),
        consumer_tag: String::new(),
        consume_options: omni::BasicConsumeOptions::default(),
        consume_arguments: omni::FieldTable::default(),
        consume_prefetch_count: Some(u16::try_from(window).unwrap()),
        requeue_on_nack: true,
    };
    omni::RabbitMqBackend::builder(config)
        .build_pair()
        .await
        .unwrap()
}

async fn omni_publish(producer: &omni::RabbitMqProducer, n: usize) -> Duration {
    let payload = vec![0xab; SIZE];
    let start = Instant::now();
    for _ in 0..n {
        producer.send_raw(&payload).await.unwrap();
    }
    start.elapsed()
}

async fn omni_consume(consumer: &mut omni::RabbitMqConsumer, n: usize) -> Duration {
    let mut acks = Vec::with_capacity(n);
    let mut start = None;
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.receive())
            .await
            .expect("omniqueue consume stalled")
            .unwrap();
        start.get_or_insert_with(Instant::now);
        acks.push(tokio::spawn(async move {
            d.ack().await.map_err(|(e, _)| e).unwrap();
        }));
    }
    for a in acks {
        a.await.unwrap();
    }
    start.unwrap().elapsed()
}

async fn declare(channel: &Channel, exchange: &str, queue: &str) {
    channel
        .exchange_declare(
            exchange.into(),
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
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

async fn delete(channel: &Channel, exchange: &str, queue: &str) {
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await;
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

async fn run(url: String, n: usize) {
    let url = url.as_str();
    let window = env_usize("SY_BENCH_WINDOW", 256);
    let broker = RabbitBroker::connect(
        RabbitConfig::from_url(url)
            .unwrap()
            .with_publish_window(window),
    )
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
    declare(&publish, &raw_exchange, &raw_queue).await;
    let omni_name = format!("bench-omniqueue-{run_id}");
    declare(&publish, &omni_name, &omni_name).await;
    let (omni_producer, mut omni_consumer) = omni_pair(url, &omni_name, &omni_name, window).await;

    let topic = format!("bench.switchyard.{run_id}");
    let opts = SubscribeOptions::new("bench").with_prefetch(window);
    client.ensure_subscription(&topic, &opts).await.unwrap();

    println!(
        "RabbitMQ at {}: {n} messages of {SIZE} B, window {window}",
        switchyard_core::redact_url(url)
    );
    let mut rounds = Rounds::default();
    let mut others = Others::default();
    for round in 1..=4 {
        // Alternate who goes first: the second publisher writes into a
        // broker that already holds the first one's unconsumed messages.
        let (raw_p, sy_p, raw_c, sy_c);
        if round % 2 == 1 {
            raw_p = raw_publish(&publish, &raw_exchange, n, window).await;
            sy_p = bench::publish(&client, &topic, n).await;
            raw_c = raw_consume(&consume, &raw_queue, n, window, AckMode::Multiple).await;
            sy_c = bench::consume(&client, &topic, opts.clone(), n).await;
        } else {
            sy_p = bench::publish(&client, &topic, n).await;
            raw_p = raw_publish(&publish, &raw_exchange, n, window).await;
            sy_c = bench::consume(&client, &topic, opts.clone(), n).await;
            raw_c = raw_consume(&consume, &raw_queue, n, window, AckMode::Multiple).await;
        }
        rounds.push(round, n, [raw_p, sy_p, raw_c, sy_c]);
        let omni_p = omni_publish(&omni_producer, n).await;
        let omni_c = omni_consume(&mut omni_consumer, n).await;
        others.push(
            round,
            "omniqueue (publish without confirms)",
            n,
            omni_p,
            omni_c,
        );
    }
    for mode in [AckMode::Awaited, AckMode::Queued] {
        raw_publish(&publish, &raw_exchange, n, window).await;
        let d = raw_consume(&consume, &raw_queue, n, window, mode).await;
        println!("raw consume+ack, acks {mode:?}: {:.0} msg/s", rate(n, d));
    }
    rounds.print_mean("raw lapin");
    let latency = bench::latency(&client, &topic, opts.clone(), 5_000, SIZE, 1_000.0)
        .await
        .unwrap();

    rounds.print_rows("RabbitMQ", "lapin, confirms", "lapin, multiple acks");
    others.print_rows(
        "RabbitMQ",
        &rounds,
        "omniqueue, **no confirms**",
        "omniqueue",
    );
    bench::latency_row("RabbitMQ", &latency);

    delete(&publish, &raw_exchange, &raw_queue).await;
    delete(&publish, &omni_name, &omni_name).await;
    let dlq = opts.dead_letter_topic_for(&topic);
    for (t, s) in [(topic.as_str(), "bench"), (dlq.as_str(), "dead-letters")] {
        delete(&publish, &broker.exchange_name(t), &broker.queue_name(t, s)).await;
    }
    client.close().await.unwrap();
}

fn main() {
    bench::main_with("SWITCHYARD_RABBITMQ_URL", 50_000, BOUND, run);
}
