//! The switchyard flow in one screen: publish, consume, ack, nack and see the
//! message come back with attempt 2, dead-letter one and read it back from the
//! dead-letter topic.
//!
//! ```text
//! cargo run --example quickstart                      # in-process memory broker
//! cargo run --example quickstart -- nats://127.0.0.1:4222   # any compiled-in backend
//! SWITCHYARD_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example quickstart
//! ```

use std::{process::ExitCode, time::Duration};

use switchyard::{Delivery, Message, Retry, SubscribeOptions, Subscription, headers};

const WAIT: Duration = Duration::from_secs(10);

async fn next(sub: &mut Subscription) -> switchyard::Result<Delivery> {
    tokio::time::timeout(WAIT, sub.recv())
        .await
        .map_err(|_| switchyard::Error::Timeout {
            operation: "receive",
            after: WAIT,
        })?
}

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(d.message().payload()).into_owned()
}

async fn run(url: &str) -> switchyard::Result<()> {
    println!("connecting to {url}");
    let client = switchyard::connect(url).await?;
    let caps = client.capabilities();
    println!(
        "backend: {} (max payload {} bytes)",
        caps.backend, caps.max_payload
    );

    // Unique names so the example can run again against a persistent broker.
    let run_id = &switchyard::new_id()[24..];
    let topic = format!("quickstart.orders.{run_id}");
    let opts = SubscribeOptions::new("billing").with_max_attempts(3);
    client.ensure_subscription(&topic, &opts).await?;
    println!(
        "1. subscription `billing` on `{topic}` ensured (dead letters go to `{}`)",
        opts.dead_letter_topic_for(&topic)
    );

    for (id, body) in [
        ("order-1", "ok"),
        ("order-2", "flaky"),
        ("order-3", "poison"),
    ] {
        client
            .publish(
                &topic,
                Message::new(body)
                    .with_id(id)
                    .with_key("customer-7")
                    .with_header("source", "quickstart"),
            )
            .await?;
        println!("2. published {id} ({body}), confirmed by the broker");
    }

    let mut sub = client.subscribe(&topic, opts.clone()).await?;
    let mut done = 0;
    while done < 3 {
        let d = next(&mut sub).await?;
        let id = d.message().id().to_owned();
        println!("3. received {id} ({}) attempt {}", text(&d), d.attempt());
        match (text(&d).as_str(), d.attempt()) {
            ("flaky", 1) => {
                println!("   -> nack {id}: transient failure, retry after 100 ms");
                d.nack(Retry::after(Duration::from_millis(100))).await?;
            }
            ("flaky", n) => {
                println!("   -> {id} came back with attempt {n}; ack");
                d.ack().await?;
                done += 1;
            }
            ("poison", _) => {
                println!("   -> dead-letter {id}: cannot be processed");
                d.dead_letter("quickstart: poison order").await?;
                done += 1;
            }
            _ => {
                println!("   -> ack {id}");
                d.ack().await?;
                done += 1;
            }
        }
    }
    sub.close().await?;

    let dlq = opts.dead_letter_topic_for(&topic);
    let mut dead = client
        .subscribe(&dlq, SubscribeOptions::dead_letters())
        .await?;
    let d = next(&mut dead).await?;
    let h = d.message().headers();
    println!(
        "4. from `{dlq}`: {} reason={:?} attempts={} original-topic={} dead-lettered-at={}",
        d.message().id(),
        h.get(headers::DEAD_LETTER_REASON).unwrap_or_default(),
        h.get(headers::ATTEMPTS).unwrap_or_default(),
        h.get(headers::ORIGINAL_TOPIC).unwrap_or_default(),
        h.get(headers::DEAD_LETTERED_AT).unwrap_or_default(),
    );
    d.ack().await?;
    dead.close().await?;
    client.close().await?;
    println!("done");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("SWITCHYARD_URL").ok())
        .unwrap_or_else(|| "memory://quickstart".to_owned());
    match run(&url).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart failed: {e}");
            ExitCode::FAILURE
        }
    }
}
