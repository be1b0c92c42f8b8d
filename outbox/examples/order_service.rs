//! An order service without the dual-write problem: each order and its
//! `orders.created` event commit in one PostgreSQL transaction; a relay
//! publishes the events to the broker of the URL; a shipping consumer with
//! the Redis dedup store processes each order once — even when every event
//! is delivered a second time.
//!
//! ```text
//! cargo run -p switchyard-outbox --all-features --example order_service                 # memory broker
//! cargo run -p switchyard-outbox --all-features --example order_service -- nats://127.0.0.1:4222
//! ```
//!
//! PostgreSQL and Redis come from `SWITCHYARD_POSTGRES_URL` and
//! `SWITCHYARD_REDIS_URL` (default: the local servers `scripts/brokers.sh` starts).

use std::{
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sqlx::postgres::PgPoolOptions;
use switchyard::{
    Message, SubscribeOptions,
    consumer::{Consumer, Dedup},
};
use switchyard_outbox::{Outbox, RedisDedupStore};

const ORDERS: u64 = 100;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn run(url: &str) -> Result<(), BoxError> {
    let pg = std::env::var("SWITCHYARD_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let redis =
        std::env::var("SWITCHYARD_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let run_id = &switchyard::new_id()[24..];

    let pool = PgPoolOptions::new().max_connections(5).connect(&pg).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS example_orders (id text PRIMARY KEY, customer text NOT NULL, total bigint NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let outbox = Outbox::with_table("example_outbox")?;
    outbox.migrate(&pool).await?;

    let client = switchyard::connect(url).await?;
    let topic = format!("orders.created.{run_id}");
    let shipping = SubscribeOptions::new("shipping");
    client.ensure_subscription(&topic, &shipping).await?;

    // The order and its event: one transaction.
    for n in 0..ORDERS {
        let order = format!("{run_id}-{n}");
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO example_orders (id, customer, total) VALUES ($1, $2, $3)")
            .bind(&order)
            .bind(format!("customer-{}", n % 7))
            .bind(i64::try_from(n)? * 100 + 99)
            .execute(&mut *tx)
            .await?;
        let event = Message::new(format!(r#"{{"order":"{order}"}}"#))
            .with_id(format!("order-created-{order}"))
            .with_key(format!("customer-{}", n % 7));
        outbox.enqueue(&mut tx, &topic, event).await?;
        tx.commit().await?;
    }
    println!("{ORDERS} orders and their events committed");

    // The relay publishes what committed.
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(outbox.relay(pool.clone(), client.clone()).run(async {
        let _ = relay_stopped.await;
    }));

    // Shipping processes each order once.
    let store = RedisDedupStore::connect(&redis, &format!("example-shipping-{run_id}")).await?;
    let dedup = Dedup::new(Arc::new(store), Duration::from_secs(3600));
    let shipped = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&shipped);
    let handler = dedup.wrap(move |_ctx| {
        let counter = Arc::clone(&counter);
        async move {
            counter.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    });
    let sub = client.subscribe(&topic, shipping).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let consumer = tokio::spawn(Consumer::new().with_concurrency(8).run(
        sub,
        handler,
        async move {
            let mut stopped = stopped;
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));

    let wait = |what: &'static str, done: Box<dyn Fn() -> bool + Send>| async move {
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        while !done() {
            if tokio::time::Instant::now() > until {
                return Err::<(), BoxError>(format!("{what}: not within 60 s").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    };
    let s = Arc::clone(&shipped);
    wait(
        "shipping",
        Box::new(move || s.load(Ordering::Relaxed) >= ORDERS),
    )
    .await?;
    println!("shipped {} orders", shipped.load(Ordering::Relaxed));

    // Every event delivered again (as a broker may after a crash).
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT id, customer FROM example_orders WHERE id LIKE $1 || '-%' ORDER BY id",
    )
    .bind(run_id)
    .fetch_all(&pool)
    .await?;
    for (order, customer) in rows {
        let again = Message::new(format!(r#"{{"order":"{order}"}}"#))
            .with_id(format!("order-created-{order}"))
            .with_key(customer);
        client.publish(&topic, again).await?;
    }
    let d = dedup.clone();
    wait("redelivery", Box::new(move || d.duplicates() >= ORDERS)).await?;
    println!(
        "redelivered {ORDERS}: {} skipped as duplicates, {} shipped in all",
        dedup.duplicates(),
        shipped.load(Ordering::Relaxed)
    );

    stop.send(true)?;
    consumer.await??;
    let _ = stop_relay.send(());
    let report = relay.await??;
    println!("relay published {} events", report.published);
    client.close().await?;
    if shipped.load(Ordering::Relaxed) != ORDERS {
        return Err("an order was shipped twice".into());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("SWITCHYARD_URL").ok())
        .unwrap_or_else(|| "memory://orders".into());
    match run(&url).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("order_service failed: {e}");
            ExitCode::FAILURE
        }
    }
}
