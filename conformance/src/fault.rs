//! Broker processes of a test's own, to kill and restart: the fault cases
//! never touch the machine's brokers. A [`BrokerProcess`] runs one broker
//! binary on a spare loopback port, logs to a file in its own directory,
//! and is stopped by PID — `SIGKILL` on [`BrokerProcess::kill`] or when
//! dropped — never left behind.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::time::Duration;
//! use switchyard_conformance::fault::{free_port, BrokerProcess};
//!
//! let port = free_port()?;
//! let dir = std::env::temp_dir().join(format!("my-broker-{port}"));
//! let mut broker = BrokerProcess::new("nats-server", port, &dir);
//! broker.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js"]);
//! broker.start(Duration::from_secs(10)).await?;
//! broker.kill(); // the fault
//! broker.start(Duration::from_secs(10)).await?; // same port, same data
//! # Ok(()) }
//! ```

use std::{
    ffi::{OsStr, OsString},
    fs::File,
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// `sh -c` script: `$1` is the test process, the rest the broker's command.
const WATCHDOG: &str = r#"parent=$1; shift
broker=$$
( while kill -0 "$parent" 2>/dev/null && kill -0 "$broker" 2>/dev/null; do sleep 1; done
  kill -0 "$parent" 2>/dev/null || kill -9 "$broker" 2>/dev/null ) </dev/null >/dev/null 2>&1 &
exec "$@""#;

/// A loopback TCP port nothing listens on now (the OS picks it; a
/// following bind by another process may still race for it).
///
/// # Errors
///
/// When no port can be bound.
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// One broker process on `127.0.0.1:port`, restartable on the same port
/// and data directory.
#[derive(Debug)]
pub struct BrokerProcess {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    port: u16,
    dir: PathBuf,
    child: Option<std::process::Child>,
}

impl BrokerProcess {
    /// A broker `program` that will listen on `port`, with `dir` (created on
    /// start) for its data and its log (`broker.log`).
    pub fn new(program: impl AsRef<OsStr>, port: u16, dir: impl AsRef<Path>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            port,
            dir: dir.as_ref().to_owned(),
            child: None,
        }
    }

    /// Adds one argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets one environment variable of the broker.
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// The port the broker listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's directory (data and `broker.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts the broker (killing a previous run first) and waits until its
    /// port accepts connections, at most `ready_within`.
    ///
    /// # Errors
    ///
    /// When the program cannot start, exits, or does not open its port in
    /// time; the error carries the end of its log. The process is killed.
    pub async fn start(&mut self, ready_within: Duration) -> io::Result<()> {
        self.kill();
        std::fs::create_dir_all(&self.dir)?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        // `sh` execs the broker (its PID stays the child's, so a kill is the
        // broker's crash) after starting a watchdog that kills it once this
        // test process is gone: a test killed by a signal (Ctrl-C, a CI
        // timeout) leaves no broker behind. The watchdog ends with either.
        let child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("sh")
            .arg(std::process::id().to_string())
            .arg(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("starting {}: {e}", self.program.to_string_lossy()),
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + ready_within;
        loop {
            if !self.is_running() {
                let status = self.child.take().and_then(|mut c| c.wait().ok());
                return Err(self.failed(&format!("exited ({status:?})")));
            }
            let connect = tokio::net::TcpStream::connect(("127.0.0.1", self.port));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), connect).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(self.failed(&format!(
                    "did not open 127.0.0.1:{} within {ready_within:?}",
                    self.port
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the broker (`SIGKILL`: no shutdown, no flush) and reaps it.
    /// Does nothing when it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The end of the broker's log (its last 4 KiB), for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read(self.log_path()).unwrap_or_default();
        let from = text.len().saturating_sub(4096);
        String::from_utf8_lossy(&text[from..]).into_owned()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("broker.log")
    }

    fn failed(&self, what: &str) -> io::Error {
        io::Error::other(format!(
            "broker {} {what}; its log ({}) ends:\n{}",
            self.program.to_string_lossy(),
            self.log_path().display(),
            self.log_tail()
        ))
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A broker instance of a test's own, for the fault cases
/// ([`Harness::private_broker`](crate::Harness::private_broker)): killed
/// and restarted on the same port and data while clients use it.
#[async_trait::async_trait]
pub trait PrivateBroker: Send + Sync {
    /// A new client connected to this broker.
    ///
    /// # Errors
    ///
    /// When it cannot be reached.
    async fn client(&self) -> switchyard_core::Result<switchyard_core::Client>;

    /// Kills the broker with `SIGKILL` (a crash: nothing flushed).
    fn kill(&mut self);

    /// Starts it again on the same port and data; returns once it accepts
    /// connections.
    async fn restart(&mut self);
}

/// Fault case: the broker is killed (`SIGKILL`) and restarted twice while
/// one long-lived [`Client`](switchyard_core::Client) publishes at a steady
/// rate (retrying a failed publish with the same id, as a careful
/// application does) and two subscriptions receive: one through the
/// [`Consumer`](switchyard_core::consumer::Consumer) runtime, one through
/// a raw [`Subscription`](switchyard_core::Subscription) that keeps calling
/// `recv` (retryable errors allowed). Every confirmed message reaches both,
/// without a resubscribe; the figures (confirmed, lost, duplicates, seconds
/// until publishing works again after each restart) are printed.
///
/// # Panics
///
/// When a confirmed message is lost or a bound is exceeded.
pub async fn fault_broker_killed_twice(h: &dyn crate::Harness) -> crate::Outcome {
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
    };

    use switchyard_core::{
        Message, SubscribeOptions,
        consumer::{Backoff, Consumer},
    };

    const N: usize = 1500;
    const EVERY: Duration = Duration::from_millis(5);
    const DOWN: Duration = Duration::from_secs(2);
    const BOUND: Duration = Duration::from_secs(90);

    let Some(mut broker) = h.private_broker().await else {
        return crate::Outcome::Skipped("the harness has no private broker".into());
    };
    let client = broker
        .client()
        .await
        .expect("connect to the private broker");
    let topic = h.unique("fault-kill");
    let (runtime_opts, raw_opts) = (
        SubscribeOptions::new("runtime"),
        SubscribeOptions::new("raw"),
    );
    client
        .ensure_subscription(&topic, &runtime_opts)
        .await
        .unwrap();
    client.ensure_subscription(&topic, &raw_opts).await.unwrap();
    // RabbitMQ 3.10 loses a quorum queue declared within about 3 s of a
    // kill (see the RabbitMQ backend's docs); no broker is killed sooner,
    // with room for a loaded machine.
    tokio::time::sleep(Duration::from_secs(6)).await;

    type Seen = Arc<Mutex<HashMap<String, u32>>>;
    let (by_runtime, by_raw): (Seen, Seen) = Default::default();
    let stop = Stop::default();
    let runtime = {
        let sub = client.subscribe(&topic, runtime_opts).await.unwrap();
        let seen = Arc::clone(&by_runtime);
        let stop = stop.clone();
        tokio::spawn(async move {
            Consumer::new()
                .concurrency(8)
                .backoff(Backoff::new(
                    Duration::from_millis(100),
                    Duration::from_secs(1),
                ))
                .shutdown_timeout(Duration::from_secs(2))
                .run(
                    sub,
                    move |ctx| {
                        let seen = Arc::clone(&seen);
                        async move {
                            *seen
                                .lock()
                                .unwrap()
                                .entry(ctx.message.id().to_owned())
                                .or_default() += 1;
                            Ok(())
                        }
                    },
                    async move { stop.wait().await },
                )
                .await
        })
    };
    let raw = {
        let mut sub = client.subscribe(&topic, raw_opts).await.unwrap();
        let seen = Arc::clone(&by_raw);
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut errors = 0u32;
            loop {
                let next = tokio::select! {
                    () = stop.wait() => break,
                    next = sub.recv() => next,
                };
                match next {
                    Ok(d) => {
                        *seen
                            .lock()
                            .unwrap()
                            .entry(d.message().id().to_owned())
                            .or_default() += 1;
                        // An ack lost with the connection comes back.
                        let _ = d.ack().await;
                    }
                    Err(e) if e.is_retryable() => {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("raw recv failed for good: {e}"),
                }
            }
            let _ = sub.close().await;
            errors
        })
    };
    let publisher = {
        let client = client.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut confirmed = Vec::with_capacity(N);
            let mut failures = 0u32;
            let mut last_ok = Vec::new();
            for i in 0..N {
                let id = format!("m{i:05}");
                loop {
                    assert!(
                        start.elapsed() < BOUND,
                        "publishing {id} did not succeed within {BOUND:?}"
                    );
                    let attempt = Instant::now();
                    match client.publish(&topic, Message::new("x").with_id(&id)).await {
                        Ok(()) => {
                            last_ok.push((attempt, Instant::now()));
                            break;
                        }
                        Err(e) => {
                            assert!(e.is_retryable(), "publish failed for good: {e}");
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                confirmed.push(id);
                tokio::time::sleep(EVERY).await;
            }
            (confirmed, failures, last_ok)
        })
    };

    let mut restarts = Vec::new();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        broker.kill();
        tokio::time::sleep(DOWN).await;
        broker.restart().await;
        restarts.push(Instant::now());
    }
    let (confirmed, failures, oks) = publisher.await.expect("the publisher");
    // Seconds from each restart until the next publish confirmed.
    let recovery: Vec<f64> = restarts
        .iter()
        .map(|r| {
            oks.iter()
                .find(|(_, done)| done >= r)
                .map_or(f64::NAN, |(_, done)| done.duration_since(*r).as_secs_f64())
        })
        .collect();
    let deadline = Instant::now() + BOUND;
    let missing = |seen: &Seen| -> Vec<String> {
        let seen = seen.lock().unwrap();
        confirmed
            .iter()
            .filter(|id| !seen.contains_key(*id))
            .cloned()
            .collect()
    };
    while (!missing(&by_runtime).is_empty() || !missing(&by_raw).is_empty())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.set();
    let report = runtime.await.expect("the consumer task");
    let raw_errors = raw.await.expect("the raw receiver");
    for (name, seen) in [("Consumer", &by_runtime), ("Subscription", &by_raw)] {
        let lost = missing(seen);
        let dups: u32 = seen.lock().unwrap().values().map(|n| n - 1).sum();
        let _ = writeln!(
            std::io::stderr(),
            "fault_broker_killed_twice [{name}]: {N} published, {} confirmed, {} lost, {dups} \
             duplicates; {failures} failed publishes retried; publishing back {recovery:.1?} s \
             after the restarts",
            confirmed.len(),
            lost.len(),
        );
        assert!(
            lost.is_empty(),
            "{name} lost {} of {} confirmed messages through two broker kills, e.g. {:?}",
            lost.len(),
            confirmed.len(),
            &lost[..lost.len().min(5)]
        );
    }
    let report = report.expect("the Consumer keeps running through broker kills");
    let _ = writeln!(
        std::io::stderr(),
        "fault_broker_killed_twice: the Consumer acked {}, the Subscription saw {raw_errors} \
         retryable errors",
        report.acked
    );
    let _ = client.close().await;
    crate::Outcome::Passed
}

/// A one-shot stop signal for the fault cases' tasks.
#[derive(Clone, Default)]
struct Stop(std::sync::Arc<(std::sync::atomic::AtomicBool, tokio::sync::Notify)>);

impl Stop {
    fn set(&self) {
        self.0.0.store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.1.notify_waiters();
    }

    async fn wait(&self) {
        loop {
            let notified = self.0.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.0.0.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}
