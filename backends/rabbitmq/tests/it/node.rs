//! A RabbitMQ node of the test's own, on spare loopback ports, to kill and
//! restart (the machine's broker is never touched). Runs the installed
//! server (`/usr/lib/rabbitmq/bin/rabbitmq-server`, or
//! `SWITCHYARD_RABBITMQ_SERVER`) with its own node name, config, plugins
//! (none) and data directory under the system temp directory.

use std::{path::PathBuf, time::Duration};

use switchyard_conformance::fault::{BrokerProcess, Revocable, free_port};
use switchyard_core::{Client, Result};

/// How long a node may take to boot (about 5 s here).
pub(crate) const BOOT: Duration = Duration::from_secs(60);

pub(crate) struct Node {
    process: BrokerProcess,
    name: String,
}

impl Node {
    /// The server binary, or `None` (with a note) when RabbitMQ is not
    /// installed here.
    fn server() -> Option<PathBuf> {
        let path = std::env::var_os("SWITCHYARD_RABBITMQ_SERVER").map_or_else(
            || "/usr/lib/rabbitmq/bin/rabbitmq-server".into(),
            PathBuf::from,
        );
        path.exists().then_some(path)
    }

    /// Starts a fresh node; `None` when the server is not installed (a
    /// failure when `SWITCHYARD_REQUIRE_BROKERS` is set).
    pub(crate) async fn start() -> Option<Self> {
        let mut node = Self::create("sy-fault")?;
        node.boot().await;
        Some(node)
    }

    /// A fresh node named `{prefix}-{port}@localhost`, not started; `None`
    /// when the server is not installed (a failure when
    /// `SWITCHYARD_REQUIRE_BROKERS` is set).
    pub(crate) fn create(prefix: &str) -> Option<Self> {
        let Some(server) = Self::server() else {
            assert!(
                std::env::var_os("SWITCHYARD_REQUIRE_BROKERS").is_none(),
                "SWITCHYARD_REQUIRE_BROKERS is set but rabbitmq-server is not installed"
            );
            eprintln!("skipped: rabbitmq-server is not installed");
            return None;
        };
        let port = free_port().expect("a spare port");
        let dist = free_port().expect("a spare port");
        let dir = std::env::temp_dir().join(format!("switchyard-rabbit-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("rabbitmq.conf");
        std::fs::write(
            &conf,
            format!(
                "listeners.tcp.1 = 127.0.0.1:{port}\n\
                 log.file.level = info\n"
            ),
        )
        .unwrap();
        let plugins = dir.join("enabled_plugins");
        std::fs::write(&plugins, "[].\n").unwrap();
        let env_file = dir.join("rabbitmq-env.conf");
        std::fs::write(&env_file, "").unwrap();
        let mut process = BrokerProcess::new(server, port, &dir);
        process
            .env("RABBITMQ_NODENAME", format!("{prefix}-{port}@localhost"))
            .env("RABBITMQ_CONF_ENV_FILE", &env_file)
            .env("RABBITMQ_CONFIG_FILE", &conf)
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", &plugins)
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("node.pid"))
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            // The script then `exec`s the Erlang VM: the child's PID is the
            // broker's, so a kill is a real crash.
            .env("RABBITMQ_ALLOW_INPUT", "1")
            // No scheduler busy-waiting (RabbitMQ's advice for shared hosts):
            // a spinning private node starved the machine's broker on 2 cores
            // (a 10 s gap in its log, two connects timing out at once).
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-noinput -kernel inet_dist_use_interface {127,0,0,1} \
                 +sbwt none +sbwtdcpu none +sbwtdio none",
            )
            .scratch(true);
        Some(Self {
            process,
            name: format!("{prefix}-{port}@localhost"),
        })
    }

    /// The Erlang node name, `{prefix}-{port}@localhost`.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Starts the node (again, after a kill: same port and data) and
    /// returns once it accepts connections.
    pub(crate) async fn boot(&mut self) {
        self.process.boot(BOOT).await;
    }

    /// The node's process (for a `ProcessBroker`).
    pub(crate) fn into_process(self) -> BrokerProcess {
        self.process
    }

    /// The node's AMQP URL.
    pub(crate) fn url(&self) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f?connect_timeout=5s",
            self.process.port()
        )
    }

    /// The node's AMQP port.
    pub(crate) fn port(&self) -> u16 {
        self.process.port()
    }

    /// Runs `rabbitmqctl` against this node (as an operator would), e.g.
    /// `["change_password", "guest", "other"]`.
    ///
    /// # Panics
    ///
    /// When the command fails or takes longer than 60 s.
    pub(crate) fn ctl(&self, args: &[&str]) -> String {
        let ctl = Self::server()
            .expect("rabbitmq-server")
            .with_file_name("rabbitmqctl");
        // Bounded: a CLI that cannot reach its node would otherwise wait
        // for ever, blocking the case's thread past its own time bound.
        let out = std::process::Command::new("timeout")
            .args(["--kill-after=5", "60"])
            .arg(ctl)
            .args(["-n", &self.name])
            .args(args)
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_CTL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .output()
            .expect("run rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `SIGKILL`: a crash, nothing flushed on the way down.
    pub(crate) fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the node again on the same port and data.
    pub(crate) async fn restart(&mut self) {
        self.boot().await;
    }
}

/// Revoking changes `guest`'s password and closes every connection, as an
/// operator would with `rabbitmqctl`.
#[async_trait::async_trait]
impl Revocable for Node {
    async fn client(&self) -> Result<Client> {
        switchyard_rabbitmq::connect(&super::with_expiry(&self.url())).await
    }

    async fn revoke(&mut self) {
        let _ = self.ctl(&["change_password", "guest", "changed"]);
        let _ = self.ctl(&["close_all_connections", "credentials revoked"]);
    }
}
