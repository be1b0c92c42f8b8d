//! Trace context in headers (feature `otel`) and runtime metrics (feature
//! `metrics`); without the features every function here is a no-op.
//!
//! # Trace context
//!
//! With `otel`, [`Client::publish`](crate::Client::publish) and
//! [`publish_batch`](crate::Client::publish_batch) inject the current
//! [`tracing`] span's OpenTelemetry context into each message's headers
//! (W3C `traceparent` / `tracestate` with the usual propagator) unless the
//! message already carries a `traceparent` (a bridged or redriven message
//! keeps its own), and the consumer runtime makes that context the parent
//! of its `process` span, so one trace crosses every broker. The injection
//! uses OpenTelemetry's global propagator, which the application installs
//! once, as for any OpenTelemetry instrumentation:
//!
//! ```
//! opentelemetry::global::set_text_map_propagator(
//!     opentelemetry_sdk::propagation::TraceContextPropagator::new(),
//! );
//! ```
//!
//! # Metrics
//!
//! With `metrics`, the consumer runtime records through the [`metrics`
//! facade](https://docs.rs/metrics), labelled with `topic` and
//! `subscription`: counters `switchyard_received_total`,
//! `switchyard_acked_total`, `switchyard_nacked_total`,
//! `switchyard_dead_lettered_total`, and the histogram
//! `switchyard_handler_seconds` (handler latency, labelled with `outcome`
//! too). Install any `metrics` recorder (Prometheus, StatsD, …) to collect
//! them.

#[cfg(feature = "otel")]
use crate::Headers;
use crate::Message;

#[cfg(feature = "otel")]
struct Inject<'a>(&'a mut Headers);

#[cfg(feature = "otel")]
impl opentelemetry::propagation::Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

#[cfg(feature = "otel")]
struct Extract<'a>(&'a Headers);

#[cfg(feature = "otel")]
impl opentelemetry::propagation::Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().collect()
    }
}

/// The OpenTelemetry context a message carries in its headers (feature
/// `otel`): the parent to give a span that processes it.
///
/// # Examples
///
/// ```
/// use switchyard_core::{Message, telemetry};
/// let cx = telemetry::extract(&Message::new("no trace"));
/// use opentelemetry::trace::TraceContextExt as _;
/// assert!(!cx.span().span_context().is_valid());
/// ```
#[cfg(feature = "otel")]
#[must_use]
pub fn extract(message: &Message) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extract(message.headers())))
}

/// `message` with the current [`tracing`] span's OpenTelemetry context in
/// its headers (W3C `traceparent` / `tracestate`), unless it carries a
/// `traceparent` already; without the `otel` feature, `message` unchanged.
///
/// [`Client::publish`](crate::Client::publish) does this itself; call it
/// where a message is stored to be published later (an outbox row), so the
/// trace of the code that wrote it continues when it is published.
///
/// # Examples
///
/// ```
/// use switchyard_core::{Message, telemetry};
/// // Outside any span (or without `otel`), nothing is added.
/// let msg = telemetry::inject(Message::new("order 1"));
/// assert!(msg.headers().get("traceparent").is_none());
/// ```
#[must_use]
pub fn inject(message: Message) -> Message {
    #[cfg(feature = "otel")]
    {
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let mut message = message;
        if !message.headers().contains_key("traceparent") {
            let cx = tracing::Span::current().context();
            opentelemetry::global::get_text_map_propagator(|p| {
                p.inject_context(&cx, &mut Inject(message.headers_mut()));
            });
        }
        message
    }
    #[cfg(not(feature = "otel"))]
    message
}

/// Makes the message's context the parent of `span`.
pub(crate) fn set_parent(span: &tracing::Span, message: &Message) {
    #[cfg(feature = "otel")]
    {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let cx = extract(message);
        if cx.span().span_context().is_valid() {
            // Fails only when the span is disabled or already started.
            let _ = span.set_parent(cx);
        }
    }
    #[cfg(not(feature = "otel"))]
    let _ = (span, message);
}

/// Counts a delivery handed to the runtime.
pub(crate) fn received(topic: &str, subscription: &str) {
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "switchyard_received_total",
        "topic" => topic.to_owned(),
        "subscription" => subscription.to_owned()
    )
    .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (topic, subscription);
}

/// What a settled delivery's metrics are labelled with; empty without the
/// `metrics` feature, so the runtime copies nothing for them.
pub(crate) struct Labels {
    #[cfg(feature = "metrics")]
    topic: String,
    #[cfg(feature = "metrics")]
    subscription: String,
}

impl Labels {
    pub(crate) fn of(delivery: &crate::Delivery) -> Self {
        #[cfg(feature = "metrics")]
        return Self {
            topic: delivery.topic().to_owned(),
            subscription: delivery.subscription().to_owned(),
        };
        #[cfg(not(feature = "metrics"))]
        {
            let _ = delivery;
            Self {}
        }
    }
}

/// Records how a delivery ended (`acked`, `retried` or `dead-lettered`)
/// and how long its handler ran.
pub(crate) fn settled(labels: &Labels, outcome: &'static str, handler: std::time::Duration) {
    #[cfg(feature = "metrics")]
    {
        let name = match outcome {
            "acked" => "switchyard_acked_total",
            "retried" => "switchyard_nacked_total",
            _ => "switchyard_dead_lettered_total",
        };
        let pairs = [
            ("topic", labels.topic.clone()),
            ("subscription", labels.subscription.clone()),
        ];
        metrics::counter!(name, &pairs).increment(1);
        metrics::histogram!(
            "switchyard_handler_seconds",
            "topic" => labels.topic.clone(),
            "subscription" => labels.subscription.clone(),
            "outcome" => outcome
        )
        .record(handler.as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (labels, outcome, handler);
}
