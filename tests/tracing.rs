//! The consumer runtime opens one `process` span per delivery, with the
//! OpenTelemetry messaging attributes.
#![cfg(feature = "memory")]

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use switchyard::{Message, SubscribeOptions, consumer::Consumer, memory::MemoryBroker};
use tracing::{
    Event, Id, Metadata, Subscriber,
    field::{Field, Visit},
    span::{Attributes, Record},
};

/// Records every span's name and fields.
#[derive(Default)]
struct Spans {
    spans: Mutex<Vec<(String, HashMap<String, String>)>>,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
}

impl Subscriber for Spans {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push((attrs.metadata().name().to_owned(), fields));
        Id::from_u64(spans.len() as u64)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut spans = self.spans.lock().unwrap();
        let index = usize::try_from(span.into_u64()).unwrap() - 1;
        if let Some((_, fields)) = spans.get_mut(index) {
            values.record(&mut Fields(fields));
        }
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[tokio::test(flavor = "current_thread")]
async fn one_process_span_per_delivery_with_messaging_attributes() {
    let spans = Arc::new(Spans::default());
    let _guard = tracing::subscriber::set_default(Arc::clone(&spans));
    let client = MemoryBroker::new().client();
    let opts = SubscribeOptions::new("billing");
    client.ensure_subscription("orders", &opts).await.unwrap();
    for i in 0..3 {
        client
            .publish("orders", Message::new("x").with_id(format!("m{i}")))
            .await
            .unwrap();
    }
    let handled = Arc::new(AtomicUsize::new(0));
    let h = Arc::clone(&handled);
    let stop = {
        let handled = Arc::clone(&handled);
        async move {
            let start = std::time::Instant::now();
            while handled.load(Ordering::SeqCst) < 3 {
                assert!(start.elapsed() < Duration::from_secs(10), "not handled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let sub = client.subscribe("orders", opts).await.unwrap();
    let report = Consumer::new()
        .run(
            sub,
            move |_ctx| {
                h.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            },
            stop,
        )
        .await
        .unwrap();
    assert_eq!(report.acked, 3);
    let spans = spans.spans.lock().unwrap();
    let process: Vec<_> = spans.iter().filter(|(name, _)| name == "process").collect();
    assert_eq!(process.len(), 3, "one span per delivery");
    let mut ids: Vec<&str> = process
        .iter()
        .map(|(_, f)| f["messaging.message.id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["m0", "m1", "m2"]);
    for (_, f) in &process {
        assert_eq!(f["messaging.destination.name"], "orders");
        assert_eq!(f["messaging.consumer.group.name"], "billing");
        assert_eq!(f["messaging.delivery.attempt"], "1");
        assert_eq!(f["outcome"], "acked");
    }
}
