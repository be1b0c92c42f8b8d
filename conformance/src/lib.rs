//! The one conformance suite every switchyard backend runs.
//!
//! A backend implements [`Harness`] (how to reach the broker and which
//! timings to use) and expands [`conformance_tests!`] in its tests: one
//! `#[tokio::test]` per case, so each case passes or fails by name. The cases
//! are plain `pub async fn`s in [`cases`], callable on their own.
//!
//! This crate's API is not stable: it follows what the suite needs. Depend
//! on it as a dev-dependency with an exact version.
//!
//! Every wait is bounded: a missing message fails the case, it never hangs.
//! Delivery is at-least-once, so cases compare sets of ids; where a case
//! asserts "no duplicates", a repeat is tolerated only when the broker itself
//! reports it as a redelivery (`attempt > 1`).
//!
//! [`Capabilities`](switchyard_core::Capabilities) decide which cases do not
//! apply; a skipped case prints why (to stderr, past the test harness's
//! output capture).
//!
//! # Example
//!
//! ```
//! use switchyard_conformance::{Harness, Timing};
//! use switchyard_core::{Client, Result};
//!
//! #[derive(Debug)]
//! struct MyHarness;
//!
//! #[async_trait::async_trait]
//! impl Harness for MyHarness {
//!     async fn client(&self) -> Result<Client> {
//!         unimplemented!("connect to the broker under test")
//!     }
//!     fn timing(&self) -> Timing {
//!         Timing::LOOPBACK
//!     }
//! }
//!
//! async fn harness() -> Option<MyHarness> {
//!     // None skips every case, e.g. when SWITCHYARD_MY_URL is unset:
//!     switchyard_conformance::broker_url("SWITCHYARD_MY_URL").map(|_url| MyHarness)
//! }
//!
//! // In tests/it/main.rs:
//! // switchyard_conformance::conformance_tests!(harness);
//! ```

use std::{fmt, future::Future, io::Write as _, pin::Pin, time::Duration};

use async_trait::async_trait;
use switchyard_core::{Client, Result};

pub mod cases;
mod child;
#[cfg(feature = "containers")]
pub mod containers;
pub mod fault;
pub mod runtime;
mod util;

#[doc(hidden)]
pub use child::scoped;

/// How the suite reaches one backend.
#[async_trait]
pub trait Harness: Send + Sync + fmt::Debug {
    /// A new, independent connection to the broker under test. Cases that
    /// simulate a consumer restart call it more than once.
    ///
    /// # Errors
    ///
    /// When the broker cannot be reached (the case fails).
    async fn client(&self) -> Result<Client>;

    /// A connection made through the URL entry point (`switchyard::connect`
    /// or the backend's own `connect(url)`), for the `connect_and_dyn` case.
    /// Defaults to [`Harness::client`].
    ///
    /// # Errors
    ///
    /// When the broker cannot be reached.
    async fn connect_url(&self) -> Result<Client> {
        self.client().await
    }

    /// A new client from a URL of this backend (the backend's own
    /// `connect(url)`), for the cases that connect to an address of their
    /// own ([`Harness::url_at`]). Defaults to an [`Error::Config`] saying
    /// the harness connects to no URL.
    ///
    /// [`Error::Config`]: switchyard_core::Error::Config
    ///
    /// # Errors
    ///
    /// When the connect fails (what the cases check).
    async fn connect(&self, url: &str) -> Result<Client> {
        let _ = url;
        Err(switchyard_core::Error::Config(
            "the harness connects to no URL".into(),
        ))
    }

    /// The URL of a broker of this backend said to be at `addr` (a loopback
    /// port the case chose) with this connect timeout, for the cases where
    /// nothing listens there or a peer accepts and never answers; `None`
    /// (the default) where the backend has no address (an in-process
    /// broker), which skips them.
    fn url_at(&self, addr: std::net::SocketAddr, connect_timeout: Duration) -> Option<String> {
        let _ = (addr, connect_timeout);
        None
    }

    /// The timings the suite waits by ([`Timing`]); the methods below read
    /// it.
    fn timing(&self) -> Timing {
        Timing::default()
    }

    /// A short ack timeout the broker honours, used by the cases that wait
    /// for redelivery of unsettled messages.
    fn ack_timeout(&self) -> Duration {
        self.timing().ack_timeout
    }

    /// The longest the suite waits for one expected message before failing.
    fn receive_timeout(&self) -> Duration {
        self.timing().receive_timeout
    }

    /// How late a redelivery may be, on top of a requested delay or the ack
    /// timeout.
    fn slack(&self) -> Duration {
        self.timing().slack
    }

    /// The bound on one whole case.
    fn case_timeout(&self) -> Duration {
        Duration::from_secs(180)
    }

    /// A broker instance of the harness's own that the fault cases may
    /// kill and restart ([`fault::PrivateBroker`]); `None` (the default)
    /// where the broker cannot be restarted with its data (an emulator
    /// that keeps everything in memory).
    async fn private_broker(&self) -> Option<Box<dyn fault::PrivateBroker>> {
        None
    }

    /// A cluster of the harness's own ([`fault::Cluster`]: several nodes,
    /// replicated streams or queues), for the cluster cases; `None` (the
    /// default) skips them.
    async fn cluster(&self) -> Option<Box<dyn fault::Cluster>> {
        None
    }

    /// The broker under test behind a cuttable [`fault::Link`], for the
    /// network fault cases; `None` (the default) skips them.
    async fn linked(&self) -> Option<Box<dyn fault::Linked>> {
        None
    }

    /// Deletes, as an operator would with the broker's own tools, what the
    /// subscription `subscription` of `topic` reads from (its queue, its
    /// durable consumer, its topic, …), for
    /// [`fault::fault_deleted_subscription_surfaces`]. `Err(why)` where
    /// the broker under test cannot delete it (the default: an in-process
    /// broker has no operator), which skips that case saying why.
    ///
    /// # Errors
    ///
    /// Why the deletion cannot be done on this broker.
    ///
    /// # Panics
    ///
    /// When the broker refuses a deletion it can do.
    async fn delete_subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> std::result::Result<(), String> {
        let _ = (topic, subscription);
        Err("the harness has no way to delete a subscription's resource".into())
    }

    /// A broker whose credentials the harness can revoke
    /// ([`fault::Revocable`]), for
    /// [`fault::fault_refused_credentials_surface`]; `None` (the default)
    /// skips it (a broker that checks no credentials).
    async fn revocable(&self) -> Option<Box<dyn fault::Revocable>> {
        None
    }

    /// A fresh name, unique per call, for a topic or subscription.
    fn unique(&self, prefix: &str) -> String {
        format!("sy-conf.{prefix}.{}", util::short_id())
    }
}

/// The timings a harness gives the suite ([`Harness::timing`]).
///
/// ```
/// use std::time::Duration;
/// use switchyard_conformance::Timing;
///
/// // A broker across loopback, whose consumers redeliver in whole seconds
/// // and are a little later than NATS or RabbitMQ:
/// let timing = Timing { slack: Duration::from_millis(2500), ..Timing::LOOPBACK };
/// assert_eq!(timing.ack_timeout, Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A short ack timeout the broker honours, used by the cases that wait
    /// for redelivery of unsettled messages.
    pub ack_timeout: Duration,
    /// The longest the suite waits for one expected message before failing.
    pub receive_timeout: Duration,
    /// How late a redelivery may be, on top of a requested delay or the ack
    /// timeout.
    pub slack: Duration,
}

impl Timing {
    /// A broker on this machine, reached over loopback: 1 s ack timeout,
    /// 10 s to receive, 1.5 s late at most.
    pub const LOOPBACK: Self = Self {
        ack_timeout: Duration::from_secs(1),
        receive_timeout: Duration::from_secs(10),
        slack: Duration::from_millis(1500),
    };
}

impl Default for Timing {
    /// 2 s ack timeout, 15 s to receive, 3 s late at most.
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(2),
            receive_timeout: Duration::from_secs(15),
            slack: Duration::from_secs(3),
        }
    }
}

/// The result of a case that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every assertion held.
    Passed,
    /// The case does not apply to this backend; says why.
    Skipped(String),
}

/// A boxed case future.
pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// Runs one case with its time bound, panicking on failure or timeout and
/// printing a skip reason.
///
/// # Panics
///
/// When the case fails or exceeds [`Harness::case_timeout`].
pub async fn run<'a>(harness: &'a dyn Harness, name: &str, case: CaseFuture<'a>) {
    let bound = harness.case_timeout();
    match tokio::time::timeout(bound, case).await {
        Err(_) => panic!("conformance case `{name}` did not finish within {bound:?}"),
        Ok(Outcome::Passed) => {}
        Ok(Outcome::Skipped(why)) => {
            // Written to the real stderr: the test harness captures only print!.
            let _ = writeln!(
                std::io::stderr(),
                "conformance case `{name}` SKIPPED: {why}"
            );
        }
    }
}

/// Reads a broker URL from the environment variable `var`.
///
/// When it is unset, prints that the broker tests are skipped and returns
/// `None` — unless `SWITCHYARD_REQUIRE_BROKERS=1` (set by CI), where a missing
/// broker fails loudly.
///
/// # Panics
///
/// When `var` is unset and `SWITCHYARD_REQUIRE_BROKERS=1`.
#[must_use]
pub fn broker_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let required = std::env::var("SWITCHYARD_REQUIRE_BROKERS").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "{var} is not set but SWITCHYARD_REQUIRE_BROKERS=1: start the brokers with scripts/brokers.sh"
            );
            let _ = writeln!(std::io::stderr(), "{var} is not set: broker test SKIPPED");
            None
        }
    }
}

/// Expands to one `#[tokio::test]` per conformance case.
///
/// Takes the path of an `async fn() -> Option<H>` where `H: Harness`;
/// `None` skips (see [`broker_url`]). The calling crate needs `tokio` with the
/// `macros` and `rt-multi-thread` features as a dev-dependency.
///
/// `conformance_tests!(crash harness)` expands the cases that crash a
/// consumer process (the test binary re-runs itself as a child, running only
/// that case; the child is stopped by PID): NATS, RabbitMQ, Kafka and SQS
/// pass them. `conformance_tests!(faults harness)` expands the fault cases
/// of [`fault`] (a broker of the harness's own killed and restarted, or its
/// credentials revoked; a cuttable link reset and blackholed); `conformance_tests!(link_faults
/// harness)` only the link's, for a broker that cannot be restarted with its
/// data.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:path) => {
        $crate::conformance_tests!(@cases $harness, cases;
            publish_and_receive_set,
            payload_fidelity,
            header_fidelity,
            generated_ids,
            ack_is_final,
            nack_redelivers,
            nack_with_delay,
            attempts_count_each_nack_once,
            unsettled_redelivered_after_ack_timeout,
            late_ack_after_ack_timeout_is_harmless,
            extend_keeps_the_lease,
            prefetched_deliveries_keep_their_lease,
            close_hands_over_unsettled,
            close_returns_held_at_once,
            nack_past_max_attempts_dead_letters,
            explicit_dead_letter_reason,
            dead_letter_keeps_message,
            redrive_returns_dead_letters,
            attempts_survive_restart,
            competing_consumers,
            fan_out,
            per_key_order,
            prefetch_bounds_unsettled,
            ensure_subscription_before_publish,
            isolation,
            concurrent_publishers,
            publish_batch_1000,
            oversized_payload_rejected,
            invalid_names_rejected,
            use_after_close,
            recv_cancel_safe,
            connect_and_dyn,
            dead_letters_kept_without_reader,
            delay_survives_consumer_restart,
        );
        $crate::conformance_tests!(@cases $harness, runtime;
            runtime_concurrency_is_bounded,
            runtime_per_key_serialised_in_order,
            runtime_transient_failures_retry_with_backoff,
            runtime_exhausted_attempts_dead_letter_with_last_error,
            runtime_permanent_failure_dead_letters_at_once,
            runtime_panics_are_transient_and_the_consumer_keeps_running,
            runtime_shutdown_abandons_slow_handlers_without_dead_lettering,
            runtime_trace_context_crosses_the_broker,
            runtime_long_handler_keeps_its_lease,
            runtime_queued_deliveries_keep_their_lease,
            runtime_restarts_dead_letter_nothing,
        );
        $crate::conformance_tests!(@cases $harness, fault;
            fault_deleted_subscription_surfaces,
            fault_unreachable_broker_connect_is_bounded,
            fault_silent_broker_connect_is_bounded,
        );
    };
    // The cases that crash a consumer process (a child re-running the test
    // binary); the memory broker lives in its process and has none.
    (crash $harness:path) => {
        $crate::conformance_tests!(@cases $harness, runtime;
            runtime_poison_message_dies_alone,
        );
        $crate::conformance_tests!(@cases $harness, fault;
            fault_consumer_killed_mid_batch,
        );
    };
    // The cases that kill a broker of the harness's own
    // (`Harness::private_broker`) or cut its link (`Harness::linked`).
    (faults $harness:path) => {
        $crate::conformance_tests!(@cases $harness, fault;
            fault_broker_killed_twice,
            fault_broker_frozen,
            fault_delayed_retry_due_while_frozen,
            fault_refused_credentials_surface,
        );
        $crate::conformance_tests!(link_faults $harness);
    };
    // The cases that kill a node of a cluster of the harness's own
    // (`Harness::cluster`).
    (cluster $harness:path) => {
        $crate::conformance_tests!(@cases $harness, fault;
            cluster_leader_killed,
            cluster_confirmed_survive_node_loss,
        );
    };
    // The network faults alone, for a broker that cannot be restarted with
    // its data (an SQS endpoint).
    (link_faults $harness:path) => {
        $crate::conformance_tests!(@cases $harness, fault;
            fault_link_reset_then_blackhole,
            fault_dead_broker_calls_are_bounded,
        );
    };
    (@cases $harness:path, $module:ident; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(harness) = $harness().await else { return };
                $crate::run(
                    &harness,
                    stringify!($case),
                    ::std::boxed::Box::pin($crate::scoped(
                        concat!(module_path!(), "::", stringify!($case)),
                        $crate::$module::$case(&harness),
                    )),
                )
                .await;
            }
        )*
    };
}
