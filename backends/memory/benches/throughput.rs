//! Memory backend throughput: publish → receive → ack of 256-byte messages,
//! next to a raw tokio mpsc pipeline moving the same payloads and
//! omniqueue's in-memory backend (an unbounded tokio channel whose ack does
//! nothing) doing publish → receive → ack; then end-to-end latency.
//!
//! `cargo bench -p switchyard-memory` (set `SY_BENCH_MESSAGES` to change the count).

use std::time::{Duration, Instant};

use omniqueue::backends::InMemoryBackend;
use switchyard_bench::{self as bench, SIZE, env_usize, rate};
use switchyard_core::{Bytes, Message, PublisherExt, SubscribeOptions};
use switchyard_memory::MemoryBroker;

const BATCH: usize = 1000;

async fn switchyard(n: usize, prefetch: usize) -> Duration {
    let client = MemoryBroker::new().client();
    let opts = SubscribeOptions::new("bench").with_prefetch(prefetch);
    client.ensure_subscription("bench", &opts).await.unwrap();
    let mut sub = client.subscribe("bench", opts).await.unwrap();
    let payload = Bytes::from(vec![0xabu8; SIZE]);
    let start = Instant::now();
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut left = n;
            while left > 0 {
                let k = left.min(BATCH);
                let batch = (0..k).map(|_| Message::new(payload.clone())).collect();
                client.publish_all("bench", batch).await.unwrap();
                left -= k;
            }
        })
    };
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.recv())
            .await
            .expect("bench stalled")
            .unwrap();
        d.ack().await.unwrap();
    }
    publisher.await.unwrap();
    start.elapsed()
}

async fn raw_mpsc(n: usize) -> Duration {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    let payload = Bytes::from(vec![0xabu8; SIZE]);
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        for _ in 0..n {
            tx.send(payload.clone()).await.unwrap();
        }
    });
    let mut bytes = 0;
    for _ in 0..n {
        bytes += rx.recv().await.unwrap().len();
    }
    producer.await.unwrap();
    assert_eq!(bytes, n * SIZE);
    start.elapsed()
}

async fn omniqueue(n: usize) -> Duration {
    let (producer, mut consumer) = InMemoryBackend::builder().build_pair().await.unwrap();
    let payload = vec![0xabu8; SIZE];
    let start = Instant::now();
    let publisher = tokio::spawn(async move {
        for _ in 0..n {
            producer.send_raw(&payload).await.unwrap();
        }
    });
    let mut bytes = 0;
    for _ in 0..n {
        let d = consumer.receive().await.unwrap();
        bytes += d.borrow_payload().map_or(0, <[u8]>::len);
        d.ack().await.map_err(|(e, _)| e).unwrap();
    }
    publisher.await.unwrap();
    assert_eq!(bytes, n * SIZE);
    start.elapsed()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let n = env_usize("SY_BENCH_MESSAGES", 1_000_000);
    println!(
        "memory backend, {n} messages of {SIZE} B, publish_batch of {BATCH}, 2 worker threads"
    );
    rt.block_on(async {
        // Warm-up.
        switchyard(n / 10, 256).await;
        let mut best = 0.0_f64;
        for prefetch in [64, 1024] {
            let d = switchyard(n, prefetch).await;
            best = best.max(rate(n, d));
            println!(
                "switchyard memory publish→recv→ack (prefetch {prefetch:>4}): {:>10.0} msg/s ({d:.2?})",
                rate(n, d)
            );
        }
        let raw = rate(n, raw_mpsc(n).await);
        println!("raw tokio mpsc (capacity 1024):                  {raw:>10.0} msg/s");
        let omni = rate(n, omniqueue(n).await);
        println!("omniqueue in-memory send→receive→ack:            {omni:>10.0} msg/s");
        bench::row("memory", "publish→receive→ack (msg/s)", best, "tokio mpsc", raw);
        bench::row("memory", "publish→receive→ack (msg/s)", best, "omniqueue in-memory", omni);
        let client = MemoryBroker::new().client();
        let latency = bench::latency(
            &client,
            "latency",
            SubscribeOptions::new("bench"),
            5_000,
            SIZE,
            1_000.0,
        )
        .await
        .unwrap();
        bench::latency_row("memory", &latency);
    });
}
