//! Memory backend throughput: publish → receive → ack of 256-byte messages,
//! next to a raw tokio mpsc pipeline moving the same payloads.
//!
//! `cargo bench -p switchyard-memory` (set `SY_BENCH_MESSAGES` to change the count).

use std::time::{Duration, Instant};

use switchyard_core::{Bytes, Message, PublisherExt, SubscribeOptions};
use switchyard_memory::MemoryBroker;

const SIZE: usize = 256;
const BATCH: usize = 1000;

fn count() -> usize {
    std::env::var("SY_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

async fn switchyard(n: usize, prefetch: usize) -> Duration {
    let client = MemoryBroker::new().client();
    let opts = SubscribeOptions::new("bench").prefetch(prefetch);
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

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let n = count();
    println!(
        "memory backend, {n} messages of {SIZE} B, publish_batch of {BATCH}, 2 worker threads"
    );
    rt.block_on(async {
        // Warm-up.
        switchyard(n / 10, 256).await;
        for prefetch in [64, 1024] {
            let d = switchyard(n, prefetch).await;
            println!(
                "switchyard memory publish→recv→ack (prefetch {prefetch:>4}): {:>10.0} msg/s ({d:.2?})",
                rate(n, d)
            );
        }
        let d = raw_mpsc(n).await;
        println!("raw tokio mpsc (capacity 1024):                  {:>10.0} msg/s ({d:.2?})", rate(n, d));
    });
}
