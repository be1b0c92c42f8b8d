//! Order → payment → inventory: two services consume one topic (fan-out)
//! with the consumer runtime. Payment fails transiently once and succeeds on
//! the retry; inventory rejects a poison order, which ends in its dead-letter
//! topic with the reason.
//!
//! ```text
//! cargo run --example order_pipeline                          # in-process broker
//! cargo run --features nats --example order_pipeline -- nats://127.0.0.1:4222
//! ```

use std::{
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use switchyard::{
    Client, Message, SubscribeOptions,
    consumer::{Backoff, Consumer, HandlerContext, HandlerError},
    headers,
};

const ORDERS: usize = 5;
const BOUND: Duration = Duration::from_secs(60);

/// Finishes when `count` reaches `target`, or after `BOUND`.
async fn until(count: Arc<AtomicUsize>, target: usize) {
    let start = Instant::now();
    while count.load(Ordering::SeqCst) < target && start.elapsed() < BOUND {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn payment(ctx: HandlerContext, done: Arc<AtomicUsize>) -> Result<(), HandlerError> {
    let order = String::from_utf8_lossy(ctx.message.payload()).into_owned();
    if order.contains("flaky-card") && ctx.attempt == 1 {
        println!(
            "  payment   {}: card processor timed out (attempt 1), will retry",
            ctx.message.id()
        );
        return Err(HandlerError::transient("card processor timeout"));
    }
    println!(
        "  payment   {}: charged (attempt {})",
        ctx.message.id(),
        ctx.attempt
    );
    done.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

async fn inventory(ctx: HandlerContext, done: Arc<AtomicUsize>) -> Result<(), HandlerError> {
    let order = String::from_utf8_lossy(ctx.message.payload()).into_owned();
    done.fetch_add(1, Ordering::SeqCst);
    if order.contains("sku=???") {
        println!(
            "  inventory {}: unknown SKU, dead-lettering",
            ctx.message.id()
        );
        return Err(HandlerError::permanent("unknown SKU ???"));
    }
    println!("  inventory {}: reserved", ctx.message.id());
    Ok(())
}

async fn run(url: &str) -> switchyard::Result<()> {
    let client: Client = switchyard::connect(url).await?;
    println!(
        "order pipeline on {} ({url})",
        client.capabilities().backend
    );
    let topic = format!("orders.created.{}", &switchyard::new_id()[24..]);
    let pay = SubscribeOptions::new("payment").with_max_attempts(3);
    let inv = SubscribeOptions::new("inventory").with_max_attempts(3);
    client.ensure_subscription(&topic, &pay).await?;
    client.ensure_subscription(&topic, &inv).await?;

    let orders = [
        ("order-1", "customer-1", "sku=book qty=1"),
        ("order-2", "customer-2", "sku=lamp qty=2 card=flaky-card"),
        ("order-3", "customer-1", "sku=pen qty=10"),
        ("order-4", "customer-3", "sku=??? qty=1"),
        ("order-5", "customer-2", "sku=desk qty=1"),
    ];
    for (id, customer, body) in orders {
        client
            .publish(&topic, Message::new(body).with_id(id).with_key(customer))
            .await?;
        println!("published {id} for {customer}: {body}");
    }

    let consumer = Consumer::new()
        .with_concurrency(4)
        .with_per_key(true)
        .with_backoff(Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(5),
        ));
    let paid = Arc::new(AtomicUsize::new(0));
    let stocked = Arc::new(AtomicUsize::new(0));
    let payments = {
        let sub = client.subscribe(&topic, pay.clone()).await?;
        let (done, stop) = (Arc::clone(&paid), until(Arc::clone(&paid), ORDERS));
        tokio::spawn(
            consumer
                .clone()
                .run(sub, move |ctx| payment(ctx, Arc::clone(&done)), stop),
        )
    };
    let stock = {
        let sub = client.subscribe(&topic, inv.clone()).await?;
        let (done, stop) = (Arc::clone(&stocked), until(Arc::clone(&stocked), ORDERS));
        tokio::spawn(consumer.run(sub, move |ctx| inventory(ctx, Arc::clone(&done)), stop))
    };
    let pay_report = payments.await.expect("payment service panicked")?;
    let inv_report = stock.await.expect("inventory service panicked")?;
    println!("payment:   {pay_report:?}");
    println!("inventory: {inv_report:?}");

    let mut dlq = client
        .subscribe(
            &inv.dead_letter_topic_for(&topic),
            SubscribeOptions::dead_letters(),
        )
        .await?;
    let dead = tokio::time::timeout(Duration::from_secs(10), dlq.recv())
        .await
        .map_err(|_| switchyard::Error::Timeout {
            operation: "reading the dead-letter topic",
            after: Duration::from_secs(10),
        })??;
    let h = dead.message().headers();
    println!(
        "dead letter {}: reason={:?} attempts={} from {}/{}",
        dead.message().id(),
        h.get(headers::DEAD_LETTER_REASON).unwrap_or_default(),
        h.get(headers::ATTEMPTS).unwrap_or_default(),
        h.get(headers::ORIGINAL_TOPIC).unwrap_or_default(),
        h.get(headers::ORIGINAL_SUBSCRIPTION).unwrap_or_default(),
    );
    dead.ack().await?;
    dlq.close().await?;
    client.close().await?;
    let ok = pay_report.acked == ORDERS as u64
        && pay_report.retried == 1
        && inv_report.acked == ORDERS as u64 - 1
        && inv_report.dead_lettered == 1;
    if !ok {
        return Err(switchyard::Error::Config(
            "the pipeline did not end as expected".into(),
        ));
    }
    println!("done: 5 paid (one after a retry), 4 reserved, 1 dead-lettered");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("SWITCHYARD_URL").ok())
        .unwrap_or_else(|| "memory://order-pipeline".to_owned());
    match run(&url).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("order pipeline failed: {e}");
            ExitCode::FAILURE
        }
    }
}
