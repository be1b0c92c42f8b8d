//! Typed configuration of the NATS backend.

use std::{fmt, path::PathBuf, time::Duration};

use async_nats::jetstream::stream::StorageType;
use switchyard_core::{
    Result,
    driver::support::{duration_param, invalid_url},
};

/// Configuration of a [`NatsBroker`](crate::NatsBroker): servers,
/// credentials, timeouts and the JetStream stream settings used for topics.
///
/// Build it with [`NatsConfig::new`] or [`NatsConfig::from_url`] and the
/// consuming setters; each setter documents its default. `Debug` never prints
/// passwords or tokens.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use switchyard_nats::NatsConfig;
/// let config = NatsConfig::from_url("nats://app:secret@127.0.0.1:4222?connect_timeout=2s")
///     .unwrap()
///     .with_max_age(Duration::from_secs(7 * 24 * 3600));
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Clone)]
pub struct NatsConfig {
    pub(crate) servers: Vec<String>,
    pub(crate) retain_server_order: bool,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) token: Option<String>,
    pub(crate) credentials_file: Option<PathBuf>,
    pub(crate) require_tls: bool,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) subject_prefix: String,
    pub(crate) stream_prefix: String,
    pub(crate) storage: StorageType,
    pub(crate) max_age: Duration,
    pub(crate) max_bytes: i64,
    pub(crate) replicas: usize,
    pub(crate) max_ack_pending: i64,
    pub(crate) publish_window: usize,
    pub(crate) pull_expiry: Duration,
    pub(crate) pull_bytes: usize,
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field(
                "servers",
                &self
                    .servers
                    .iter()
                    .map(|s| switchyard_core::redact_url(s))
                    .collect::<Vec<_>>(),
            )
            .field("retain_server_order", &self.retain_server_order)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("credentials_file", &self.credentials_file)
            .field("require_tls", &self.require_tls)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("subject_prefix", &self.subject_prefix)
            .field("stream_prefix", &self.stream_prefix)
            .field("storage", &self.storage)
            .field("max_age", &self.max_age)
            .field("max_bytes", &self.max_bytes)
            .field("replicas", &self.replicas)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("publish_window", &self.publish_window)
            .field("pull_expiry", &self.pull_expiry)
            .field("pull_bytes", &self.pull_bytes)
            .finish()
    }
}

impl NatsConfig {
    /// Configuration for one server address (`host:port` or `nats://host:port`).
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            servers: vec![server.into()],
            retain_server_order: false,
            user: None,
            password: None,
            token: None,
            credentials_file: None,
            require_tls: false,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            subject_prefix: "sy".into(),
            stream_prefix: "sy-".into(),
            storage: StorageType::File,
            max_age: Duration::ZERO,
            max_bytes: -1,
            replicas: 1,
            max_ack_pending: 10_000,
            publish_window: 256,
            pull_expiry: crate::broker::PULL_EXPIRES,
            pull_bytes: DEFAULT_PULL_BYTES,
        }
    }

    /// Parses `nats://[user:pass@]host:port[,host:port…][?param=value…]`.
    ///
    /// Parameters: `token`, `creds` (credentials file path), `tls=true`,
    /// `connect_timeout` and `request_timeout` (e.g. `5s`, `500ms`),
    /// `storage=file|memory`, `max_age`, `pull_expiry`, `pull_bytes` (a byte
    /// count), `replicas`, `prefer` (one of the
    /// listed `host:port`s, see [`with_prefer_server`](Self::with_prefer_server)).
    ///
    /// Several servers (a cluster's nodes) are separated by commas:
    /// `nats://n1:4222,n2:4222,n3:4222?replicas=3`. The client connects to
    /// one of them and moves to another when it is lost; it also learns the
    /// cluster's other nodes from the servers themselves.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUrl`](switchyard_core::Error::InvalidUrl) saying what is wrong (without the password).
    pub fn from_url(url: &str) -> Result<Self> {
        let invalid = invalid_url(url);
        let rest = url
            .strip_prefix("nats://")
            .or_else(|| url.strip_prefix("tls://"))
            .ok_or_else(|| invalid("expected a nats:// (or tls://) URL".into()))?;
        let tls = url.starts_with("tls://");
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = authority.trim_end_matches('/');
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        if hosts.is_empty() {
            return Err(invalid("no server address".into()));
        }
        let servers: Vec<String> = hosts.split(',').map(|h| format!("nats://{h}")).collect();
        for s in &servers {
            url::Url::parse(s).map_err(|e| invalid(format!("bad server address: {e}")))?;
        }
        let mut config = Self::new(servers[0].clone());
        config.servers = servers;
        config.require_tls = tls;
        match userinfo.map(|u| u.split_once(':').map_or((u, None), |(a, b)| (a, Some(b)))) {
            // `nats://user:pass@host`
            Some((user, Some(pass))) => {
                config.user = Some(percent_decode(user));
                config.password = Some(percent_decode(pass));
            }
            // `nats://TOKEN@host`, as NATS clients read it
            Some((token, None)) => config.token = Some(percent_decode(token)),
            None => {}
        }
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            let duration = |v: &str| duration_param(&k, v).map_err(&invalid);
            match &*k {
                "token" => config.token = Some(v.into_owned()),
                "creds" => config.credentials_file = Some(PathBuf::from(&*v)),
                "tls" => config.require_tls = v == "true" || v == "1",
                "connect_timeout" => config.connect_timeout = duration(&v)?,
                "request_timeout" => config.request_timeout = duration(&v)?,
                "max_age" => config.max_age = duration(&v)?,
                "pull_expiry" => config = config.with_pull_expiry(duration(&v)?),
                "pull_bytes" => {
                    let bytes = v.parse().map_err(|_| {
                        invalid(format!("pull_bytes must be a byte count, got {v:?}"))
                    })?;
                    config = config.with_pull_bytes(bytes);
                }
                "storage" => {
                    config.storage = match &*v {
                        "file" => StorageType::File,
                        "memory" => StorageType::Memory,
                        other => {
                            return Err(invalid(format!(
                                "storage must be file or memory, got {other:?}"
                            )));
                        }
                    }
                }
                "prefer" => {
                    let preferred = format!("nats://{v}");
                    if !config.servers.contains(&preferred) {
                        return Err(invalid(format!(
                            "prefer={v} is not one of the listed servers"
                        )));
                    }
                    config = config.with_prefer_server(preferred);
                }
                "replicas" => {
                    config.replicas = v
                        .parse()
                        .map_err(|_| invalid(format!("replicas must be a number, got {v:?}")))?;
                }
                other => {
                    return Err(invalid(format!(
                        "unknown parameter {other:?} (known: token, creds, tls, connect_timeout, request_timeout, storage, max_age, pull_expiry, pull_bytes, replicas, prefer)"
                    )));
                }
            }
        }
        Ok(config)
    }

    /// Servers to connect to (a cluster's nodes; replaces the list given
    /// to [`new`](Self::new), and any preference). The client tries them in
    /// a random order, which spreads a fleet's connections over the nodes;
    /// call [`with_prefer_server`](Self::with_prefer_server) after it to pick one.
    #[must_use]
    pub fn with_servers<S: Into<String>>(mut self, servers: impl IntoIterator<Item = S>) -> Self {
        self.servers = servers.into_iter().map(Into::into).collect();
        self.retain_server_order = false;
        self
    }

    /// Prefers `server`: it is tried first when connecting and on every
    /// reconnect, the other servers after it in the order listed (default:
    /// no preference, a random order). A server not in the list is added
    /// at its head.
    ///
    /// ```
    /// use switchyard_nats::NatsConfig;
    /// // The same as `nats://n1:4222,n2:4222,n3:4222?replicas=3&prefer=n2:4222`:
    /// let config = NatsConfig::from_url("nats://n1:4222,n2:4222,n3:4222?replicas=3")
    ///     .unwrap()
    ///     .with_prefer_server("nats://n2:4222");
    /// ```
    #[must_use]
    pub fn with_prefer_server(mut self, server: impl Into<String>) -> Self {
        let server = server.into();
        self.servers.retain(|s| *s != server);
        self.servers.insert(0, server);
        self.retain_server_order = true;
        self
    }

    /// User and password (default none).
    #[must_use]
    pub fn with_user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.user = Some(user.into());
        self.password = Some(password.into());
        self
    }

    /// Authentication token (default none).
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// NATS credentials file (JWT + NKey seed; default none).
    #[must_use]
    pub fn with_credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.credentials_file = Some(path.into());
        self
    }

    /// Require TLS (default false; `tls://` URLs set it).
    #[must_use]
    pub fn with_require_tls(mut self, yes: bool) -> Self {
        self.require_tls = yes;
        self
    }

    /// Bound on connecting (default 5 s): an unreachable server fails within it.
    #[must_use]
    pub fn with_connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Bound on JetStream API requests and publish acknowledgements (default 10 s).
    #[must_use]
    pub fn with_request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    /// Storage of topic streams (default file).
    #[must_use]
    pub fn with_memory_storage(mut self, yes: bool) -> Self {
        self.storage = if yes {
            StorageType::Memory
        } else {
            StorageType::File
        };
        self
    }

    /// Oldest message a topic stream keeps (default zero: unlimited).
    #[must_use]
    pub fn with_max_age(mut self, d: Duration) -> Self {
        self.max_age = d;
        self
    }

    /// Largest size of a topic stream in bytes (default -1: unlimited).
    #[must_use]
    pub fn with_max_bytes(mut self, bytes: i64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Stream replicas in a cluster (default 1): with 3, a publish is
    /// confirmed once a majority of the stream's 3 nodes stored it, and the
    /// stream keeps serving while one of them is lost. Applies to the
    /// streams switchyard creates.
    #[must_use]
    pub fn with_replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// Subject prefix of topic subjects (default `sy`: topic `a.b` → `sy.a_db`).
    #[must_use]
    pub fn with_subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.subject_prefix = prefix.into();
        self
    }

    /// Stream name prefix (default `sy-`).
    #[must_use]
    pub fn with_stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream_prefix = prefix.into();
        self
    }

    /// Server-side cap on unacknowledged messages of one subscription across
    /// all its consumers (default 10,000). Each consumer's own cap is its prefetch.
    #[must_use]
    pub fn with_max_ack_pending(mut self, n: i64) -> Self {
        self.max_ack_pending = n;
        self
    }

    /// Publish acknowledgements in flight in `publish_batch` (default 256).
    #[must_use]
    pub fn with_publish_window(mut self, n: usize) -> Self {
        self.publish_window = n.max(1);
        self
    }

    /// How long a pull request waits on the server before a new one
    /// replaces it (default 30 s, at least 2 s: twice the 1 s idle
    /// heartbeat every request asks for). A receiver renews its requests
    /// this often while nothing arrives. Keep it long on nats-server before
    /// 2.10.14: a redelivery falling due just as the only waiting requests
    /// expire is sent as a first delivery of the message before it there
    /// (nats-io/nats-server#5305).
    ///
    /// ```
    /// # use std::time::Duration;
    /// use switchyard_nats::NatsConfig;
    /// let config = NatsConfig::new("127.0.0.1:4222").with_pull_expiry(Duration::from_secs(10));
    /// assert_eq!(config.pull_expiry(), Duration::from_secs(10));
    /// ```
    #[must_use]
    pub fn with_pull_expiry(mut self, d: Duration) -> Self {
        self.pull_expiry = d.max(2 * crate::broker::PULL_HEARTBEAT);
        self
    }

    /// The pull request expiry ([`with_pull_expiry`](Self::with_pull_expiry)).
    #[must_use]
    pub fn pull_expiry(&self) -> Duration {
        self.pull_expiry
    }

    /// The most bytes one subscription's receiver asks the server for at
    /// once (default 4 MiB, at most 1 GiB; 0 counts as 1): its pull
    /// requests split it by the messages each asks for, as `max_bytes`. A
    /// request still takes at least one message of the server's largest
    /// size (`max_payload`, 1 MiB by default, plus the headers' room), so
    /// the bound is only as tight as that allows. Needs nats-server 2.9.0
    /// or later; older servers ignore `max_bytes`.
    ///
    /// What the pull requests of a connection's receivers asked for, the
    /// server queues for the connection as fast as it reads the stream. Past
    /// the server's `max_pending` (64 MiB by default) it drops the
    /// connection as a slow consumer, and every message it had queued comes
    /// back after the ack wait, counted as delivered once more although the
    /// application never saw it. So keep this, times the receivers that
    /// share a client and take large messages at once, under the server's
    /// `max_pending`. Messages smaller than this over the prefetch (16 KiB
    /// at the default prefetch of 256) never reach it: the prefetch bounds
    /// them first.
    ///
    /// ```
    /// use switchyard_nats::NatsConfig;
    /// let config = NatsConfig::from_url("nats://127.0.0.1:4222?pull_bytes=1048576").unwrap();
    /// assert_eq!(config.pull_bytes(), 1 << 20);
    /// assert_eq!(NatsConfig::new("127.0.0.1:4222").pull_bytes(), 4 << 20);
    /// ```
    #[must_use]
    pub fn with_pull_bytes(mut self, bytes: usize) -> Self {
        self.pull_bytes = bytes.clamp(1, MAX_PULL_BYTES);
        self
    }

    /// The bytes a receiver asks for at once ([`with_pull_bytes`](Self::with_pull_bytes)).
    #[must_use]
    pub fn pull_bytes(&self) -> usize {
        self.pull_bytes
    }
}

/// [`NatsConfig::with_pull_bytes`]'s default: 4 MiB, so fewer than 16
/// receivers taking large messages at once stay within nats-server's
/// default `max_pending` of 64 MiB.
const DEFAULT_PULL_BYTES: usize = 4 << 20;
/// [`NatsConfig::with_pull_bytes`]'s most: far past any `max_pending`, and
/// within the server's integer for `max_bytes`.
const MAX_PULL_BYTES: usize = 1 << 30;

/// Percent-decodes URL userinfo (`+` stays `+`).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let c = NatsConfig::from_url(
            "nats://u:p%40ss@h1:4222,h2:4223?connect_timeout=500ms&storage=memory",
        )
        .unwrap();
        assert_eq!(c.servers, vec!["nats://h1:4222", "nats://h2:4223"]);
        assert_eq!(c.user.as_deref(), Some("u"));
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        let plus = NatsConfig::from_url("nats://u:a+b@h:1").unwrap();
        assert_eq!(plus.password.as_deref(), Some("a+b"));
        let t = NatsConfig::from_url("nats://s3cr3t@h:4222").unwrap();
        assert_eq!(t.token.as_deref(), Some("s3cr3t"));
        assert!(t.user.is_none());
        assert!(!format!("{t:?}").contains("s3cr3t"));
        let d = NatsConfig::new("nats://u:pw@h:1");
        assert!(!format!("{d:?}").contains("pw"));
        assert!(NatsConfig::from_url("nats://h?connect_timeout=1e400s").is_err());
        assert!(NatsConfig::from_url("nats://h?max_age=99999999999999999999h").is_err());
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert_eq!(c.storage, StorageType::Memory);
        assert!(NatsConfig::from_url("tls://h:4222").unwrap().require_tls);
    }

    #[test]
    fn a_preferred_server_comes_first_and_keeps_the_order() {
        let c = NatsConfig::from_url("nats://h1:4222,h2:4222,h3:4222?prefer=h2:4222").unwrap();
        assert_eq!(
            c.servers,
            vec!["nats://h2:4222", "nats://h1:4222", "nats://h3:4222"]
        );
        assert!(c.retain_server_order);
        assert!(
            !c.clone()
                .with_servers(["nats://h9:4222"])
                .retain_server_order
        );
        assert!(
            !NatsConfig::from_url("nats://h1:4222,h2:4222")
                .unwrap()
                .retain_server_order
        );
        let e = NatsConfig::from_url("nats://h1:4222?prefer=h9:4222")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not one of the listed servers"), "{e}");
    }

    #[test]
    fn bad_urls_say_why_without_secrets() {
        let e = NatsConfig::from_url("nats://u:hunter2@h:4222?bogus=1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown parameter \"bogus\""), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = NatsConfig::from_url("nats://h?connect_timeout=soon")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be a duration"), "{e}");
        assert!(NatsConfig::from_url("nats://").is_err());
        assert!(NatsConfig::from_url("http://h").is_err());
        let e = NatsConfig::from_url("nats://h?token=sekrit&x=1")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("sekrit"), "{e}");
    }
}
