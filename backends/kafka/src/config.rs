//! Typed configuration of the Kafka backend.

use std::{collections::BTreeMap, fmt, time::Duration};

use switchyard_core::{
    Result,
    driver::support::{duration_param, invalid_url, positive_param},
};

/// Configuration of a [`KafkaBroker`](crate::KafkaBroker): bootstrap servers,
/// topic defaults, timeouts, limits, and any librdkafka property as an
/// escape hatch.
///
/// Build it with [`KafkaConfig::from_url`] or [`KafkaConfig::new`] and the
/// consuming setters; each setter documents its default. `Debug` never
/// prints the value of a property whose name mentions a password, secret or
/// key.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use switchyard_kafka::KafkaConfig;
/// let config = KafkaConfig::from_url(
///     "kafka://127.0.0.1:9092?partitions=6&security.protocol=SASL_SSL&sasl.password=hunter2",
/// )
/// .unwrap()
/// .with_publish_timeout(Duration::from_secs(10));
/// assert!(!format!("{config:?}").contains("hunter2"));
/// ```
#[derive(Clone)]
pub struct KafkaConfig {
    pub(crate) bootstrap: String,
    pub(crate) partitions: i32,
    pub(crate) replication_factor: i32,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) publish_timeout: Duration,
    pub(crate) commit_interval: Duration,
    pub(crate) max_message_bytes: usize,
    pub(crate) properties: BTreeMap<String, String>,
}

/// Whether the value of librdkafka property `name` must not be printed.
fn is_secret(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    ["password", "secret", "key", "jaas", "token", "credential"]
        .iter()
        .any(|s| n.contains(s))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret(k) { "<redacted>" } else { v };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap", &self.bootstrap)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("commit_interval", &self.commit_interval)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("properties", &properties)
            .finish()
    }
}

impl KafkaConfig {
    /// A configuration for the comma-separated `host:port` bootstrap list,
    /// with every default.
    #[must_use]
    pub fn new(bootstrap: impl Into<String>) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            partitions: 3,
            replication_factor: -1,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
            commit_interval: Duration::from_millis(5),
            max_message_bytes: 1_000_000,
            properties: BTreeMap::new(),
        }
    }

    /// Parses `kafka://host:port[,host:port…][?param=value…]`.
    ///
    /// switchyard's parameters: `partitions` and `replication_factor` (for
    /// the topics it creates), `connect_timeout`, `request_timeout`,
    /// `publish_timeout` and `commit_interval` (durations such as `5s` or
    /// `500ms`), `max_message_bytes`. Every parameter whose name contains a
    /// `.` is a librdkafka property (`security.protocol`, `sasl.mechanism`,
    /// `sasl.username`, `ssl.ca.location`, …), given to every client the
    /// backend creates.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUrl`](switchyard_core::Error::InvalidUrl) saying what is wrong (without secrets).
    pub fn from_url(url: &str) -> Result<Self> {
        let invalid = invalid_url(url);
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| invalid("expected a kafka:// URL".into()))?;
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts = hosts.trim_end_matches('/');
        if hosts.is_empty() || hosts.split(',').any(|h| h.trim().is_empty()) {
            return Err(invalid(
                "no bootstrap server (expected kafka://host:port[,host:port…])".into(),
            ));
        }
        for host in hosts.split(',') {
            let (name, port) = host
                .rsplit_once(':')
                .ok_or_else(|| invalid(format!("{host}: expected host:port")))?;
            if name.is_empty() || port.parse::<u16>().is_err() {
                return Err(invalid(format!("{host}: expected host:port")));
            }
        }
        let mut config = Self::new(hosts);
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            let duration = || duration_param(&k, &v).map_err(&invalid);
            let positive = || positive_param(&k, &v).map_err(&invalid);
            match &*k {
                "partitions" => {
                    config.partitions = i32::try_from(positive()?)
                        .map_err(|_| invalid("partitions: too large".into()))?;
                }
                "replication_factor" => {
                    config.replication_factor = v
                        .parse::<i32>()
                        .ok()
                        .filter(|n| *n > 0 || *n == -1)
                        .ok_or_else(|| {
                            invalid("replication_factor: expected a positive integer or -1".into())
                        })?;
                }
                "connect_timeout" => config.connect_timeout = duration()?,
                "request_timeout" => config.request_timeout = duration()?,
                "publish_timeout" => config.publish_timeout = duration()?,
                "commit_interval" => config.commit_interval = duration()?,
                "max_message_bytes" => config.max_message_bytes = positive()?,
                name if name.contains('.') => {
                    config.properties.insert(name.to_owned(), v.into_owned());
                }
                other => {
                    return Err(invalid(format!(
                        "unknown parameter `{other}` (librdkafka properties contain a `.`)"
                    )));
                }
            }
        }
        Ok(config)
    }

    /// Partitions of the topics the backend creates. Default 3: records with
    /// the same key share a partition, so per-key order holds while several
    /// consumers share the work.
    #[must_use]
    pub fn with_partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Replication factor of the topics the backend creates. Default -1:
    /// the broker's `default.replication.factor`.
    #[must_use]
    pub fn with_replication_factor(mut self, factor: i32) -> Self {
        self.replication_factor = factor;
        self
    }

    /// Bound on reaching the cluster when connecting. Default 5 s.
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on each admin or group round trip (creating topics, reading and
    /// committing offsets), and on every request librdkafka sends
    /// (`socket.timeout.ms`). Default 10 s.
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Bound on a publish, from enqueueing to the delivery report
    /// (librdkafka's `message.timeout.ms`). Default 30 s.
    #[must_use]
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How long acks are gathered before their offsets are committed.
    /// Default 5 ms.
    #[must_use]
    pub fn with_commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// The largest record the producer sends (librdkafka's
    /// `message.max.bytes`; keep it at or below the broker's
    /// `message.max.bytes` and the topic's `max.message.bytes`). Default
    /// 1,000,000.
    #[must_use]
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Sets any librdkafka property on every client the backend creates
    /// (the escape hatch: security, SASL, TLS, tuning).
    #[must_use]
    pub fn with_set(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_servers_parameters_and_properties() {
        let c = KafkaConfig::from_url(
            "kafka://a:9092,b:9093?partitions=6&replication_factor=3&connect_timeout=250ms&commit_interval=1ms&max_message_bytes=2000&sasl.username=app&sasl.password=pw",
        )
        .unwrap();
        assert_eq!(c.bootstrap, "a:9092,b:9093");
        assert_eq!(c.partitions, 6);
        assert_eq!(c.replication_factor, 3);
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.commit_interval, Duration::from_millis(1));
        assert_eq!(c.max_message_bytes, 2000);
        assert_eq!(c.properties["sasl.username"], "app");
        let shown = format!("{c:?}");
        assert!(shown.contains("app") && !shown.contains("pw\""), "{shown}");
    }

    #[test]
    fn rejects_bad_urls_saying_why() {
        for (url, why) in [
            ("nats://a:1", "kafka://"),
            ("kafka://", "bootstrap"),
            ("kafka://a", "host:port"),
            ("kafka://a:x", "host:port"),
            ("kafka://a:1,", "bootstrap"),
            ("kafka://a:1?partitions=0", "partitions"),
            ("kafka://a:1?connect_timeout=soon", "connect_timeout"),
            ("kafka://a:1?parts=3", "unknown parameter"),
        ] {
            let e = KafkaConfig::from_url(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
    }
}
