//! Typed configuration of the RabbitMQ backend.

use std::{fmt, time::Duration};

use switchyard_core::{Error, Result};

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
///     .publish_window(512);
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Clone)]
pub struct RabbitConfig {
    pub(crate) uri: String,
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
            .field("uri", &switchyard_core::redact_url(&self.uri))
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
    /// `delivery_limit` and `queue_expires` (a duration). Every other parameter (`heartbeat`, `frame_max`,
    /// `channel_max`, `auth_mechanism`, …) is lapin's.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUrl`] saying what is wrong (without the password).
    pub fn from_url(url: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidUrl {
            url: switchyard_core::redact_url(url),
            reason,
        };
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(invalid("expected an amqp:// or amqps:// URL".into()));
        }
        let mut parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(invalid("no broker host".into()));
        }
        let mut config = Self {
            uri: String::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            publish_window: 256,
            max_message_size: 16 * 1024 * 1024,
            delivery_limit: 1_000_000,
            queue_expires: None,
        };
        let mut passed: Vec<(String, String)> = Vec::new();
        for (k, v) in parsed.query_pairs() {
            let duration = || {
                humantime::parse_duration(&v)
                    .map_err(|e| invalid(format!("{k}: {e} (expected e.g. `5s` or `500ms`)")))
            };
            let number = || {
                v.parse::<usize>()
                    .map_err(|_| invalid(format!("{k}: expected a positive integer")))
                    .and_then(|n| {
                        if n == 0 {
                            Err(invalid(format!("{k}: must be positive")))
                        } else {
                            Ok(n)
                        }
                    })
            };
            match &*k {
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
        config.uri = uri;
        Ok(config)
    }

    /// Bound on connecting (TCP, TLS and the AMQP handshake). Default 5 s.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on each broker round trip: a publisher confirm, a declaration,
    /// closing. Default 10 s.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Publisher confirms `publish_batch` keeps in flight. Default 256.
    #[must_use]
    pub fn publish_window(mut self, window: usize) -> Self {
        self.publish_window = window.max(1);
        self
    }

    /// Largest message (payload plus encoded properties) sent, checked before
    /// sending. Default 16 MiB, RabbitMQ 4's `max_message_size` (3.x allows
    /// 128 MiB); set it to your broker's.
    #[must_use]
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// The `x-delivery-limit` of subscription queues. switchyard dead-letters
    /// after `max_attempts` itself; this only stops RabbitMQ 4's default limit
    /// (20) from dropping a message first, so keep it above any
    /// `max_attempts` you use. Fixed when a queue is first declared. Default
    /// 1,000,000.
    #[must_use]
    pub fn delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = limit.max(1);
        self
    }

    /// Lets RabbitMQ delete a subscription queue (and what it holds) once it
    /// has had no consumer and no declaration for this long (`x-expires`):
    /// for short-lived subscriptions such as tests and previews, never for a
    /// subscription that must keep messages while its service is down. Fixed
    /// when a queue is first declared. Default: never.
    #[must_use]
    pub fn queue_expires(mut self, after: Duration) -> Self {
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
        assert_eq!(c.uri, "amqp://u:p%40ss@127.0.0.1:5672/%2f?heartbeat=10");
        assert!(!format!("{c:?}").contains("p%40ss"));
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
