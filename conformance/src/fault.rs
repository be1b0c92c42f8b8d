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
    io,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

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
        let child = Command::new(&self.program)
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
