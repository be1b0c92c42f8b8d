//! Typed configuration of the RabbitMQ backend.

use std::{fmt, time::Duration};

use switchyard_core::{
    Result,
    driver::support::{duration_param, invalid_url, positive_param},
};

/// Configuration of a [`RabbitBroker`](crate::RabbitBroker): the AMQP URI,
/// timeouts, the confirm window and the limits used for queues.
///
/// Build it with [`RabbitConfig::from_url`] and the consuming setters; each
/// setter documents its default. `Debug` never prints the password.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use switchyard_rabbitmq::RabbitConfig;
/// let config = RabbitConfig::from_url("amqp://app:secret@127.0.0.1:5672/%2f?connect_timeout=2s")
///     .unwrap()
///     .with_publish_window(512);
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Clone)]
pub struct RabbitConfig {
    /// One AMQP URI per host (a cluster's nodes), in the order tried.
    pub(crate) uris: Vec<String>,
    /// Whether the first host is preferred: tried first on every
    /// reconnect, not only the first connect.
    pub(crate) prefer_first: bool,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) publish_window: usize,
    pub(crate) max_message_size: usize,
    pub(crate) delivery_limit: u32,
    pub(crate) queue_expires: Option<Duration>,
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field(
                "uris",
                &self
                    .uris
                    .iter()
                    .map(|u| switchyard_core::redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("prefer_first", &self.prefer_first)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("publish_window", &self.publish_window)
            .field("max_message_size", &self.max_message_size)
            .field("delivery_limit", &self.delivery_limit)
            .field("queue_expires", &self.queue_expires)
            .finish()
    }
}

impl RabbitConfig {
    /// Parses `amqp://[user:pass@]host[:port][/vhost][?param=value…]` (or
    /// `amqps://`), as RabbitMQ clients read it: the vhost is the
    /// percent-encoded path (`/%2f` is the default vhost `/`, as is an empty
    /// path).
    ///
    /// switchyard's parameters: `connect_timeout` and `request_timeout`
    /// (e.g. `5s`, `500ms`), `publish_window`, `max_message_size` (bytes),
    /// `delivery_limit` and `queue_expires` (a duration), `prefer` (one of
    /// the listed `host:port`s). Every other parameter (`heartbeat`,
    /// `frame_max`, `channel_max`, `auth_mechanism`, …) is lapin's.
    ///
    /// Several hosts (a cluster's nodes) are separated by commas, as in
    /// `amqp://app:secret@n1:5672,n2:5672,n3:5672/%2f`. The client
    /// connects to the first that answers, in the order listed; after a
    /// lost connection it starts with the host after the one it lost (that
    /// node may be down), or with the preferred host when `prefer` names
    /// one. Subscription queues are quorum queues, replicated to the
    /// cluster's nodes (up to its size), so any node serves them.
    ///
    /// ```
    /// use switchyard_rabbitmq::RabbitConfig;
    /// let config = RabbitConfig::from_url(
    ///     "amqp://app:secret@n1:5672,n2:5672,n3:5672/%2f?prefer=n2:5672",
    /// )
    /// .unwrap();
    /// assert_eq!(config.hosts(), ["n2:5672", "n1:5672", "n3:5672"]);
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUrl`](switchyard_core::Error::InvalidUrl) saying what is wrong (without the password).
    pub fn from_url(url: &str) -> Result<Self> {
        let invalid = invalid_url(url);
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(invalid("expected an amqp:// or amqps:// URL".into()));
        };
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), authority),
        };
        let mut config = Self::from_one_url(&format!(
            "{scheme}://{userinfo}{}{tail}",
            hosts.split(',').next().unwrap_or_default()
        ))?;
        for host in hosts.split(',').skip(1) {
            let other = Self::from_one_url(&format!("{scheme}://{userinfo}{host}{tail}"))?;
            config.uris.extend(other.uris);
        }
        let query = tail.split_once('?').map_or("", |(_, q)| q);
        let prefer = url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "prefer")
            .map(|(_, v)| v.into_owned());
        if let Some(preferred) = prefer {
            let at = config
                .hosts()
                .iter()
                .position(|h| *h == preferred)
                .ok_or_else(|| {
                    invalid(format!("prefer={preferred} is not one of the listed hosts"))
                })?;
            let uri = config.uris.remove(at);
            config.uris.insert(0, uri);
            config.prefer_first = true;
        }
        Ok(config)
    }

    /// `host:port` of each host, in the order tried (the preferred one
    /// first).
    #[must_use]
    pub fn hosts(&self) -> Vec<String> {
        self.uris
            .iter()
            .map(|u| {
                url::Url::parse(u).map_or_else(
                    |_| String::new(),
                    |u| {
                        let port =
                            u.port()
                                .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 });
                        format!("{}:{port}", u.host_str().unwrap_or_default())
                    },
                )
            })
            .collect()
    }

    /// Parses a URL with one host.
    fn from_one_url(url: &str) -> Result<Self> {
        let invalid = invalid_url(url);
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(invalid("expected an amqp:// or amqps:// URL".into()));
        }
        let mut parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(invalid("no broker host".into()));
        }
        let mut config = Self {
            uris: Vec::new(),
            prefer_first: false,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            publish_window: 256,
            max_message_size: 16 * 1024 * 1024,
            delivery_limit: 1_000_000,
            queue_expires: None,
        };
        let mut passed: Vec<(String, String)> = Vec::new();
        for (k, v) in parsed.query_pairs() {
            let duration = || duration_param(&k, &v).map_err(&invalid);
            let number = || positive_param(&k, &v).map_err(&invalid);
            match &*k {
                // Read by `from_url`, across the hosts.
                "prefer" => {}
                "connect_timeout" => config.connect_timeout = duration()?,
                "queue_expires" => config.queue_expires = Some(duration()?),
                "request_timeout" => config.request_timeout = duration()?,
                "publish_window" => config.publish_window = number()?,
                "max_message_size" => config.max_message_size = number()?,
                "delivery_limit" => {
                    config.delivery_limit = u32::try_from(number()?)
                        .map_err(|_| invalid("delivery_limit: too large".into()))?;
                }
                _ => passed.push((k.into_owned(), v.into_owned())),
            }
        }
        if passed.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(passed);
        }
        let uri = parsed.to_string();
        // Let lapin's own parser judge what it will be given.
        uri.parse::<lapin::uri::AMQPUri>()
            .map_err(|e| invalid(format!("not an AMQP URI: {e}")))?;
        config.uris = vec![uri];
        Ok(config)
    }

    /// Bound on connecting to one host (TCP, TLS and the AMQP handshake);
    /// with several hosts a connect tries each within it in turn. Default
    /// 5 s.
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on each broker round trip: a publisher confirm, a declaration,
    /// closing. Default 10 s.
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Publisher confirms `publish_batch` keeps in flight. Default 256.
    #[must_use]
    pub fn with_publish_window(mut self, window: usize) -> Self {
        self.publish_window = window.max(1);
        self
    }

    /// Largest message (payload plus encoded properties) sent, checked before
    /// sending. Default 16 MiB, RabbitMQ 4's `max_message_size` (3.x allows
    /// 128 MiB); set it to your broker's.
    #[must_use]
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// The `x-delivery-limit` of subscription queues. switchyard dead-letters
    /// after `max_attempts` itself; this only stops RabbitMQ 4's default limit
    /// (20) from dropping a message first, so keep it above any
    /// `max_attempts` you use. Fixed when a queue is first declared. Default
    /// 1,000,000.
    #[must_use]
    pub fn with_delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = limit.max(1);
        self
    }

    /// Lets RabbitMQ delete a subscription queue (and what it holds) once it
    /// has had no consumer and no declaration for this long (`x-expires`):
    /// for short-lived subscriptions such as tests and previews, never for a
    /// subscription that must keep messages while its service is down. Fixed
    /// when a queue is first declared. Default: never.
    #[must_use]
    pub fn with_queue_expires(mut self, after: Duration) -> Self {
        self.queue_expires = Some(after);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_parameters_are_read_and_the_rest_passed_on() {
        let c = RabbitConfig::from_url(
            "amqp://u:p%40ss@127.0.0.1:5672/%2f?heartbeat=10&connect_timeout=250ms&publish_window=64&max_message_size=1000&delivery_limit=50&queue_expires=10m",
        )
        .unwrap();
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.publish_window, 64);
        assert_eq!(c.max_message_size, 1000);
        assert_eq!(c.delivery_limit, 50);
        assert_eq!(c.queue_expires, Some(Duration::from_secs(600)));
        assert_eq!(c.uris, ["amqp://u:p%40ss@127.0.0.1:5672/%2f?heartbeat=10"]);
        assert!(!format!("{c:?}").contains("p%40ss"));
    }

    #[test]
    fn several_hosts_and_a_preferred_one() {
        let c = RabbitConfig::from_url("amqp://u:pw@h1,h2:5673,h3:5674/vh?heartbeat=10").unwrap();
        assert_eq!(
            c.uris,
            [
                "amqp://u:pw@h1/vh?heartbeat=10",
                "amqp://u:pw@h2:5673/vh?heartbeat=10",
                "amqp://u:pw@h3:5674/vh?heartbeat=10"
            ]
        );
        assert_eq!(c.hosts(), ["h1:5672", "h2:5673", "h3:5674"]);
        assert!(!c.prefer_first);
        assert!(!format!("{c:?}").contains("pw"));
        let p = RabbitConfig::from_url("amqp://h1,h2:5673/%2f?prefer=h2:5673&connect_timeout=1s")
            .unwrap();
        assert_eq!(p.hosts(), ["h2:5673", "h1:5672"]);
        assert!(p.prefer_first);
        assert_eq!(p.connect_timeout, Duration::from_secs(1));
        assert_eq!(p.uris[0], "amqp://h2:5673/%2f");
        let e = RabbitConfig::from_url("amqp://u:secret@h1,h2/%2f?prefer=h9:1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not one of the listed hosts"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        assert!(RabbitConfig::from_url("amqp://h1,/%2f").is_err());
    }

    #[test]
    fn bad_urls_say_why() {
        for (url, why) in [
            ("nats://x", "amqp://"),
            ("amqp://", "host"),
            ("amqp://h?connect_timeout=soon", "connect_timeout"),
            ("amqp://h?publish_window=0", "publish_window"),
            ("amqp://u:secret@h?max_message_size=-1", "max_message_size"),
        ] {
            let e = RabbitConfig::from_url(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }
}
