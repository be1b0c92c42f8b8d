//! The `switchyard` command run as a user runs it: one process per command,
//! against every broker the environment names (`SWITCHYARD_*_URL`; CI sets
//! `SWITCHYARD_REQUIRE_BROKERS=1`, so a missing one fails instead of
//! skipping), plus a live migration between two real brokers.

use std::{process::Output, time::Duration};

mod commands;
mod migration;

/// Every command run by these tests ends within this bound.
const COMMAND_BOUND: Duration = Duration::from_secs(120);

/// Runs `switchyard ARGS…` with `stdin` as its input; kills it at the bound.
pub(crate) async fn run(args: &[&str], stdin: &[u8]) -> Output {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the switchyard binary starts");
    let mut input = child.stdin.take().expect("stdin is piped");
    input.write_all(stdin).await.expect("writing stdin");
    drop(input);
    tokio::time::timeout(COMMAND_BOUND, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("switchyard {args:?} did not end within {COMMAND_BOUND:?}"))
        .expect("waiting for switchyard")
}

/// Runs a command that must succeed; returns its standard output.
pub(crate) async fn ok(args: &[&str], stdin: &[u8]) -> String {
    let out = run(args, stdin).await;
    assert!(
        out.status.success(),
        "switchyard {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The JSON objects of a command's output, one per line.
pub(crate) fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A topic name no earlier run used.
pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}.{}", &switchyard::new_id()[24..])
}
