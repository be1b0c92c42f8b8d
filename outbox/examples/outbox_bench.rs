//! A benchmark, not a test: events through the outbox and its relay next
//! to publishing directly after the commit, on the real PostgreSQL, in one
//! run (alternating rounds, medians).
//!
//! ```text
//! cargo run --release -p switchyard-outbox --example outbox_bench -- [URL] [EVENTS] [ROUNDS]
//! ```
//!
//! Each round writes `EVENTS` rows (one transaction each, one producer,
//! 64 keys) and receives every event on one subscription. *direct*: commit,
//! then `publish`. *outbox*: `enqueue` in the transaction, commit; a relay
//! publishes. Throughput is events from the first commit to the last
//! delivery; latency is commit → delivery per event (p50, p99).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sqlx::{PgPool, postgres::PgPoolOptions};
use switchyard::{Client, Message, SubscribeOptions};
use switchyard_outbox::Outbox;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Round {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

async fn round(
    client: &Client,
    pool: &PgPool,
    outbox: Option<&Outbox>,
    events: usize,
) -> Result<Round, BoxError> {
    let topic = format!("sy-bench.outbox.{}", &switchyard::new_id()[24..]);
    let opts = SubscribeOptions::new("bench");
    client.ensure_subscription(&topic, &opts).await?;
    let mut sub = client.subscribe(&topic, opts).await?;
    let committed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let receiver = {
        let committed = Arc::clone(&committed);
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(events);
            while latencies.len() < events {
                let d = tokio::time::timeout(Duration::from_secs(60), sub.recv())
                    .await
                    .map_err(|_| "no delivery within 60 s")??;
                let at = Instant::now();
                let sent = committed.lock().unwrap().get(d.message().id()).copied();
                d.ack().await?;
                if let Some(sent) = sent {
                    latencies.push(at.saturating_duration_since(sent));
                }
            }
            Ok::<_, BoxError>((latencies, Instant::now()))
        })
    };
    let relay = outbox.map(|o| {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(o.relay(pool.clone(), client.clone()).run(async {
            let _ = stopped.await;
        }));
        (stop, task)
    });
    let start = Instant::now();
    for n in 0..events {
        let message = Message::new(format!("event {n}")).with_key(format!("key-{}", n % 64));
        let id = message.id().to_owned();
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO bench_orders (id, n) VALUES ($1, $2)")
            .bind(&id)
            .bind(i64::try_from(n)?)
            .execute(&mut *tx)
            .await?;
        if let Some(o) = outbox {
            o.enqueue(&mut tx, &topic, message.clone()).await?;
        }
        // Recorded before the commit returns: a relay may deliver before
        // this task runs again.
        committed.lock().unwrap().insert(id, Instant::now());
        tx.commit().await?;
        if outbox.is_none() {
            client.publish(&topic, message).await?;
        }
    }
    let (mut latencies, end) = receiver.await??;
    if let Some((stop, task)) = relay {
        let _ = stop.send(());
        task.await??;
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Ok(Round {
        per_sec: events as f64 / end.duration_since(start).as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "memory://bench".into());
    let events: usize = args.next().map_or(Ok(2000), |s| s.parse())?;
    let rounds: usize = args.next().map_or(Ok(3), |s| s.parse())?;
    let pg = std::env::var("SWITCHYARD_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pool = PgPoolOptions::new().max_connections(8).connect(&pg).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_orders (id text PRIMARY KEY, n bigint NOT NULL)")
        .execute(&pool)
        .await?;
    let outbox = Outbox::with_table("bench_outbox")?;
    outbox.migrate(&pool).await?;
    let client = switchyard::connect(&url).await?;
    println!("outbox vs direct publish on {url}: {events} events per round, {rounds} rounds");
    let mut results: HashMap<&str, Vec<Round>> = HashMap::new();
    for _ in 0..rounds {
        for (name, o) in [("direct", None), ("outbox", Some(&outbox))] {
            let r = round(&client, &pool, o, events).await?;
            results.entry(name).or_default().push(r);
        }
    }
    println!("| path | events/s | commit→delivery p50 | p99 |");
    println!("|---|---|---|---|");
    let mut rates = HashMap::new();
    for name in ["direct", "outbox"] {
        let rs = &results[name];
        let rate = median(rs.iter().map(|r| r.per_sec).collect());
        let p50 = median(rs.iter().map(|r| r.p50.as_secs_f64() * 1e3).collect());
        let p99 = median(rs.iter().map(|r| r.p99.as_secs_f64() * 1e3).collect());
        println!("| {name} | {rate:.0} | {p50:.1} ms | {p99:.1} ms |");
        rates.insert(name, rate);
    }
    println!(
        "outbox / direct throughput: {:.2}",
        rates["outbox"] / rates["direct"]
    );
    sqlx::query("TRUNCATE bench_orders").execute(&pool).await?;
    client.close().await?;
    Ok(())
}
