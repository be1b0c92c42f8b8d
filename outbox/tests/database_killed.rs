//! The database under the outbox is SIGKILLed mid-stream and restarted: a
//! private PostgreSQL of this test's own (Debian's server binaries, a fresh
//! cluster on a spare loopback port), never the machine's.
//!
//! Every event whose transaction committed reaches the subscriber; the
//! relay carries on by itself after the restart.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sqlx::{PgPool, postgres::PgPoolOptions};
use switchyard::{Message, SubscribeOptions};
use switchyard_conformance::broker_url;
use switchyard_outbox::Outbox;

/// A PostgreSQL server of the test's own, stopped (by PID) when dropped.
struct Server {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    process: Option<std::process::Child>,
}

/// Runs a server binary as the `postgres` user when this process is root
/// (PostgreSQL refuses to run as root).
fn as_postgres(bin: &Path) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

impl Server {
    /// A fresh cluster on a free port, started.
    fn start() -> Option<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .filter(|b| b.join("postgres").exists())
            .max()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let dir = std::env::temp_dir().join(format!("sy-outbox-pg-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).ok()?;
        let _ = Command::new("chown").arg("postgres").arg(&dir).status();
        let ok = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", "postgres", "--auth=trust"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()?
            .success();
        assert!(ok, "initdb failed in {}", dir.display());
        let mut server = Self {
            bin,
            dir,
            port,
            process: None,
        };
        server.run();
        Some(server)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn run(&mut self) {
        let process = as_postgres(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        self.process = Some(process);
    }

    /// The postmaster's PID, from its pid file.
    fn postmaster(&self) -> Option<String> {
        let pid = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).ok()?;
        pid.lines().next().map(str::to_owned)
    }

    /// SIGKILL to the postmaster (its backends exit when it is gone).
    fn kill(&mut self) {
        if let Some(pid) = self.postmaster() {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
        if let Some(mut p) = self.process.take() {
            let _ = p.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(pid) = self.postmaster() {
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
        }
        if let Some(mut p) = self.process.take() {
            let _ = p.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn connect(url: &str, within: Duration) -> PgPool {
    let until = Instant::now() + within;
    loop {
        match PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(2))
            .connect(url)
            .await
        {
            Ok(pool) => return pool,
            Err(e) => {
                assert!(
                    Instant::now() < until,
                    "no PostgreSQL within {within:?}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_events_survive_a_database_kill() {
    // Runs where the other outbox tests run (a PostgreSQL is required).
    if broker_url("SWITCHYARD_POSTGRES_URL").is_none() {
        return;
    }
    let mut server = Server::start().expect("PostgreSQL's server binaries (Debian's postgresql)");
    let pool = connect(&server.url(), Duration::from_secs(30)).await;
    let outbox = Outbox::new();
    outbox.migrate(&pool).await.unwrap();
    let client = switchyard::connect("memory://database-killed")
        .await
        .unwrap();
    let opts = SubscribeOptions::new("s");
    client
        .ensure_subscription("orders.created", &opts)
        .await
        .unwrap();

    let received: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut sub = client.subscribe("orders.created", opts).await.unwrap();
    let r = Arc::clone(&received);
    let receiver = tokio::spawn(async move {
        while let Ok(d) = sub.recv().await {
            r.lock().unwrap().insert(d.message().id().to_owned());
            let _ = d.ack().await;
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(
        outbox
            .relay(pool.clone(), client.clone())
            .with_poll_interval(Duration::from_millis(200))
            .run(async {
                let _ = stopped.await;
            }),
    );

    // A producer committing events at a steady rate; a commit that fails
    // (the database is down) is not confirmed and not expected.
    let total = 1_500;
    let mut confirmed = Vec::new();
    let mut failed = 0;
    let mut killed_at = None;
    let mut back_at = None;
    for i in 0..total {
        if i == total / 3 {
            server.kill();
            killed_at = Some(Instant::now());
        }
        // Down for two seconds of attempted commits.
        if back_at.is_none()
            && killed_at.is_some_and(|at: Instant| at.elapsed() >= Duration::from_secs(2))
        {
            server.run();
            back_at = Some(Instant::now());
        }
        let message = Message::new(format!("{i}")).with_key(format!("k{}", i % 16));
        let id = message.id().to_owned();
        let commit = async {
            let mut tx = pool.begin().await?;
            outbox.enqueue(&mut tx, "orders.created", message).await?;
            tx.commit().await?;
            Ok::<_, switchyard_outbox::Error>(())
        };
        match tokio::time::timeout(Duration::from_millis(500), commit).await {
            Ok(Ok(())) => confirmed.push(id),
            _ => {
                failed += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (killed_at, back_at) = (killed_at.unwrap(), back_at.unwrap());
    assert!(failed > 0, "the kill made commits fail");
    assert!(
        confirmed.len() > total / 2,
        "only {} commits succeeded",
        confirmed.len()
    );

    let until = Instant::now() + Duration::from_secs(90);
    let missing = loop {
        let got = received.lock().unwrap().clone();
        let missing: Vec<&String> = confirmed.iter().filter(|id| !got.contains(*id)).collect();
        if missing.is_empty() || Instant::now() > until {
            break missing.len();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "database killed for {:.1} s: {} committed, {} failed, {missing} lost",
        back_at.duration_since(killed_at).as_secs_f64(),
        confirmed.len(),
        failed
    );
    assert_eq!(missing, 0, "committed events lost");
    let _ = stop.send(());
    relay.await.unwrap().unwrap();
    client.close().await.unwrap();
    receiver.await.unwrap();
}
