//! The trace context of the code that enqueued an event is stored with its
//! row and continues when the relay publishes it (switchyard's `otel`
//! feature), on the real PostgreSQL.

use std::time::Duration;

use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{InMemorySpanExporter, SdkTracerProvider},
};
use sqlx::postgres::PgPoolOptions;
use switchyard::{Message, SubscribeOptions};
use switchyard_conformance::broker_url;
use switchyard_outbox::Outbox;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enqueuing_trace_continues_at_publish() {
    let Some(pg) = broker_url("SWITCHYARD_POSTGRES_URL") else {
        return;
    };
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(InMemorySpanExporter::default())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-test")));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let id = uuid::Uuid::now_v7().simple().to_string();
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&pg)
        .await
        .unwrap();
    let outbox = Outbox::with_table(&format!("sy_test_outbox_trace_{}", &id[20..])).unwrap();
    outbox.migrate(&pool).await.unwrap();
    let client = switchyard::connect(&format!("memory://trace-{id}"))
        .await
        .unwrap();
    let opts = SubscribeOptions::new("s");
    client
        .ensure_subscription("orders.created", &opts)
        .await
        .unwrap();

    // The transaction that writes the event runs in a span of its own.
    let span = tracing::info_span!("place_order");
    let trace_id = span.context().span().span_context().trace_id();
    assert!(trace_id != opentelemetry::trace::TraceId::INVALID);
    {
        let _entered = span.enter();
        let mut tx = pool.begin().await.unwrap();
        outbox
            .enqueue(&mut tx, "orders.created", Message::new("order 1"))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let stored: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT headers->>'traceparent' FROM {}",
        outbox.table()
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        stored.contains(&trace_id.to_string()),
        "stored {stored}, trace {trace_id}"
    );

    // Published later, outside that span: the delivery carries the same trace.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(outbox.relay(pool.clone(), client.clone()).run(async {
        let _ = stopped.await;
    }));
    let mut sub = client.subscribe("orders.created", opts).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(30), sub.recv())
        .await
        .expect("delivered within 30 s")
        .unwrap();
    let cx = switchyard::telemetry::extract(delivery.message());
    assert_eq!(cx.span().span_context().trace_id(), trace_id);
    delivery.ack().await.unwrap();
    let _ = stop.send(());
    relay.await.unwrap().unwrap();
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TABLE {}",
        outbox.table()
    )))
    .execute(&pool)
    .await;
}
