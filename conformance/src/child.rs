//! Consumer processes that crash: the suite re-runs its own test binary as
//! a child (only the case that asked, by its exact test name), with
//! [`CHILD_ENV`] telling the case to play the child's part. The child is
//! stopped by PID — by itself (`abort`, the crash under test) or by the
//! parent (`SIGKILL` when it is told to, or when the parent's case ends) —
//! never left behind.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

/// Set in a child's environment: the part it plays (the case's own
/// tab-separated arguments).
pub(crate) const CHILD_ENV: &str = "SWITCHYARD_CONFORMANCE_CHILD";

tokio::task_local! {
    /// The running case's test path (`module::case`, as the test binary
    /// names it), set by [`conformance_tests!`](crate::conformance_tests).
    static CASE_PATH: &'static str;
}

/// Runs `case` knowing its test path (`module_path!()::case` of the
/// expanded test; the crate's own name is dropped).
pub async fn scoped<F: std::future::Future>(path: &'static str, case: F) -> F::Output {
    CASE_PATH.scope(path, case).await
}

/// The arguments of this process's part when it is a child, else `None`.
pub(crate) fn child_args() -> Option<Vec<String>> {
    let spec = std::env::var(CHILD_ENV).ok()?;
    Some(spec.split('\t').map(str::to_owned).collect())
}

/// The libtest name of the running case, as `--exact` wants it.
fn test_name() -> Option<String> {
    let path = CASE_PATH.try_with(|p| *p).ok()?;
    // `it::fifo::case` → `fifo::case`.
    Some(
        path.split_once("::")
            .map_or(path, |(_, rest)| rest)
            .to_owned(),
    )
}

/// A child process playing a case's consumer. Killed (`SIGKILL`) and reaped
/// when dropped, if it is still running.
pub(crate) struct Child {
    process: std::process::Child,
}

impl Child {
    /// Starts this test binary again, running only the current case, with
    /// `args` as its part. `None` when the case runs outside
    /// [`conformance_tests!`](crate::conformance_tests) (no test name).
    pub(crate) fn spawn(args: &[&str]) -> Option<Self> {
        let name = test_name()?;
        let exe = std::env::current_exe().ok()?;
        let mut command = Command::new(exe);
        command
            .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, args.join("\t"));
        // The child reaches this process's broker containers, not new ones.
        #[cfg(feature = "containers")]
        command.envs(crate::containers::child_env());
        let process = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(Self { process })
    }

    /// Waits up to `bound` for the child to end by itself; `true` when it
    /// did (crashed, or exited), `false` when it is still running.
    pub(crate) async fn ended_within(&mut self, bound: Duration) -> bool {
        let until = tokio::time::Instant::now() + bound;
        loop {
            if matches!(self.process.try_wait(), Ok(Some(_)) | Err(_)) {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if matches!(self.process.try_wait(), Ok(None)) {
            let _ = self.process.kill();
        }
        let _ = self.process.wait();
    }
}

/// A log a child appends to and its parent reads: one line per event.
#[derive(Debug)]
pub(crate) struct Log {
    path: PathBuf,
}

impl Log {
    /// A fresh, empty log in the temporary directory.
    pub(crate) fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("switchyard-conformance-{tag}.log"));
        let _ = std::fs::remove_file(&path);
        Self { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `line` to the log at `path` (written before it returns, so it
    /// survives the writer's crash right after).
    pub(crate) fn append(path: &Path, line: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open the child log");
        f.write_all(format!("{line}\n").as_bytes())
            .expect("write the child log");
    }

    /// Every line so far.
    pub(crate) fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
