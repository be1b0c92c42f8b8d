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

mod cluster;
mod link;

pub use cluster::{Cluster, cluster_confirmed_survive_node_loss, cluster_leader_killed};
pub use link::Link;

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
    /// Remove `dir` when dropped (unless a panic is unwinding: its log
    /// tells what happened).
    scratch: bool,
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
            scratch: false,
        }
    }

    /// With `true`, removes its directory when dropped, unless the test is
    /// panicking (the log then stays for the failure's reader). Off by
    /// default.
    pub fn scratch(&mut self, remove: bool) -> &mut Self {
        self.scratch = remove;
        self
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

    /// [`start`](Self::start) for a case that cannot go on without its
    /// broker.
    ///
    /// # Panics
    ///
    /// When it does not start (the message carries the end of its log).
    pub async fn boot(&mut self, ready_within: Duration) {
        if let Err(e) = self.start(ready_within).await {
            panic!("a private broker: {e}");
        }
    }

    /// Sends `SIGSTOP` (`stop == true`) or `SIGCONT` to the broker: frozen,
    /// it keeps its connections and answers nothing.
    ///
    /// # Panics
    ///
    /// When it is not running or `kill` fails.
    pub fn signal_stop(&mut self, stop: bool) {
        let pid = self.child.as_ref().expect("a running broker").id();
        let status = Command::new("kill")
            .args([if stop { "-STOP" } else { "-CONT" }, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -STOP/-CONT {pid}: {status}");
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
        if self.scratch && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Connects a client to a URL (a backend's `connect`, perhaps with
/// settings added to the URL).
pub type Connect = Box<
    dyn Fn(
            String,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = switchyard_core::Result<switchyard_core::Client>>
                    + Send,
            >,
        > + Send
        + Sync,
>;

/// A [`PrivateBroker`] that is one [`BrokerProcess`], reached by URL: what
/// a harness whose broker is a single binary needs.
///
/// ```no_run
/// # async fn demo() {
/// use std::time::Duration;
/// use switchyard_conformance::fault::{BrokerProcess, Connect, ProcessBroker, free_port};
///
/// let port = free_port().unwrap();
/// let dir = std::env::temp_dir().join(format!("my-broker-{port}"));
/// let mut process = BrokerProcess::new("nats-server", port, &dir);
/// process.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js"]);
/// let connect: Connect = Box::new(|url| Box::pin(async move {
///     unimplemented!("the backend's connect({url})")
/// }));
/// let url = format!("nats://127.0.0.1:{port}");
/// let broker = ProcessBroker::start(process, Duration::from_secs(20), url, connect).await;
/// # }
/// ```
pub struct ProcessBroker {
    process: BrokerProcess,
    ready_within: Duration,
    url: String,
    connect: Connect,
}

impl std::fmt::Debug for ProcessBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessBroker")
            .field("process", &self.process)
            .finish_non_exhaustive()
    }
}

impl ProcessBroker {
    /// Starts `process` (its directory removed when done: see
    /// [`BrokerProcess::scratch`]), waiting `ready_within` for its port,
    /// now and on each restart; its clients come from `connect(url)`.
    ///
    /// # Panics
    ///
    /// When it does not start.
    pub async fn start(
        mut process: BrokerProcess,
        ready_within: Duration,
        url: String,
        connect: Connect,
    ) -> Self {
        process.scratch(true).boot(ready_within).await;
        Self {
            process,
            ready_within,
            url,
            connect,
        }
    }
}

#[async_trait::async_trait]
impl PrivateBroker for ProcessBroker {
    async fn client(&self) -> switchyard_core::Result<switchyard_core::Client> {
        (self.connect)(self.url.clone()).await
    }

    fn kill(&mut self) {
        self.process.kill();
    }

    async fn restart(&mut self) {
        self.process.boot(self.ready_within).await;
    }

    async fn freeze(&mut self) -> bool {
        self.process.signal_stop(true);
        true
    }

    async fn thaw(&mut self) {
        self.process.signal_stop(false);
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

    /// Freezes the broker (`SIGSTOP`, or pausing its container): its
    /// connections stay open and nothing answers on them. `false` when this
    /// broker cannot be frozen (the default), which skips the case.
    async fn freeze(&mut self) -> bool {
        false
    }

    /// Thaws a [`freeze`](PrivateBroker::freeze)n broker (`SIGCONT`, or
    /// unpausing its container).
    async fn thaw(&mut self) {}
}

/// The broker under test reached through a [`Link`] of the harness's own,
/// for the network fault cases
/// ([`Harness::linked`](crate::Harness::linked)).
#[async_trait::async_trait]
pub trait Linked: Send + Sync {
    /// The link every connection of [`client`](Linked::client) goes
    /// through.
    fn link(&self) -> &Link;

    /// A new client whose connections all go through the link.
    ///
    /// # Errors
    ///
    /// When the broker cannot be reached.
    async fn client(&self) -> switchyard_core::Result<switchyard_core::Client>;

    /// The longest one `publish`, `ack`, subscription `close` or client
    /// `close` of such a client may take while the link is dead: what its
    /// configured timeouts promise, with some slack.
    fn bound(&self) -> Duration;
}

/// A [`Linked`] made of a [`Link`] and a function that connects a client to
/// an address (the link's): what most harnesses need.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use std::time::Duration;
/// use switchyard_conformance::fault::{Link, Via};
///
/// let link = Link::start(0, "127.0.0.1:4222".parse().unwrap()).await?;
/// let linked = Via::new(link, Duration::from_secs(5), |addr| async move {
///     unimplemented!("connect a client to {addr}, with timeouts below the bound")
/// });
/// # Ok(()) }
/// ```
pub struct Via {
    link: Link,
    bound: Duration,
    connect: Box<dyn Fn(std::net::SocketAddr) -> ConnectFuture + Send + Sync>,
    keep: Option<Box<dyn Send + Sync>>,
}

type ConnectFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = switchyard_core::Result<switchyard_core::Client>> + Send>,
>;

impl Via {
    /// Clients made by `connect(link.addr())`, each operation bounded by
    /// `bound` while the link is dead.
    pub fn new<F, Fut>(link: Link, bound: Duration, connect: F) -> Self
    where
        F: Fn(std::net::SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = switchyard_core::Result<switchyard_core::Client>>
            + Send
            + 'static,
    {
        Self {
            link,
            bound,
            connect: Box::new(move |addr| Box::pin(connect(addr))),
            keep: None,
        }
    }

    /// A new [`Link`] on a spare port in front of `server` (`host:port`),
    /// and clients made by `connect(link.addr())`, as [`Via::new`].
    ///
    /// # Errors
    ///
    /// When `server` does not resolve or no port can be bound.
    pub async fn to<F, Fut>(server: &str, bound: Duration, connect: F) -> io::Result<Self>
    where
        F: Fn(std::net::SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = switchyard_core::Result<switchyard_core::Client>>
            + Send
            + 'static,
    {
        let target = tokio::net::lookup_host(server)
            .await?
            .next()
            .ok_or_else(|| io::Error::other(format!("{server} resolves to no address")))?;
        Ok(Self::new(Link::start(0, target).await?, bound, connect))
    }

    /// Keeps `guard` (e.g. a broker process the link leads to) alive as
    /// long as this value.
    #[must_use]
    pub fn keeping(mut self, guard: impl Send + Sync + 'static) -> Self {
        self.keep = Some(Box::new(guard));
        self
    }
}

impl std::fmt::Debug for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Via")
            .field("link", &self.link)
            .field("bound", &self.bound)
            .field("keeps", &self.keep.is_some())
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Linked for Via {
    fn link(&self) -> &Link {
        &self.link
    }

    async fn client(&self) -> switchyard_core::Result<switchyard_core::Client> {
        (self.connect)(self.link.addr()).await
    }

    fn bound(&self) -> Duration {
        self.bound
    }
}

/// The harness's private broker and a client connected to it; `None` when
/// the harness has none.
async fn private_broker_and_client(
    h: &dyn crate::Harness,
) -> Option<(Box<dyn PrivateBroker>, switchyard_core::Client)> {
    let broker = h.private_broker().await?;
    let client = broker
        .client()
        .await
        .expect("connect to the private broker");
    Some((broker, client))
}

/// Fault case: the broker is killed (`SIGKILL`) and restarted twice — a
/// third and two thirds of the way through — while one long-lived
/// [`Client`](switchyard_core::Client) publishes 10,000 messages at a steady
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
    broker_killed_twice(h, "fault_broker_killed_twice", 10_000).await
}

/// Fault case: [`fault_broker_killed_twice`] with 3,000 messages, for a
/// broker whose confirmed publishes, one at a time, are too slow for
/// 10,000 within the case's bound (Kafka on tansu's sqlite storage: about
/// 110 a second), so its figures (seconds until publishing and deliveries
/// are back after each restart) can be measured there. Every other
/// backend runs the full case.
///
/// # Panics
///
/// As [`fault_broker_killed_twice`].
pub async fn fault_broker_killed_twice_short(h: &dyn crate::Harness) -> crate::Outcome {
    broker_killed_twice(h, "fault_broker_killed_twice_short", 3_000).await
}

async fn broker_killed_twice(
    h: &dyn crate::Harness,
    case: &str,
    killed_messages: usize,
) -> crate::Outcome {
    const DOWN: Duration = Duration::from_secs(2);

    let Some((mut broker, client)) = private_broker_and_client(h).await else {
        return crate::Outcome::Skipped("the harness has no private broker".into());
    };
    let topic = h.unique("fault-kill");
    let flow = Flow::steady(&client, &topic, killed_messages).await;

    // The kills fall a third and two thirds of the way through.
    let mut restarts = Vec::new();
    for third in 1..=2 {
        flow.wait_confirmed(killed_messages * third / 3).await;
        broker.kill();
        tokio::time::sleep(DOWN).await;
        broker.restart().await;
        restarts.push(Instant::now());
    }
    let end = flow.finish(&restarts).await;
    end.report(case, "the restarts");
    end.assert_nothing_lost("two broker kills");
    let _ = client.close().await;
    crate::Outcome::Passed
}

/// Fault case: the flow of [`fault_broker_killed_twice`] while the broker
/// is frozen for 10 s (`SIGSTOP`, or its container paused: every connection
/// stays open and nothing answers, as a stalled machine or a long pause
/// looks), then thawed. Nothing is confirmed while it is frozen; once it is
/// thawed, publishing and both subscriptions resume by themselves and every
/// confirmed message arrives.
///
/// # Panics
///
/// When a confirmed message is lost, a publish is confirmed by a frozen
/// broker, or the flow does not finish within its bound.
pub async fn fault_broker_frozen(h: &dyn crate::Harness) -> crate::Outcome {
    const FROZEN: Duration = Duration::from_secs(10);

    let Some((mut broker, client)) = private_broker_and_client(h).await else {
        return crate::Outcome::Skipped("the harness has no private broker".into());
    };
    let topic = h.unique("fault-freeze");
    let flow = Flow::prepare(&client, &topic).await;
    let flow = flow
        .start(&client, &topic, 100_000, Duration::from_millis(5))
        .await;
    let started = Instant::now();
    while flow.confirmed() < 500 {
        assert!(started.elapsed() < FLOW_BOUND, "publishing never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !broker.freeze().await {
        flow.publishing.set();
        let _ = flow.finish(&[]).await;
        return crate::Outcome::Skipped("this private broker cannot be frozen".into());
    }
    let frozen = Instant::now();
    tokio::time::sleep(FROZEN).await;
    // The freeze ends as the signal lands: the broker may answer before
    // `thaw` returns (it waits for the `kill` process), so the instant is
    // taken first — a publish in flight all along, confirmed at once after
    // the thaw, is not one confirmed while frozen.
    let thawed = vec![Instant::now()];
    broker.thaw().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    flow.publishing.set();
    let end = flow.finish(&thawed).await;
    end.report("fault_broker_frozen", "the broker thawed");
    end.assert_nothing_lost("a frozen broker");
    // The freeze was real: nothing was confirmed while it lasted (past a
    // second for answers already on their way).
    let during = end
        .published
        .oks
        .iter()
        .filter(|ok| **ok > frozen + Duration::from_secs(1) && **ok < thawed[0])
        .count();
    assert_eq!(
        during, 0,
        "{during} publishes were confirmed by a frozen broker"
    );
    let _ = client.close().await;
    crate::Outcome::Passed
}

/// Fault case: a delayed retry falls due while the broker is frozen, with a
/// receive waiting for it; once the broker is thawed the message comes back
/// as attempt 2 — not as a first delivery again (attempts never go back),
/// not twice. Four rounds, each frozen past the retry delay and past any
/// short-lived pull request the receiver had open, since the order in which
/// a thawed broker handles its overdue timers varies.
///
/// (nats-server before 2.10.14 — nats-io/nats-server#5305 — took a
/// redelivery that found only expired pull requests waiting as a message
/// never sent: it stepped its stream cursor back one message, which went
/// out again as delivery 1, and counted the redelivery it never sent.)
///
/// # Panics
///
/// When the retry comes back at another attempt than 2, more than once, or
/// not within its bound.
pub async fn fault_delayed_retry_due_while_frozen(h: &dyn crate::Harness) -> crate::Outcome {
    use switchyard_core::{Message, Retry, SubscribeOptions};

    const DELAY: Duration = Duration::from_secs(1);
    const FROZEN: Duration = Duration::from_secs(3);
    const ROUNDS: usize = 4;

    let Some((mut broker, client)) = private_broker_and_client(h).await else {
        return crate::Outcome::Skipped("the harness has no private broker".into());
    };
    let topic = h.unique("fault-retry-frozen");
    let opts = SubscribeOptions::new("retried").with_max_attempts(10);
    client
        .ensure_subscription(&topic, &opts)
        .await
        .expect("ensure the subscription");
    let mut sub = client.subscribe(&topic, opts).await.expect("subscribe");
    let bound = FROZEN + DELAY + h.slack() + h.receive_timeout();
    for round in 0..ROUNDS {
        let id = format!("retried-{round}");
        client
            .publish(&topic, Message::new("x").with_id(&id))
            .await
            .expect("publish");
        let first = tokio::time::timeout(bound, sub.recv())
            .await
            .unwrap_or_else(|_| panic!("round {round}: no first delivery within {bound:?}"))
            .expect("first delivery");
        assert_eq!(first.message().id(), id, "round {round}: first delivery");
        assert_eq!(first.attempt(), 1, "round {round}: first delivery");
        first
            .nack(Retry::after(DELAY))
            .await
            .expect("nack with delay");
        // A receive waits for the retry (a pull request is open) while the
        // broker freezes, past the delay.
        let fault = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if !broker.freeze().await {
                return false;
            }
            tokio::time::sleep(FROZEN).await;
            broker.thaw().await;
            true
        };
        let (again, frozen) = tokio::join!(tokio::time::timeout(bound, sub.recv()), fault);
        if !frozen {
            return crate::Outcome::Skipped("this private broker cannot be frozen".into());
        }
        let again = again
            .unwrap_or_else(|_| {
                panic!("round {round}: the retry did not come back within {bound:?}")
            })
            .expect("the retry");
        assert_eq!(
            (again.message().id(), again.attempt()),
            (id.as_str(), 2),
            "round {round}: the retry due while the broker was frozen came back as (id, attempt)"
        );
        again.ack().await.expect("ack the retry");
    }
    // Nothing comes back: no second copy of any retry.
    match tokio::time::timeout(h.slack(), sub.recv()).await {
        Err(_) => {}
        Ok(Ok(d)) => panic!(
            "{} came back again at attempt {} after its retry was acked",
            d.message().id(),
            d.attempt()
        ),
        Ok(Err(e)) => panic!("receiving after the rounds: {e}"),
    }
    let _ = sub.close().await;
    let _ = client.close().await;
    crate::Outcome::Passed
}

/// Fault case: the same flow as [`fault_broker_killed_twice`] through a
/// [`Link`] that is reset for 10 s (every connection closed with `RST`,
/// new ones too) and later blackholed for 10 s (nothing passes, nothing
/// closes). Meanwhile no `publish` and no `ack` takes longer than the
/// harness's [`Linked::bound`], and a second client closes a subscription
/// and itself inside the blackhole within the bound too; once the link is
/// back, publishing and both subscriptions resume by themselves and every
/// confirmed message arrives.
///
/// # Panics
///
/// When a confirmed message is lost or a bound is exceeded.
pub async fn fault_link_reset_then_blackhole(h: &dyn crate::Harness) -> crate::Outcome {
    use switchyard_core::SubscribeOptions;

    const FAULT: Duration = Duration::from_secs(10);

    let Some(linked) = h.linked().await else {
        return crate::Outcome::Skipped("the harness has no cuttable link".into());
    };
    let bound = linked.bound();
    let client = linked.client().await.expect("connect through the link");
    let closer = linked.client().await.expect("connect through the link");
    let topic = h.unique("fault-link");
    let flow = Flow::prepare(&client, &topic).await;
    let closing_opts = SubscribeOptions::new("closing");
    closer
        .ensure_subscription(&topic, &closing_opts)
        .await
        .unwrap();
    let mut closing = closer.subscribe(&topic, closing_opts).await.unwrap();
    let flow = flow
        .start(&client, &topic, 100_000, Duration::from_millis(5))
        .await;
    // The closing subscription is live: it has delivered.
    let first = tokio::time::timeout(h.receive_timeout(), closing.recv())
        .await
        .expect("the closing subscription delivers before the faults")
        .expect("the closing subscription delivers before the faults");
    if !flow.fan_out {
        // It took its message from the flow's queue.
        flow.seen_by_raw(first.message().id());
    }
    first.ack().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let link = linked.link();
    link.reset();
    let reset = Instant::now();
    tokio::time::sleep(FAULT).await;
    link.heal();
    let mut heals = vec![Instant::now()];
    tokio::time::sleep(Duration::from_secs(4)).await;
    link.blackhole();
    let blackholed = Instant::now();
    tokio::time::sleep(FAULT / 2).await;
    // A shutdown while the network is dead: bounded, not a hang.
    let sub_close = within(bound, "closing a subscription", closing.close()).await;
    let client_close = within(bound, "closing a client", closer.close()).await;
    tokio::time::sleep_until((blackholed + FAULT).into()).await;
    link.heal();
    heals.push(Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    flow.publishing.set();
    let end = flow.finish(&heals).await;
    end.report("fault_link_reset_then_blackhole", "the link healed");
    let _ = writeln!(
        std::io::stderr(),
        "fault_link_reset_then_blackhole: longest publish {:.1?}, longest ack {:.1?}; closing a \
         subscription took {sub_close:.1?} and a client {client_close:.1?} inside the blackhole \
         (bound {bound:?})",
        end.longest_publish,
        end.longest_ack,
    );
    end.assert_nothing_lost("a reset and a blackhole of the link");
    // The faults were real: nothing was confirmed while the link was down
    // (past a second for answers already on their way).
    for (from, to) in [(reset, heals[0]), (blackholed, heals[1])] {
        let during = end
            .published
            .oks
            .iter()
            .filter(|ok| **ok > from + Duration::from_secs(1) && **ok < to)
            .count();
        assert_eq!(
            during, 0,
            "{during} publishes were confirmed while the link was cut: the link did not cut"
        );
    }
    assert!(
        end.longest_publish <= bound,
        "a publish took {:?} while the link was dead (bound {bound:?})",
        end.longest_publish
    );
    assert!(
        end.longest_ack <= bound,
        "an ack took {:?} while the link was dead (bound {bound:?})",
        end.longest_ack
    );
    let _ = client.close().await;
    crate::Outcome::Passed
}

/// Runs `op` (named `what`) inside the blackhole; returns how long it took.
///
/// # Panics
///
/// When it takes longer than `bound`.
async fn within<T>(
    bound: Duration,
    what: &str,
    op: impl std::future::Future<Output = T>,
) -> Duration {
    bounded(bound, what, op).await.1
}

/// Runs `op` (named `what`) while the link is cut; returns its output and
/// how long it took.
///
/// # Panics
///
/// When it takes longer than `bound`.
async fn bounded<T>(
    bound: Duration,
    what: &str,
    op: impl std::future::Future<Output = T>,
) -> (T, Duration) {
    let started = Instant::now();
    match tokio::time::timeout(bound, op).await {
        Ok(out) => (out, started.elapsed()),
        Err(_) => panic!("{what} took longer than {bound:?} while the link was cut"),
    }
}

/// Ids seen by one subscription, with how often.
type Seen = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>;
type Instants = std::sync::Arc<std::sync::Mutex<Vec<Instant>>>;

/// The fault cases' traffic: a publisher, a `Consumer` and a raw
/// `Subscription` on one topic.
struct Flow {
    /// Whether each subscription gets every message.
    fan_out: bool,
    by_runtime: Seen,
    by_raw: Seen,
    /// When each delivery (of either subscription) reached the test.
    delivered_at: Instants,
    stop: Stop,
    publishing: Stop,
    runtime: tokio::task::JoinHandle<switchyard_core::Result<switchyard_core::consumer::Report>>,
    raw: tokio::task::JoinHandle<(u32, Duration)>,
    publisher: tokio::task::JoinHandle<Published>,
    /// How many publishes were confirmed so far.
    confirmed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// The flow's two subscriptions, declared.
struct Prepared;

struct Published {
    confirmed: Vec<String>,
    failures: u32,
    /// When each confirmed publish returned.
    oks: Vec<Instant>,
    longest: Duration,
}

/// For each instant in `faults` (a fault's end), the seconds until the
/// first of `times` at or after it (`NaN`: none).
fn seconds_until_next(faults: &[Instant], times: &[Instant]) -> Vec<f64> {
    faults
        .iter()
        .map(|f| {
            times
                .iter()
                .filter(|t| *t >= f)
                .min()
                .map_or(f64::NAN, |t| t.duration_since(*f).as_secs_f64())
        })
        .collect()
}

/// What a flow saw, once everything confirmed arrived (or the bound ran
/// out).
struct End {
    published: Published,
    groups: Vec<Group>,
    /// Seconds from each fault's end until the next confirmed publish.
    recovery: Vec<f64>,
    /// Seconds from each fault's end until the next delivery.
    delivery_recovery: Vec<f64>,
    /// When each delivery reached the test, in order.
    delivered_at: Vec<Instant>,
    raw_errors: u32,
    acked: u64,
    longest_publish: Duration,
    longest_ack: Duration,
}

/// The longest a fault case waits for publishing or delivery to finish.
const FLOW_BOUND: Duration = Duration::from_secs(90);
const RUNTIME: &str = "runtime";
const RAW: &str = "raw";

impl Flow {
    /// The flow of the kill cases: both subscriptions declared, then (after
    /// a pause no fault may fall into) `n` messages published one every
    /// millisecond.
    async fn steady(client: &switchyard_core::Client, topic: &str, n: usize) -> Flow {
        let prepared = Flow::prepare(client, topic).await;
        // RabbitMQ 3.10 loses a quorum queue declared within about 3 s of a
        // kill (see the RabbitMQ backend's docs); no broker is killed
        // sooner, with room for a loaded machine.
        tokio::time::sleep(Duration::from_secs(6)).await;
        prepared
            .start(client, topic, n, Duration::from_millis(1))
            .await
    }

    /// Waits until `n` publishes are confirmed.
    ///
    /// # Panics
    ///
    /// When publishing stalls for [`FLOW_BOUND`].
    async fn wait_confirmed(&self, n: usize) {
        let started = Instant::now();
        while self.confirmed() < n {
            assert!(
                started.elapsed() < FLOW_BOUND,
                "publishing stalled at {} confirmed",
                self.confirmed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn prepare(client: &switchyard_core::Client, topic: &str) -> Prepared {
        use switchyard_core::SubscribeOptions;
        for name in [RUNTIME, RAW] {
            client
                .ensure_subscription(topic, &SubscribeOptions::new(name))
                .await
                .unwrap();
        }
        Prepared
    }
}

impl Prepared {
    /// Subscribes both and publishes up to `n` messages, pausing `every`
    /// after each, until [`Flow::publishing`] is set.
    async fn start(
        self,
        client: &switchyard_core::Client,
        topic: &str,
        n: usize,
        every: Duration,
    ) -> Flow {
        use switchyard_core::{
            Message, SubscribeOptions,
            consumer::{Backoff, Consumer},
        };
        use tracing::instrument::WithSubscriber as _;

        // The library's warnings while the two receive (a receive retried,
        // pull requests presumed lost, …) go to the case's output, shown
        // when it fails. Scoped to their tasks: the trace case owns the
        // process's global subscriber.
        let warnings = tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .with_test_writer()
                .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
                .finish(),
        );
        let (by_runtime, by_raw): (Seen, Seen) = Default::default();
        let delivered_at = Instants::default();
        let (stop, publishing) = (Stop::default(), Stop::default());
        let runtime = {
            let sub = client
                .subscribe(topic, SubscribeOptions::new(RUNTIME))
                .await
                .unwrap();
            let seen = std::sync::Arc::clone(&by_runtime);
            let at = std::sync::Arc::clone(&delivered_at);
            let stop = stop.clone();
            let warnings = warnings.clone();
            tokio::spawn(async move {
                Consumer::new()
                    .with_concurrency(8)
                    .with_backoff(Backoff::new(
                        Duration::from_millis(100),
                        Duration::from_secs(1),
                    ))
                    .with_shutdown_timeout(Duration::from_secs(2))
                    .run(
                        sub,
                        move |ctx| {
                            let seen = std::sync::Arc::clone(&seen);
                            at.lock().unwrap().push(Instant::now());
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
                    .with_subscriber(warnings)
                    .await
            })
        };
        let raw = {
            let mut sub = client
                .subscribe(topic, SubscribeOptions::new(RAW))
                .await
                .unwrap();
            let seen = std::sync::Arc::clone(&by_raw);
            let at = std::sync::Arc::clone(&delivered_at);
            let stop = stop.clone();
            tokio::spawn(
                async move {
                    let (mut errors, mut longest_ack) = (0u32, Duration::ZERO);
                    loop {
                        let next = tokio::select! {
                            () = stop.wait() => break,
                            next = sub.recv() => next,
                        };
                        match next {
                            Ok(d) => {
                                at.lock().unwrap().push(Instant::now());
                                *seen
                                    .lock()
                                    .unwrap()
                                    .entry(d.message().id().to_owned())
                                    .or_default() += 1;
                                // An ack lost with the connection comes back.
                                let started = Instant::now();
                                let _ = d.ack().await;
                                longest_ack = longest_ack.max(started.elapsed());
                            }
                            Err(e) if e.is_retryable() => {
                                errors += 1;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Err(e) => panic!("raw recv failed for good: {e}"),
                        }
                    }
                    let _ = sub.close().await;
                    (errors, longest_ack)
                }
                .with_subscriber(warnings),
            )
        };
        let confirmed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let publisher = {
            let confirmed = std::sync::Arc::clone(&confirmed);
            let client = client.clone();
            let topic = topic.to_owned();
            let publishing = publishing.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let mut out = Published {
                    confirmed: Vec::new(),
                    failures: 0,
                    oks: Vec::new(),
                    longest: Duration::ZERO,
                };
                for i in 0..n {
                    if publishing.is_set() {
                        break;
                    }
                    let id = format!("m{i:05}");
                    let mut last = None;
                    loop {
                        assert!(
                            start.elapsed() < FLOW_BOUND,
                            "publishing {id} did not succeed within {FLOW_BOUND:?}; the last \
                             error: {last:?}"
                        );
                        let attempt = Instant::now();
                        let result = client.publish(&topic, Message::new("x").with_id(&id)).await;
                        out.longest = out.longest.max(attempt.elapsed());
                        match result {
                            Ok(()) => {
                                out.oks.push(Instant::now());
                                break;
                            }
                            Err(e) => {
                                assert!(e.is_retryable(), "publish failed for good: {e}");
                                last = Some(e.to_string());
                                out.failures += 1;
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                    out.confirmed.push(id);
                    confirmed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(every).await;
                }
                out
            })
        };
        Flow {
            fan_out: client.capabilities().fan_out,
            by_runtime,
            by_raw,
            delivered_at,
            stop,
            publishing,
            runtime,
            raw,
            publisher,
            confirmed,
        }
    }
}

impl Flow {
    /// How many publishes were confirmed so far.
    fn confirmed(&self) -> usize {
        self.confirmed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts `id` as received by the raw subscription (by another raw
    /// subscription of the same queue).
    fn seen_by_raw(&self, id: &str) {
        *self
            .by_raw
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default() += 1;
    }

    /// Waits for the publisher, then until both subscriptions have every
    /// confirmed message (at most [`FLOW_BOUND`]), and stops them. `faults`
    /// are the instants each fault ended.
    async fn finish(self, faults: &[Instant]) -> End {
        let published = self.publisher.await.expect("the publisher");
        let recovery = seconds_until_next(faults, &published.oks);
        // Without fan-out (an SQS queue) the two subscriptions share one
        // queue: each message reaches one of them.
        let groups: Vec<(&'static str, Vec<Seen>)> = if self.fan_out {
            vec![
                ("Consumer", vec![self.by_runtime.clone()]),
                ("Subscription", vec![self.by_raw.clone()]),
            ]
        } else {
            vec![(
                "Consumer and Subscription (one queue)",
                vec![self.by_runtime.clone(), self.by_raw.clone()],
            )]
        };
        let count = |sets: &[Seen], id: &str| -> u32 {
            sets.iter()
                .map(|s| s.lock().unwrap().get(id).copied().unwrap_or(0))
                .sum()
        };
        let missing = |sets: &[Seen]| -> Vec<String> {
            published
                .confirmed
                .iter()
                .filter(|id| count(sets, id) == 0)
                .cloned()
                .collect()
        };
        let deadline = Instant::now() + FLOW_BOUND;
        while groups.iter().any(|(_, sets)| !missing(sets).is_empty()) && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A Consumer whose subscription ended returns `Ok` as if stopped:
        // tell that apart from one that stopped receiving.
        let ended_by_itself = self.runtime.is_finished();
        self.stop.set();
        let report = self.runtime.await.expect("the consumer task");
        let (raw_errors, longest_ack) = self.raw.await.expect("the raw receiver");
        assert!(
            !ended_by_itself,
            "the Consumer ended before it was stopped (its subscription ended?): {report:?}"
        );
        let groups = groups
            .iter()
            .map(|(name, sets)| Group {
                name,
                lost: missing(sets),
                duplicates: published
                    .confirmed
                    .iter()
                    .map(|id| count(sets, id).saturating_sub(1))
                    .sum(),
            })
            .collect();
        let report = report.expect("the Consumer keeps running through the faults");
        let delivered_at = std::mem::take(&mut *self.delivered_at.lock().unwrap());
        End {
            longest_publish: published.longest,
            published,
            groups,
            recovery,
            delivery_recovery: seconds_until_next(faults, &delivered_at),
            delivered_at,
            raw_errors,
            acked: report.acked,
            longest_ack,
        }
    }
}

/// What the subscriptions of a flow that share a queue (or one that has
/// its own) received.
struct Group {
    name: &'static str,
    lost: Vec<String>,
    duplicates: u32,
}

impl End {
    /// Prints the figures of case `case`; `after` names the fault ends.
    fn report(&self, case: &str, after: &str) {
        for g in &self.groups {
            let _ = writeln!(
                std::io::stderr(),
                "{case} [{}]: {} confirmed, {} lost, {} duplicates; {} failed publishes \
                 retried; publishing back {:.1?} s, deliveries back {:.1?} s after {after}",
                g.name,
                self.published.confirmed.len(),
                g.lost.len(),
                g.duplicates,
                self.published.failures,
                self.recovery,
                self.delivery_recovery,
            );
        }
        let _ = writeln!(
            std::io::stderr(),
            "{case}: the Consumer acked {}, the Subscription saw {} retryable errors",
            self.acked,
            self.raw_errors
        );
    }

    /// The longest stretch after `from` without a confirmed publish, and
    /// without a delivery (from `from` to the first one after it
    /// included): how long each side was unavailable.
    fn longest_gaps_after(&self, from: Instant) -> (Duration, Duration) {
        let gap = |times: &[Instant]| {
            let mut last = from;
            let mut longest = Duration::ZERO;
            for t in times.iter().filter(|t| **t >= from) {
                longest = longest.max(t.duration_since(last));
                last = *t;
            }
            longest
        };
        (gap(&self.published.oks), gap(&self.delivered_at))
    }

    fn assert_nothing_lost(&self, through: &str) {
        for Group { name, lost, .. } in &self.groups {
            assert!(
                lost.is_empty(),
                "{name} lost {} of {} confirmed messages through {through}, e.g. {:?}",
                lost.len(),
                self.published.confirmed.len(),
                &lost[..lost.len().min(5)]
            );
        }
    }
}

/// A one-shot stop signal for the fault cases' tasks.
#[derive(Clone, Default)]
struct Stop(std::sync::Arc<(std::sync::atomic::AtomicBool, tokio::sync::Notify)>);

impl Stop {
    fn set(&self) {
        self.0.0.store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.1.notify_waiters();
    }

    fn is_set(&self) -> bool {
        self.0.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn wait(&self) {
        loop {
            let notified = self.0.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

/// Fault case: a consumer process holds a full prefetch, acks the first
/// half of it (the half it received first, as a consumer working through a
/// batch in order does), and is killed with `SIGKILL` — a real process
/// death, not a dropped value. Another consumer of the subscription then
/// receives every message the dead one held but did not ack, each with its
/// attempt counted once (attempt 2: the dead consumer had seen it, and kept
/// its lease until it died), and none of the acked ones. The acks are given a second to leave the process before the kill
/// (every backend sends them within milliseconds: acks still in a buffer
/// when a process dies are lost, which at-least-once allows).
///
/// The memory broker lives inside its process: skipped there.
///
/// # Panics
///
/// When an unacked message is not redelivered, comes back uncounted, or an
/// acked one comes back.
pub async fn fault_consumer_killed_mid_batch(h: &dyn crate::Harness) -> crate::Outcome {
    use switchyard_core::{Message, SubscribeOptions};

    const PREFETCH: usize = 10;
    let opts = SubscribeOptions::new("s")
        .with_ack_timeout(h.ack_timeout())
        .with_prefetch(PREFETCH)
        .with_max_attempts(5);
    if let Some(args) = crate::child::child_args() {
        killed_child(h, opts, PREFETCH, &args).await;
    }
    let client = h.client().await.expect("connect");
    if !client.capabilities().persistent {
        client.close().await.unwrap();
        return crate::Outcome::Skipped(
            "an in-process broker: no consumer process can die apart from it".into(),
        );
    }
    let tag = crate::util::short_id();
    let topic = h.unique("killed");
    client.ensure_subscription(&topic, &opts).await.unwrap();
    let ids: Vec<String> = (0..PREFETCH).map(|i| format!("m{i:02}-{tag}")).collect();
    crate::util::publish_each(
        &client,
        &topic,
        ids.iter()
            .map(|id| Message::new(id.clone()).with_id(id))
            .collect(),
    )
    .await;

    let log = crate::child::Log::new(&tag);
    let log_path = log.path().to_str().expect("a UTF-8 path").to_owned();
    let Some(mut child) = crate::child::Child::spawn(&[&topic, &log_path]) else {
        return crate::Outcome::Skipped("not run by conformance_tests!: no test to re-run".into());
    };
    // The child receives the whole prefetch, acks half and says `ready`.
    let ready_within = h.receive_timeout() * 2;
    let started = Instant::now();
    while !log.lines().iter().any(|l| l == "ready") {
        let errors: Vec<String> = log
            .lines()
            .into_iter()
            .filter(|l| l.starts_with("error"))
            .collect();
        assert!(errors.is_empty(), "the child consumer failed: {errors:?}");
        assert!(
            started.elapsed() < ready_within && !child.ended_within(Duration::ZERO).await,
            "the child consumer did not get ready within {ready_within:?}: {:?}",
            log.lines()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(child); // SIGKILL, and reaped.
    let killed = Instant::now();
    let lines = log.lines();
    let field = |prefix: &str| -> Vec<String> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(prefix))
            .map(|rest| rest.split(' ').next().unwrap_or_default().to_owned())
            .collect()
    };
    let (held, acked) = (field("held "), field("acked "));
    assert_eq!(held.len(), PREFETCH, "the child held the whole prefetch");
    assert_eq!(acked.len(), PREFETCH / 2, "the child acked half of it");
    let unacked: std::collections::HashSet<String> = held
        .iter()
        .filter(|id| !acked.contains(id))
        .cloned()
        .collect();

    // Another consumer takes over: every unacked message, counted; then
    // a quiet window in which an acked one would show up.
    let mut sub = client.subscribe(&topic, opts).await.unwrap();
    let wait = h.ack_timeout() + h.slack() + h.receive_timeout();
    let mut got: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    let mut first = None;
    loop {
        let done = unacked.iter().all(|id| got.contains_key(id));
        let bound = if done {
            h.ack_timeout() + h.slack()
        } else {
            wait
        };
        let d = match tokio::time::timeout(bound, sub.recv()).await {
            Err(_) if done => break,
            Err(_) => panic!(
                "{} of {} unacked messages of the killed consumer not redelivered within \
                 {bound:?} (got {got:?})",
                unacked.iter().filter(|id| !got.contains_key(*id)).count(),
                unacked.len()
            ),
            Ok(Err(e)) if e.is_retryable() => continue,
            Ok(Err(e)) => panic!("receiving after the kill failed: {e}"),
            Ok(Ok(d)) => d,
        };
        first.get_or_insert_with(|| killed.elapsed());
        let id = d.message().id().to_owned();
        assert!(
            !acked.contains(&id),
            "{id} was acked by the killed consumer and delivered again (attempt {})",
            d.attempt()
        );
        assert!(unacked.contains(&id), "an unexpected message {id}");
        assert_eq!(
            d.attempt(),
            2,
            "{id} was handed to the killed consumer once, and comes back as attempt {}",
            d.attempt()
        );
        got.entry(id).or_insert(d.attempt());
        d.ack().await.unwrap();
    }
    let _ = writeln!(
        std::io::stderr(),
        "fault_consumer_killed_mid_batch: held {}, acked {}, killed; {} redelivered (attempts \
         {:?}), 0 acked ones again; first redelivery {:.1?} after the kill",
        held.len(),
        acked.len(),
        got.len(),
        {
            let mut a: Vec<u32> = got.values().copied().collect();
            a.sort_unstable();
            a
        },
        first.unwrap_or_default(),
    );
    sub.close().await.unwrap();
    client.close().await.unwrap();
    crate::Outcome::Passed
}

/// The child's part in [`fault_consumer_killed_mid_batch`]: receive
/// `prefetch` deliveries, ack the first half, give the acks a second to
/// leave, say `ready` and wait to be killed.
async fn killed_child(
    h: &dyn crate::Harness,
    opts: switchyard_core::SubscribeOptions,
    prefetch: usize,
    args: &[String],
) -> ! {
    use crate::child::Log;
    let [topic, log] = args else {
        panic!("child arguments: {args:?}");
    };
    let log = PathBuf::from(log);
    let fail = |what: String| -> ! {
        Log::append(&log, &format!("error {what}"));
        std::process::exit(3);
    };
    let client = h
        .client()
        .await
        .unwrap_or_else(|e| fail(format!("connect: {e}")));
    let mut sub = client
        .subscribe(topic, opts)
        .await
        .unwrap_or_else(|e| fail(format!("subscribe: {e}")));
    let mut held = Vec::with_capacity(prefetch);
    while held.len() < prefetch {
        match tokio::time::timeout(h.receive_timeout(), sub.recv()).await {
            Ok(Ok(d)) => {
                Log::append(&log, &format!("held {} {}", d.message().id(), d.attempt()));
                held.push(d);
            }
            Ok(Err(e)) => fail(format!("recv: {e}")),
            Err(_) => fail(format!("only {} of {prefetch} received", held.len())),
        }
    }
    let rest = held.split_off(prefetch / 2);
    for d in held {
        let id = d.message().id().to_owned();
        if let Err(e) = d.ack().await {
            fail(format!("ack {id}: {e}"));
        }
        Log::append(&log, &format!("acked {id}"));
    }
    // Working on the rest until the SIGKILL: their leases are kept (a
    // holder past the ack timeout would see them taken back, and counted).
    let acked_at = Instant::now();
    let every = h.ack_timeout() / 4;
    let _keep = (&sub, &client);
    loop {
        for d in &rest {
            if let Err(e) = d.extend().await {
                fail(format!("extend {}: {e}", d.message().id()));
            }
        }
        if acked_at.elapsed() >= Duration::from_secs(1) {
            Log::append(&log, "ready");
        }
        tokio::time::sleep(every).await;
    }
}

/// The connect timeout of the connect cases, and what they allow on top
/// of it (a loaded machine, a client that tries twice).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECT_SLACK: Duration = Duration::from_secs(3);

/// Fault case: connecting where nothing listens (a loopback port just
/// freed) fails with a retryable [`Error::Connection`] within the connect
/// timeout (1 s) and 3 s.
///
/// [`Error::Connection`]: switchyard_core::Error::Connection
///
/// # Panics
///
/// When the connect succeeds, fails otherwise, or takes longer.
pub async fn fault_unreachable_broker_connect_is_bounded(h: &dyn crate::Harness) -> crate::Outcome {
    let port = free_port().expect("a spare port");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    let Some(url) = h.url_at(addr, CONNECT_TIMEOUT) else {
        return crate::Outcome::Skipped("the backend has no address to connect to".into());
    };
    let connected = h.connect(&url).await;
    assert_connect_failed(connected, started, "nothing listens");
    crate::Outcome::Passed
}

/// Fault case: connecting to a peer that accepts the TCP connection and
/// never says a word (a stalled broker, a wrong port) fails with a
/// retryable [`Error::Connection`] within the connect timeout (1 s) and
/// 3 s, rather than waiting for an answer forever.
///
/// [`Error::Connection`]: switchyard_core::Error::Connection
///
/// # Panics
///
/// When the connect succeeds, fails otherwise, or takes longer.
pub async fn fault_silent_broker_connect_is_bounded(h: &dyn crate::Harness) -> crate::Outcome {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("a loopback listener");
    let addr = listener.local_addr().expect("its address");
    // Accepts and holds every connection, and never writes.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let Some(url) = h.url_at(addr, CONNECT_TIMEOUT) else {
        silent.abort();
        return crate::Outcome::Skipped("the backend has no address to connect to".into());
    };
    let started = Instant::now();
    let connected = h.connect(&url).await;
    silent.abort();
    assert_connect_failed(connected, started, "the peer never answers");
    crate::Outcome::Passed
}

fn assert_connect_failed(
    connected: switchyard_core::Result<switchyard_core::Client>,
    started: Instant,
    what: &str,
) {
    let took = started.elapsed();
    let err = match connected {
        Ok(_) => panic!("connecting where {what} succeeded"),
        Err(e) => e,
    };
    assert!(
        matches!(err, switchyard_core::Error::Connection { .. }),
        "connecting where {what}: expected Error::Connection, got {err:?}"
    );
    assert!(err.is_retryable(), "{err:?} is not retryable");
    assert!(
        took <= CONNECT_TIMEOUT + CONNECT_SLACK,
        "connecting where {what} took {took:?} with a connect timeout of {CONNECT_TIMEOUT:?}"
    );
    let _ = writeln!(
        std::io::stderr(),
        "connecting where {what} failed after {took:.1?}: {err}"
    );
}

/// Fault case: calls made while the broker is unreachable — the link
/// reset (connections refused), then blackholed (nothing answers) — each
/// end within the harness's [`Linked::bound`]: `publish`, every message of
/// a `publish_batch`, `ensure_subscription` and a new client's connect
/// fail with a retryable error; bad input (an oversized payload, an
/// invalid name) still gets its typed error at once, before anything is
/// sent; nothing hangs or panics. Once the link heals, the same client
/// publishes again. The figures (each call's time and error) are printed.
///
/// # Panics
///
/// When a call outlasts the bound, fails with a non-retryable error, or
/// bad input gets anything but its typed error.
pub async fn fault_dead_broker_calls_are_bounded(h: &dyn crate::Harness) -> crate::Outcome {
    use switchyard_core::{Error, Message, SubscribeOptions};

    let Some(linked) = h.linked().await else {
        return crate::Outcome::Skipped("the harness has no cuttable link".into());
    };
    let bound = linked.bound();
    let client = linked.client().await.expect("connect through the link");
    let topic = h.unique("fault-dead");
    client
        .ensure_subscription(&topic, &SubscribeOptions::new("s"))
        .await
        .unwrap();
    client
        .publish(&topic, Message::new("before"))
        .await
        .expect("publish before the fault");
    let limit = client.capabilities().max_payload;
    let link = linked.link();
    for fault in ["reset", "blackhole"] {
        if fault == "reset" {
            link.reset();
        } else {
            link.blackhole();
        }
        let mut figures = Vec::new();
        let mut note = |what: &str, took: Duration, result: &str| {
            figures.push(format!("{what} {took:.1?} ({result})"));
        };
        // A failed call must be retryable; one that succeeds (a client
        // that answers from its own state) is fine.
        let retryable = |what: &str, r: &Result<(), Error>| -> String {
            match r {
                Ok(()) => "ok".into(),
                Err(e) => {
                    assert!(
                        e.is_retryable(),
                        "{what} with the link {fault}: a non-retryable error: {e}"
                    );
                    format!("{e}")
                }
            }
        };
        // Bad input: its typed error at once, fault or not.
        let (r, took) = bounded(
            bound,
            "an oversized publish",
            client.publish(&topic, Message::new(vec![0u8; limit + 1])),
        )
        .await;
        assert!(
            matches!(r, Err(Error::PayloadTooLarge { .. })),
            "an oversized publish with the link {fault}: {r:?}"
        );
        note("oversized publish", took, "PayloadTooLarge");
        let (r, took) = bounded(
            bound,
            "a publish to an invalid name",
            client.publish("no spaces", Message::new("x")),
        )
        .await;
        assert!(
            matches!(r, Err(Error::InvalidName { .. })),
            "a publish to an invalid name with the link {fault}: {r:?}"
        );
        note("invalid name", took, "InvalidName");

        let (r, took) = bounded(
            bound,
            "a publish",
            client.publish(&topic, Message::new("x")),
        )
        .await;
        assert!(
            r.is_err(),
            "a publish was confirmed with the link {fault}: the link did not cut"
        );
        note("publish", took, &retryable("a publish", &r));
        let (results, took) = bounded(
            bound,
            "a publish_batch of 10",
            client.publish_batch(&topic, (0..10).map(|_| Message::new("x")).collect()),
        )
        .await;
        assert_eq!(results.len(), 10, "one result per message");
        let mut last = String::new();
        for r in &results {
            assert!(
                r.is_err(),
                "a batch message was confirmed with the link {fault}"
            );
            last = retryable("a publish_batch", r);
        }
        note("publish_batch of 10", took, &last);
        let (r, took) = bounded(
            bound,
            "ensure_subscription",
            client.ensure_subscription(&h.unique("fault-dead"), &SubscribeOptions::new("s")),
        )
        .await;
        // A brand-new subscription cannot be created without the broker.
        assert!(
            r.is_err(),
            "ensure_subscription of a new name succeeded with the link {fault}"
        );
        note(
            "ensure_subscription",
            took,
            &retryable("ensure_subscription", &r),
        );
        let (r, took) = bounded(bound, "connecting a new client", linked.client()).await;
        let r = match r {
            Ok(other) => {
                // A client may connect lazily; its first publish must fail.
                let (p, _) = bounded(
                    bound,
                    "a new client's publish",
                    other.publish(&topic, Message::new("x")),
                )
                .await;
                assert!(p.is_err(), "a new client published with the link {fault}");
                let _ = within(bound, "closing a new client", other.close()).await;
                p
            }
            Err(e) => Err(e),
        };
        note(
            "new client",
            took,
            &retryable("connecting a new client", &r),
        );
        let _ = writeln!(
            std::io::stderr(),
            "fault_dead_broker_calls_are_bounded, link {fault} (bound {bound:?}): {}",
            figures.join("; ")
        );
        link.heal();
        // The same client publishes again once the link is back.
        let healed = Instant::now();
        loop {
            match client.publish(&topic, Message::new("after")).await {
                Ok(()) => break,
                Err(e) => {
                    assert!(e.is_retryable(), "publish after the heal: {e}");
                    assert!(
                        healed.elapsed() < FLOW_BOUND,
                        "publishing did not come back within {FLOW_BOUND:?} of the heal: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let _ = writeln!(
            std::io::stderr(),
            "fault_dead_broker_calls_are_bounded: publishing back {:.1?} after the {fault} healed",
            healed.elapsed()
        );
    }
    let _ = within(bound, "closing the client", client.close()).await;
    crate::Outcome::Passed
}

/// The longest a broken subscription may take to say so.
const BROKEN_BOUND: Duration = Duration::from_secs(30);

/// A broker instance whose credentials a case can revoke
/// ([`Harness::revocable`](crate::Harness::revocable)), as an operator
/// changing a password and closing the connections does.
#[async_trait::async_trait]
pub trait Revocable: Send + Sync {
    /// A new client connected with the credentials [`revoke`](Revocable::revoke)
    /// takes away.
    ///
    /// # Errors
    ///
    /// When the broker cannot be reached.
    async fn client(&self) -> switchyard_core::Result<switchyard_core::Client>;

    /// Makes the broker refuse those credentials from now on and drops the
    /// clients' connections, so their next reconnect is refused.
    async fn revoke(&mut self);
}

/// Two live subscriptions — a raw `Subscription` and a `Consumer`, a topic
/// each (where subscriptions share a queue, as in SQS's queue mode, they
/// would compete for one message) — that have each delivered: what the
/// cases that break a subscription break.
struct Live {
    topics: [(String, &'static str); 2],
    raw: switchyard_core::Subscription,
    run: tokio::task::JoinHandle<switchyard_core::Result<switchyard_core::consumer::Report>>,
}

/// How a broken subscription ended.
struct Ended {
    error: switchyard_core::Error,
    retryable: u32,
    raw_took: Duration,
    run_took: Duration,
}

impl Live {
    async fn start(h: &dyn crate::Harness, client: &switchyard_core::Client, tag: &str) -> Self {
        use switchyard_core::{Message, SubscribeOptions, consumer::Consumer};

        let topics = [(h.unique(tag), RAW), (h.unique(tag), RUNTIME)];
        for (topic, name) in &topics {
            client
                .ensure_subscription(topic, &SubscribeOptions::new(*name))
                .await
                .unwrap();
        }
        let mut raw = client
            .subscribe(&topics[0].0, SubscribeOptions::new(RAW))
            .await
            .unwrap();
        let runtime = client
            .subscribe(&topics[1].0, SubscribeOptions::new(RUNTIME))
            .await
            .unwrap();
        for (topic, _) in &topics {
            client.publish(topic, Message::new("x")).await.unwrap();
        }
        crate::util::recv_one(&mut raw, h.receive_timeout(), "before the fault")
            .await
            .ack()
            .await
            .unwrap();
        let (handled_tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
        let run = tokio::spawn(Consumer::new().run(
            runtime,
            move |_ctx| {
                let _ = handled_tx.send(());
                async { Ok(()) }
            },
            std::future::pending::<()>(),
        ));
        tokio::time::timeout(h.receive_timeout(), handled.recv())
            .await
            .expect("the Consumer handles before the fault");
        Self { topics, raw, run }
    }

    /// Waits, from `since` and at most [`BROKEN_BOUND`], for the raw
    /// `recv` loop (retryable errors allowed) and for `Consumer::run` to
    /// end with a non-retryable error that `expected` accepts.
    ///
    /// # Panics
    ///
    /// When either delivers, waits past the bound, or ends otherwise.
    async fn ended(
        mut self,
        since: Instant,
        expected: (&str, fn(&switchyard_core::Error) -> bool),
    ) -> Ended {
        let (want, accepts) = expected;
        let mut retryable = 0u32;
        let error = loop {
            let left = BROKEN_BOUND.saturating_sub(since.elapsed());
            match tokio::time::timeout(left, self.raw.recv()).await {
                Err(_) => panic!(
                    "recv kept waiting {BROKEN_BOUND:?} after the fault ({retryable} retryable \
                     errors meanwhile)"
                ),
                Ok(Ok(d)) => panic!("recv delivered {} after the fault", d.message().id()),
                Ok(Err(e)) if e.is_retryable() => {
                    retryable += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Err(e)) => break e,
            }
        };
        let raw_took = since.elapsed();
        assert!(accepts(&error), "recv: expected {want}, got {error:?}");
        let left = BROKEN_BOUND.saturating_sub(since.elapsed()) + Duration::from_secs(5);
        let ran = tokio::time::timeout(left, self.run)
            .await
            .expect("Consumer::run kept running after the fault")
            .expect("the Consumer task");
        let run_took = since.elapsed();
        let run_error = ran.expect_err("Consumer::run ended without an error");
        assert!(
            accepts(&run_error),
            "Consumer::run: expected {want}, got {run_error:?}"
        );
        let _ = self.raw.close().await;
        Ended {
            error,
            retryable,
            raw_took,
            run_took,
        }
    }
}

impl Ended {
    fn report(&self, case: &str) {
        let _ = writeln!(
            std::io::stderr(),
            "{case}: recv ended after {:.1?} ({} retryable errors before), Consumer::run after \
             {:.1?}: {}",
            self.raw_took,
            self.retryable,
            self.run_took,
            self.error
        );
    }
}

/// Fault case: the broker resource two live subscriptions read from is
/// deleted under them, as an operator would
/// ([`Harness::delete_subscription`](crate::Harness::delete_subscription)).
/// A raw [`Subscription`](switchyard_core::Subscription) looping on `recv`
/// gets [`Error::NotFound`](switchyard_core::Error::NotFound) (typed, not
/// retryable) within 30 s — retryable errors before it are allowed, a
/// silent stall or a quietly recreated, empty queue are not — and
/// [`Consumer::run`](switchyard_core::consumer::Consumer::run) returns
/// that error by itself.
///
/// # Panics
///
/// When either keeps waiting past the bound, or ends with another error.
pub async fn fault_deleted_subscription_surfaces(h: &dyn crate::Harness) -> crate::Outcome {
    let client = h.client().await.expect("connect");
    let live = Live::start(h, &client, "deleted").await;
    for (topic, name) in &live.topics {
        if let Err(why) = h.delete_subscription(topic, name).await {
            live.run.abort();
            return crate::Outcome::Skipped(why);
        }
    }
    let ended = live
        .ended(
            Instant::now(),
            ("NotFound", switchyard_core::Error::is_not_found),
        )
        .await;
    ended.report("fault_deleted_subscription_surfaces");
    let _ = client.close().await;
    crate::Outcome::Passed
}

/// Fault case: the broker stops accepting the credentials of two live
/// subscriptions' client and drops its connections
/// ([`Harness::revocable`](crate::Harness::revocable)). A raw `recv` loop
/// and `Consumer::run` end with
/// [`Error::Authentication`](switchyard_core::Error::Authentication) (not
/// retryable) within 30 s instead of reconnecting for ever behind
/// timeouts, and the same client's `publish` says so too.
///
/// # Panics
///
/// When any of them keeps waiting past the bound, or ends otherwise.
pub async fn fault_refused_credentials_surface(h: &dyn crate::Harness) -> crate::Outcome {
    use switchyard_core::{Error, Message};

    let Some(mut broker) = h.revocable().await else {
        return crate::Outcome::Skipped("the harness cannot revoke credentials".into());
    };
    let client = broker.client().await.expect("connect");
    let live = Live::start(h, &client, "refused").await;
    let topic = live.topics[0].0.clone();
    broker.revoke().await;
    let authentication = |e: &Error| matches!(e, Error::Authentication { .. });
    let ended = live
        .ended(Instant::now(), ("Authentication", authentication))
        .await;
    ended.report("fault_refused_credentials_surface");
    let (published, took) = bounded(
        BROKEN_BOUND,
        "a publish with refused credentials",
        client.publish(&topic, Message::new("y")),
    )
    .await;
    assert!(
        published.as_ref().is_err_and(authentication),
        "publish with refused credentials: {published:?} after {took:.1?}"
    );
    let _ = tokio::time::timeout(BROKEN_BOUND, client.close()).await;
    crate::Outcome::Passed
}
