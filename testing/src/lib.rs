//! Brokers in containers for tests: start one, wait until it really serves,
//! get the URL to `switchyard::connect`, and it is removed when dropped.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use switchyard_testing::{Broker, Kind};
//!
//! let broker = Broker::start(Kind::Nats).await?; // a nats:2.10 container
//! let client = switchyard::connect(broker.url()).await?;
//! # drop(client);
//! # Ok(())
//! # }
//! ```
//!
//! It talks to the container engine of `DOCKER_HOST` (or Docker's usual
//! sockets) through [testcontainers]: Docker on a laptop or in CI, or
//! podman's Docker-compatible service (`scripts/containers.sh` in this
//! repository starts one and builds images from a machine's installed
//! brokers, for machines without a registry).
//!
//! # Images
//!
//! | [`Kind`] | default image | override | port |
//! |---|---|---|---|
//! | `Nats` | `nats:2.10` (JetStream on) | `SWITCHYARD_NATS_IMAGE` | 4222 |
//! | `RabbitMq` | `rabbitmq:3.13` | `SWITCHYARD_RABBITMQ_IMAGE` | 5672 |
//! | `Kafka` | `apache/kafka:3.9.1` (KRaft, one node) | `SWITCHYARD_KAFKA_IMAGE` | 9092 |
//! | `Sqs` | `motoserver/moto:5.1.4` (SQS and SNS) | `SWITCHYARD_SQS_IMAGE` | 5000 |
//!
//! An override must serve the same protocol on the same container port.
//! The Kafka container is told the address clients must use through both
//! Apache Kafka's (`KAFKA_ADVERTISED_LISTENERS`) and tansu's
//! (`ADVERTISED_LISTENER_URL`) settings.
//!
//! # Ports
//!
//! The host port is chosen here (a free loopback port) and published on
//! `127.0.0.1` only, rather than read back from the engine: podman 4.3
//! reports a binding's host address as `""`, where testcontainers' port
//! lookup finds nothing. The port stays the same across
//! [`kill`](Broker::kill) and [`restart`](Broker::restart), so clients
//! reconnect to the same URL.
//!
//! # Readiness
//!
//! [`Broker::start`] returns once the broker answers its own protocol, not
//! when the port opens: a JetStream API request for NATS, an AMQP method
//! frame for RabbitMQ, a Kafka metadata response naming a broker, an HTTP
//! response from moto.
//!
//! # Cleanup
//!
//! Dropping a [`Broker`] removes its container (waiting up to 30 s). Each
//! container is labelled with the test process's id; a container whose
//! process is gone (a test killed, or a broker kept in a `static`) is
//! removed by the next [`Broker::start`] on the same machine.
//!
//! [testcontainers]: https://docs.rs/testcontainers

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use bollard::{
    models::{HostConfig, PortBinding},
    query_parameters::{KillContainerOptions, ListContainersOptions, RemoveContainerOptions},
};
use testcontainers::{
    ContainerAsync, GenericImage, ImageExt, core::IntoContainerPort, runners::AsyncRunner,
};

mod probe;

/// The label every container started here carries: the id of the process
/// that started it.
pub const OWNER_LABEL: &str = "org.switchyard.testing.pid";

/// How long [`Broker::start`] and [`Broker::restart`] wait for a broker by
/// default (a RabbitMQ boots in about 10 s on 2 cores; an image pull may
/// take longer the first time).
pub const DEFAULT_READY_WITHIN: Duration = Duration::from_secs(180);

/// Which broker to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// NATS with JetStream.
    Nats,
    /// RabbitMQ.
    RabbitMq,
    /// Apache Kafka (or a Kafka-compatible broker given as the image).
    Kafka,
    /// AWS SQS and SNS, as moto serves them.
    Sqs,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 4] = [Kind::Nats, Kind::RabbitMq, Kind::Kafka, Kind::Sqs];

    /// The environment variable that overrides the image.
    #[must_use]
    pub fn image_var(self) -> &'static str {
        match self {
            Kind::Nats => "SWITCHYARD_NATS_IMAGE",
            Kind::RabbitMq => "SWITCHYARD_RABBITMQ_IMAGE",
            Kind::Kafka => "SWITCHYARD_KAFKA_IMAGE",
            Kind::Sqs => "SWITCHYARD_SQS_IMAGE",
        }
    }

    /// The brokers' official image, pinned.
    #[must_use]
    pub fn default_image(self) -> &'static str {
        match self {
            Kind::Nats => "nats:2.10",
            Kind::RabbitMq => "rabbitmq:3.13",
            Kind::Kafka => "apache/kafka:3.9.1",
            Kind::Sqs => "motoserver/moto:5.1.4",
        }
    }

    /// The image to run: the override's value, else the default.
    #[must_use]
    pub fn image(self) -> String {
        std::env::var(self.image_var())
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| self.default_image().to_owned())
    }

    /// The port the broker listens on inside its container.
    #[must_use]
    pub fn container_port(self) -> u16 {
        match self {
            Kind::Nats => 4222,
            Kind::RabbitMq => 5672,
            Kind::Kafka => 9092,
            Kind::Sqs => 5000,
        }
    }

    /// The switchyard URL of this kind of broker on `127.0.0.1:port`.
    ///
    /// SQS clients take their credentials from the AWS chain; moto accepts
    /// any (e.g. `AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test`).
    #[must_use]
    pub fn url(self, port: u16) -> String {
        match self {
            Kind::Nats => format!("nats://127.0.0.1:{port}"),
            Kind::RabbitMq => format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            Kind::Kafka => format!("kafka://127.0.0.1:{port}"),
            Kind::Sqs => format!("sqs://?region=us-east-1&endpoint=http://127.0.0.1:{port}"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Nats => "nats",
            Kind::RabbitMq => "rabbitmq",
            Kind::Kafka => "kafka",
            Kind::Sqs => "sqs",
        }
    }

    /// The container request: image, command, environment, the port
    /// published on `127.0.0.1:host_port`, the owner label.
    fn request(
        self,
        image: &str,
        host_port: u16,
    ) -> testcontainers::ContainerRequest<GenericImage> {
        let (name, tag) = split_image(image);
        let port = self.container_port();
        let mut request = GenericImage::new(name, tag)
            .with_mapped_port(host_port, port.tcp())
            .with_label(OWNER_LABEL, std::process::id().to_string())
            .with_label("org.switchyard.testing.kind", self.name())
            .with_startup_timeout(Duration::from_secs(600))
            .with_host_config_modifier(move |config: &mut HostConfig| {
                // Loopback only: never publish a test broker on every interface.
                config.port_bindings = Some(HashMap::from([(
                    format!("{port}/tcp"),
                    Some(vec![PortBinding {
                        host_ip: Some("127.0.0.1".into()),
                        host_port: Some(host_port.to_string()),
                    }]),
                )]));
            });
        match self {
            Kind::Nats => request = request.with_cmd(["-js", "-sd", "/data"]),
            Kind::RabbitMq | Kind::Sqs => {}
            Kind::Kafka => {
                let advertised = format!("127.0.0.1:{host_port}");
                for (k, v) in [
                    // Apache Kafka's image: one node, broker and controller.
                    ("KAFKA_NODE_ID", "1".to_owned()),
                    ("KAFKA_PROCESS_ROLES", "broker,controller".to_owned()),
                    (
                        "KAFKA_LISTENERS",
                        "PLAINTEXT://0.0.0.0:9092,CONTROLLER://localhost:9093".to_owned(),
                    ),
                    (
                        "KAFKA_ADVERTISED_LISTENERS",
                        format!("PLAINTEXT://{advertised}"),
                    ),
                    ("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER".to_owned()),
                    (
                        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
                        "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT".to_owned(),
                    ),
                    (
                        "KAFKA_CONTROLLER_QUORUM_VOTERS",
                        "1@localhost:9093".to_owned(),
                    ),
                    ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1".to_owned()),
                    (
                        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                        "1".to_owned(),
                    ),
                    ("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1".to_owned()),
                    ("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0".to_owned()),
                    // tansu (a Kafka-compatible broker) reads this one.
                    ("ADVERTISED_LISTENER_URL", format!("tcp://{advertised}")),
                ] {
                    request = request.with_env_var(k, v);
                }
            }
        }
        request
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `name:tag`, `registry:port/name:tag` or `name` (tag `latest`).
fn split_image(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (image, "latest"),
    }
}

/// What went wrong starting or driving a broker container.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No container engine answers: neither `DOCKER_HOST` nor Docker's
    /// usual sockets lead to one.
    #[error(
        "no container engine: {detail}; start Docker, or podman's Docker-compatible service \
         (scripts/containers.sh) and export DOCKER_HOST=unix://<its socket>"
    )]
    NoEngine {
        /// What was tried and how it failed.
        detail: String,
    },
    /// The engine refused or failed an operation (pulling or creating the
    /// image's container, starting, killing…).
    #[error("the container engine failed to {action} ({image}): {source}")]
    Engine {
        /// What was being done.
        action: &'static str,
        /// The image.
        image: String,
        /// The engine's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The container runs but the broker did not answer its protocol in
    /// time.
    #[error("the {kind} broker in {image} did not answer on {url} within {waited:?}: {last}")]
    NotReady {
        /// Which broker.
        kind: Kind,
        /// The image.
        image: String,
        /// The URL it was probed at.
        url: String,
        /// How long it was given.
        waited: Duration,
        /// The last probe's failure.
        last: String,
    },
    /// No free loopback port could be found.
    #[error("no free port on 127.0.0.1: {0}")]
    Port(#[source] std::io::Error),
}

/// A `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A broker running in a container of its own.
///
/// Removed when dropped. See the [crate docs](crate) for images, ports and
/// readiness.
pub struct Broker {
    kind: Kind,
    image: String,
    port: u16,
    url: String,
    ready_within: Duration,
    container: Option<Arc<ContainerAsync<GenericImage>>>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("kind", &self.kind)
            .field("image", &self.image)
            .field("port", &self.port)
            .field(
                "container",
                &self.container.as_ref().map(|c| c.id().to_owned()),
            )
            .finish()
    }
}

/// How to start a [`Broker`]: [`Broker::builder`].
#[derive(Debug, Clone)]
pub struct Builder {
    kind: Kind,
    image: String,
    ready_within: Duration,
}

impl Builder {
    /// Runs this image instead of the kind's (see [`Kind::image`]).
    #[must_use]
    pub fn with_image(mut self, image: impl Into<String>) -> Self {
        self.image = image.into();
        self
    }

    /// How long to wait for the broker to answer, on start and on each
    /// restart ([`DEFAULT_READY_WITHIN`] by default).
    #[must_use]
    pub fn with_ready_within(mut self, within: Duration) -> Self {
        self.ready_within = within;
        self
    }

    /// Starts the container and waits until the broker answers.
    ///
    /// # Errors
    ///
    /// [`Error::NoEngine`] without a container engine, [`Error::Engine`]
    /// when it cannot run the image, [`Error::NotReady`] when the broker
    /// does not answer within the bound (the container is then removed).
    pub async fn start(self) -> Result<Broker> {
        engine_answers().await?;
        on_engine(reap_orphans()).await;
        let port = free_port().map_err(Error::Port)?;
        let request = self.kind.request(&self.image, port);
        let image = self.image.clone();
        let started = on_engine(async move { request.start().await }).await;
        let container = started.map_err(|e| Error::Engine {
            action: "start a container",
            image: image.clone(),
            source: Box::new(e),
        })?;
        let broker = Broker {
            kind: self.kind,
            url: self.kind.url(port),
            image,
            port,
            ready_within: self.ready_within,
            container: Some(Arc::new(container)),
        };
        broker.wait_ready().await?;
        Ok(broker)
    }
}

impl Broker {
    /// Starts a broker of `kind` from its image (see [`Kind::image`]) and
    /// waits until it answers (at most [`DEFAULT_READY_WITHIN`]).
    ///
    /// # Errors
    ///
    /// As [`Builder::start`].
    pub async fn start(kind: Kind) -> Result<Self> {
        Self::builder(kind).start().await
    }

    /// A builder, to choose the image or the wait.
    #[must_use]
    pub fn builder(kind: Kind) -> Builder {
        Builder {
            kind,
            image: kind.image(),
            ready_within: DEFAULT_READY_WITHIN,
        }
    }

    /// The URL to give `switchyard::connect`.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Which broker this is.
    #[must_use]
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The image it runs.
    #[must_use]
    pub fn image(&self) -> &str {
        &self.image
    }

    /// The host port (on `127.0.0.1`) the broker is published on.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The container's id.
    #[must_use]
    pub fn id(&self) -> &str {
        self.container().id()
    }

    fn container(&self) -> &Arc<ContainerAsync<GenericImage>> {
        self.container.as_ref().expect("the container until drop")
    }

    /// Kills the broker with `SIGKILL` (a crash: nothing flushed). The
    /// container and its data stay, for [`restart`](Self::restart).
    ///
    /// # Errors
    ///
    /// [`Error::Engine`] when the engine refuses.
    pub async fn kill(&self) -> Result<()> {
        self.engine_call("kill the container", kill_container(self.id().to_owned()))
            .await
    }

    /// [`kill`](Self::kill) for code that cannot wait asynchronously (a
    /// `Drop`, a synchronous trait method); blocks the calling thread until
    /// the engine has killed the broker (at most 30 s).
    ///
    /// # Errors
    ///
    /// [`Error::Engine`] when the engine refuses or does not answer.
    pub fn kill_blocking(&self) -> Result<()> {
        let killed = kill_container(self.id().to_owned());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        spawn_on_engine(async move {
            let _ = tx.send(killed.await);
        });
        let outcome = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| Err("the engine did not answer within 30s".into()));
        outcome.map_err(|source| Error::Engine {
            action: "kill the container",
            image: self.image.clone(),
            source,
        })
    }

    /// Keeps the broker for the rest of the process, for one shared by
    /// every test of a binary (a `static` is never dropped). It is removed
    /// once the process has exited: by a watchdog process that runs
    /// `docker rm -f` (or `podman rm -f`) where either command exists, and
    /// otherwise by the next [`Broker::start`] on this machine.
    pub fn keep_until_exit(self) -> &'static Broker {
        let watchdog = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             docker rm -f {id} >/dev/null 2>&1 || podman rm -f {id} >/dev/null 2>&1",
            pid = std::process::id(),
            id = self.id(),
        );
        let _ = std::process::Command::new("sh")
            .args(["-c", &watchdog])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        Box::leak(Box::new(self))
    }

    /// Starts the killed (or stopped) container again, same port and
    /// data, and waits until the broker answers.
    ///
    /// # Errors
    ///
    /// [`Error::Engine`] or [`Error::NotReady`].
    pub async fn restart(&self) -> Result<()> {
        let container = Arc::clone(self.container());
        self.engine_call("start the container again", async move {
            container.start().await?;
            Ok(())
        })
        .await?;
        self.wait_ready().await
    }

    /// Freezes every process of the container (`SIGSTOP` through the
    /// cgroup freezer): connections stay open and nothing answers — a
    /// silent peer, as a stalled machine or a cut network looks.
    ///
    /// # Errors
    ///
    /// [`Error::Engine`] when the engine refuses.
    pub async fn pause(&self) -> Result<()> {
        let container = Arc::clone(self.container());
        self.engine_call("pause the container", async move {
            container.pause().await?;
            Ok(())
        })
        .await
    }

    /// Thaws a [`pause`](Self::pause)d container.
    ///
    /// # Errors
    ///
    /// [`Error::Engine`] when the engine refuses.
    pub async fn unpause(&self) -> Result<()> {
        let container = Arc::clone(self.container());
        self.engine_call("unpause the container", async move {
            container.unpause().await?;
            Ok(())
        })
        .await
    }

    /// The container's log so far (stdout and stderr), for a failure's
    /// message.
    pub async fn logs(&self) -> String {
        let container = Arc::clone(self.container());
        on_engine(async move {
            let out = container.stdout_to_vec().await.unwrap_or_default();
            let err = container.stderr_to_vec().await.unwrap_or_default();
            format!(
                "{}{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            )
        })
        .await
    }

    /// Removes the container now (as dropping does), reporting a failure.
    ///
    /// # Errors
    ///
    /// [`Error::Engine`] when the engine refuses.
    pub async fn stop(mut self) -> Result<()> {
        let image = self.image.clone();
        match self.container.take().map(Arc::try_unwrap) {
            Some(Ok(container)) => on_engine(async move { container.rm().await })
                .await
                .map_err(|e| Error::Engine {
                    action: "remove the container",
                    image,
                    source: Box::new(e),
                }),
            // A clone is in flight; dropping it removes the container.
            _ => Ok(()),
        }
    }

    /// Whether the broker answers its protocol now: one readiness probe
    /// (see the [crate docs](crate#readiness)), bounded by 2 s.
    pub async fn answers(&self) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(2), probe::answers(self.kind, self.port))
                .await,
            Ok(Ok(()))
        )
    }

    /// Waits until the broker answers its protocol, within the bound.
    async fn wait_ready(&self) -> Result<()> {
        let started = Instant::now();
        let mut last = String::from("not probed yet");
        while started.elapsed() < self.ready_within {
            let left = self.ready_within.saturating_sub(started.elapsed());
            match tokio::time::timeout(
                left.min(Duration::from_secs(5)),
                probe::answers(self.kind, self.port),
            )
            .await
            {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last = e,
                Err(_) => last = "the probe got no answer within 5s".into(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::NotReady {
            kind: self.kind,
            image: self.image.clone(),
            url: self.url.clone(),
            waited: self.ready_within,
            last,
        })
    }

    async fn engine_call(
        &self,
        action: &'static str,
        call: impl Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static,
    ) -> Result<()> {
        on_engine(call).await.map_err(|source| Error::Engine {
            action,
            image: self.image.clone(),
            source,
        })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let Some(container) = self.container.take() else {
            return;
        };
        // Removed on the engine's thread; waited for (bounded) so a test
        // that ends leaves nothing running.
        let (done, removed) = std::sync::mpsc::sync_channel::<()>(1);
        spawn_on_engine(async move {
            if let Ok(container) = Arc::try_unwrap(container) {
                let _ = container.rm().await;
            }
            let _ = done.send(());
        });
        let _ = removed.recv_timeout(Duration::from_secs(30));
    }
}

/// `SIGKILL` to a container, through the engine (run on its thread).
async fn kill_container(id: String) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let docker = testcontainers::core::client::docker_client_instance().await?;
    let signal = KillContainerOptions {
        signal: "SIGKILL".into(),
    };
    docker.kill_container(&id, Some(signal)).await?;
    Ok(())
}

/// A free port on 127.0.0.1 (bound, then released for the container).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Fails with [`Error::NoEngine`] when no engine answers where
/// testcontainers will look.
async fn engine_answers() -> Result<()> {
    let pinged = on_engine(async {
        let docker = testcontainers::core::client::docker_client_instance()
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(10), docker.ping()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("its API did not answer a ping within 10s".to_owned()),
        }
    })
    .await;
    pinged.map_err(|e| {
        let host = std::env::var("DOCKER_HOST").map_or_else(
            |_| "DOCKER_HOST is unset".to_owned(),
            |h| format!("DOCKER_HOST={h}"),
        );
        Error::NoEngine {
            detail: format!("{host}: {e}"),
        }
    })
}

/// Removes containers this crate started for processes that are gone.
async fn reap_orphans() {
    static REAPED: OnceLock<()> = OnceLock::new();
    if REAPED.set(()).is_err() {
        return;
    }
    let Ok(docker) = testcontainers::core::client::docker_client_instance().await else {
        return;
    };
    let options = ListContainersOptions {
        all: true,
        filters: Some(HashMap::from([(
            "label".to_owned(),
            vec![OWNER_LABEL.to_owned()],
        )])),
        ..Default::default()
    };
    let Ok(containers) = docker.list_containers(Some(options)).await else {
        return;
    };
    for c in containers {
        let owner = c
            .labels
            .as_ref()
            .and_then(|l| l.get(OWNER_LABEL))
            .and_then(|p| p.parse::<u32>().ok());
        let alive = owner.is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if let (Some(id), false) = (c.id, alive) {
            let _ = docker
                .remove_container(
                    &id,
                    Some(RemoveContainerOptions {
                        force: true,
                        v: true,
                        ..Default::default()
                    }),
                )
                .await;
        }
    }
}

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One thread with its own runtime drives every engine call, so a broker
/// can outlive the runtime that started it (a `static` shared by tests,
/// each on a runtime of its own) and be removed from `Drop` anywhere.
fn engine() -> &'static tokio::sync::mpsc::UnboundedSender<Job> {
    static ENGINE: OnceLock<tokio::sync::mpsc::UnboundedSender<Job>> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        std::thread::Builder::new()
            .name("switchyard-testing-engine".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("a runtime for container engine calls");
                runtime.block_on(async move {
                    while let Some(job) = rx.recv().await {
                        tokio::spawn(job);
                    }
                });
            })
            .expect("the container engine thread");
        tx
    })
}

fn spawn_on_engine(job: impl Future<Output = ()> + Send + 'static) {
    let _ = engine().send(Box::pin(job));
}

async fn on_engine<T: Send + 'static>(call: impl Future<Output = T> + Send + 'static) -> T {
    let (tx, rx) = tokio::sync::oneshot::channel();
    spawn_on_engine(async move {
        let _ = tx.send(call.await);
    });
    rx.await
        .expect("the container engine thread runs for the process")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_split_into_name_and_tag() {
        assert_eq!(split_image("nats:2.10"), ("nats", "2.10"));
        assert_eq!(
            split_image("localhost/switchyard/nats:31cd"),
            ("localhost/switchyard/nats", "31cd")
        );
        assert_eq!(
            split_image("registry:5000/team/rabbitmq"),
            ("registry:5000/team/rabbitmq", "latest")
        );
        assert_eq!(split_image("rabbitmq"), ("rabbitmq", "latest"));
    }

    #[test]
    fn urls_name_the_loopback_port() {
        assert_eq!(Kind::Nats.url(4000), "nats://127.0.0.1:4000");
        assert_eq!(
            Kind::RabbitMq.url(4001),
            "amqp://guest:guest@127.0.0.1:4001/%2f"
        );
        assert_eq!(Kind::Kafka.url(4002), "kafka://127.0.0.1:4002");
        assert_eq!(
            Kind::Sqs.url(4003),
            "sqs://?region=us-east-1&endpoint=http://127.0.0.1:4003"
        );
    }
}
