//! The suites against brokers in containers (feature `containers`,
//! [`switchyard_testing`]): with `SWITCHYARD_CONTAINERS=1` and no broker URL
//! in the environment, a suite runs against a container of its own, shared
//! by every case of the test binary, and the fault cases kill and restart
//! containers of their own.

use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
};

use switchyard_core::{Client, Result};
pub use switchyard_testing::{Broker, Kind};

use crate::fault::PrivateBroker;

/// Whether `SWITCHYARD_CONTAINERS=1`.
#[must_use]
pub fn enabled() -> bool {
    std::env::var("SWITCHYARD_CONTAINERS").is_ok_and(|v| v == "1")
}

/// Container URLs by the variable they stand in for, for the crash cases'
/// child processes (which must reach the same broker, not start another).
fn shared() -> &'static Mutex<HashMap<&'static str, Result<String, String>>> {
    static SHARED: OnceLock<Mutex<HashMap<&'static str, Result<String, String>>>> = OnceLock::new();
    SHARED.get_or_init(Mutex::default)
}

/// The environment a child process needs to reach this process's
/// containers.
pub(crate) fn child_env() -> Vec<(&'static str, String)> {
    let shared = shared()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    shared
        .iter()
        .filter_map(|(var, url)| Some((*var, url.as_ref().ok()?.clone())))
        .collect()
}

/// The URL of the broker a suite runs against: the environment variable
/// `var` when set; else, when [`enabled`], a container of `kind` started
/// once for this process (kept until it exits); else `None`, a skip (see
/// [`broker_url`](crate::broker_url)).
///
/// # Panics
///
/// When the container cannot be started (the error says why), or as
/// [`broker_url`](crate::broker_url) when neither applies and
/// `SWITCHYARD_REQUIRE_BROKERS=1`.
#[must_use]
pub fn suite_url(var: &'static str, kind: Kind) -> Option<String> {
    if std::env::var(var).is_ok_and(|v| !v.is_empty()) || !enabled() {
        return crate::broker_url(var);
    }
    let mut shared = shared()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let url = shared.entry(var).or_insert_with(|| {
        // Started on a thread and runtime of its own: the cases each run
        // on a runtime of theirs, and this one may be current-thread.
        std::thread::scope(|s| {
            s.spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let broker = runtime
                    .block_on(Broker::start(kind))
                    .map_err(|e| e.to_string())?;
                let _ = writeln_stderr(&format!(
                    "{kind} suite: a container of {} on 127.0.0.1:{}",
                    broker.image(),
                    broker.port()
                ));
                Ok(broker.keep_until_exit().url().to_owned())
            })
            .join()
            .unwrap_or_else(|_| Err("starting the container panicked".into()))
        })
    });
    match url {
        Ok(url) => Some(url.clone()),
        Err(e) => panic!("SWITCHYARD_CONTAINERS=1: a {kind} container for {var}: {e}"),
    }
}

fn writeln_stderr(line: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    writeln!(std::io::stderr(), "{line}")
}

pub use crate::fault::Connect;

/// A broker of a fault case's own in a container: killed with `SIGKILL`
/// and started again (same port, same data) through the engine.
pub struct Contained {
    broker: Broker,
    connect: Connect,
}

impl std::fmt::Debug for Contained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contained")
            .field("broker", &self.broker)
            .finish_non_exhaustive()
    }
}

impl Contained {
    /// When [`enabled`], starts a container of `kind` for one fault case;
    /// `None` otherwise (the harness then starts a process of its own).
    ///
    /// # Panics
    ///
    /// When the container cannot be started.
    pub async fn start_if_enabled(kind: Kind, connect: Connect) -> Option<Self> {
        if !enabled() {
            return None;
        }
        let broker = Broker::start(kind)
            .await
            .unwrap_or_else(|e| panic!("a private {kind} container: {e}"));
        Some(Self { broker, connect })
    }

    /// The container's broker.
    #[must_use]
    pub fn broker(&self) -> &Broker {
        &self.broker
    }
}

#[async_trait::async_trait]
impl PrivateBroker for Contained {
    async fn client(&self) -> Result<Client> {
        (self.connect)(self.broker.url().to_owned()).await
    }

    fn kill(&mut self) {
        self.broker
            .kill_blocking()
            .unwrap_or_else(|e| panic!("killing the container: {e}"));
    }

    async fn freeze(&mut self) -> bool {
        self.broker
            .pause()
            .await
            .unwrap_or_else(|e| panic!("pausing the container: {e}"));
        true
    }

    async fn thaw(&mut self) {
        self.broker
            .unpause()
            .await
            .unwrap_or_else(|e| panic!("unpausing the container: {e}"));
    }

    async fn restart(&mut self) {
        if let Err(e) = self.broker.restart().await {
            panic!(
                "restarting the container: {e}; its log ends:\n{}",
                tail(&self.broker.logs().await)
            );
        }
    }
}

fn tail(log: &str) -> &str {
    let from = log.len().saturating_sub(4096);
    let from = (from..log.len())
        .find(|&i| log.is_char_boundary(i))
        .unwrap_or(log.len());
    &log[from..]
}
