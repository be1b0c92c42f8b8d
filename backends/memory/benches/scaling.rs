//! How consume throughput grows with consumers and payload size: 1, 2, 4
//! and 8 consumers on one subscription, 1 KiB and 64 KiB payloads,
//! switchyard's memory backend next to an `async-channel` (a multi-consumer
//! channel, the raw form of N workers on one queue) in the same run.
//!
//! `cargo bench -p switchyard-memory --bench scaling` (`SY_BENCH_MESSAGES`:
//! messages of 1 KiB per measurement, default 1,000,000; a tenth of that of
//! 64 KiB). Writes `scaling-memory.csv` to `$SY_BENCH_OUT` (default
//! `target/bench`), which `scripts/plot_scaling.py` draws.
//!
//! Each measurement fills the subscription (and the channel) with the
//! messages first, then takes them with N tasks: switchyard handles that
//! receive and ack each delivery (with its ack deadline, attempt count and
//! prefetch), channel receivers that take each payload (a channel has no
//! ack). The clock runs from the first delivery to the last ack. Each point
//! is the mean of two measurements, each client going first once.

use std::time::Duration;

use switchyard_bench::{
    self as bench, env_usize,
    scaling::{self, CONSUMERS, PREFETCH, Table, Tally},
};
use switchyard_core::{Bytes, SubscribeOptions};
use switchyard_memory::MemoryBroker;

const BOUND: Duration = Duration::from_secs(600);

/// Raw: `consumers` receivers on an unbounded `async-channel` holding `n`
/// payloads of `size` bytes; from the first receive to the `n`-th.
async fn raw_consume(n: usize, size: usize, consumers: usize) -> Duration {
    let (tx, rx) = async_channel::unbounded::<Bytes>();
    let payload = Bytes::from(vec![0xab; size]);
    for _ in 0..n {
        tx.try_send(payload.clone()).unwrap();
    }
    let tally = Tally::new(n);
    let mut tasks = Vec::new();
    for _ in 0..consumers {
        let (rx, tally) = (rx.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut bytes = 0;
            loop {
                let p = tokio::select! {
                    p = rx.recv() => p.unwrap(),
                    () = tally.finished() => break,
                };
                tally.started();
                bytes += p.len();
                if tally.add(1) {
                    break;
                }
            }
            bytes
        }));
    }
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await.unwrap();
    }
    assert_eq!(bytes, n * size);
    tally.span().expect("a delivery")
}

async fn run(n: usize) {
    let client = MemoryBroker::new().client();
    println!("memory backend: consumers {CONSUMERS:?}, prefetch {PREFETCH} each");
    let mut table = Table::new("memory", "async-channel");
    for (size, count) in scaling::sizes(n) {
        for consumers in CONSUMERS {
            let topic = format!("scaling.{size}.{consumers}");
            let opts = SubscribeOptions::new("sy").with_prefetch(PREFETCH);
            client.ensure_subscription(&topic, &opts).await.unwrap();
            let (client, topic) = (&client, &topic);
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
                    async || raw_consume(count, size, consumers).await,
                    async || {
                        bench::consume_shared(client, topic, opts.clone(), count, consumers, 1)
                            .await
                            .unwrap()
                    },
                )
                .await;
        }
    }
    table.write("memory").unwrap();
    client.close().await.unwrap();
}

fn main() {
    let n = env_usize("SY_BENCH_MESSAGES", 1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(BOUND, run(n))
            .await
            .expect("benchmark exceeded its time bound");
    });
}
