//! Typed configuration of the SQS backend.

use std::{fmt, time::Duration};

use switchyard_core::{
    Result,
    driver::support::{duration_param, invalid_url, positive_param},
};

/// How topics and subscriptions map onto SQS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// A topic is one SQS queue; every subscription name on it shares that
    /// queue (consumers compete; no fan-out).
    Queue,
    /// A topic is an SNS topic; each subscription is an SQS queue subscribed
    /// to it with raw message delivery (fan-out).
    FanOut,
}

/// Configuration of an [`SqsBroker`](crate::SqsBroker).
///
/// Credentials come from the standard AWS chain (environment, profile,
/// container or instance role), or from [`SqsConfig::with_static_credentials`]
/// for local emulators. `Debug` never prints the secret key.
///
/// # Examples
///
/// ```
/// use switchyard_sqs::{Mode, SqsConfig};
/// let c = SqsConfig::from_url("sqs://?region=us-east-1&endpoint=http://127.0.0.1:4566&mode=fanout").unwrap();
/// assert_eq!(c.mode(), Mode::FanOut);
/// ```
#[derive(Clone)]
pub struct SqsConfig {
    pub(crate) region: Option<String>,
    pub(crate) endpoint: Option<String>,
    pub(crate) mode: Mode,
    pub(crate) fifo: bool,
    pub(crate) credentials: Option<(String, String)>,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) wait: Duration,
    pub(crate) pollers: usize,
    pub(crate) publish_window: usize,
    pub(crate) max_message_size: usize,
}

impl fmt::Debug for SqsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsConfig")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("mode", &self.mode)
            .field("fifo", &self.fifo)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(id, _)| (id, "***")),
            )
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("wait", &self.wait)
            .field("pollers", &self.pollers)
            .field("publish_window", &self.publish_window)
            .field("max_message_size", &self.max_message_size)
            .finish()
    }
}

impl Default for SqsConfig {
    fn default() -> Self {
        Self {
            region: None,
            endpoint: None,
            mode: Mode::Queue,
            fifo: false,
            credentials: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            wait: Duration::from_secs(5),
            pollers: 4,
            publish_window: 16,
            max_message_size: 256 * 1024,
        }
    }
}

impl SqsConfig {
    /// Parses `sqs://?region=…&endpoint=…&mode=queue|fanout`, with the
    /// optional `fifo` (`true`: FIFO queues and topics, see
    /// [`SqsConfig::with_fifo`]), `connect_timeout`, `request_timeout`, `wait` (long-poll wait,
    /// 1–20 s), `pollers` (concurrent long polls per receiver),
    /// `publish_window` (batches of 10 in flight) and `max_message_size`
    /// (bytes; 262,144 by default, which every SQS accepts — set 1048576 where
    /// the queues allow 1 MiB). Region and endpoint default to the AWS chain's.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUrl`](switchyard_core::Error::InvalidUrl) saying what is wrong.
    pub fn from_url(url: &str) -> Result<Self> {
        let invalid = invalid_url(url);
        let rest = url
            .strip_prefix("sqs://")
            .ok_or_else(|| invalid("expected an sqs:// URL".into()))?;
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !authority.trim_matches('/').is_empty() {
            return Err(invalid(
                "put region and endpoint in the query: sqs://?region=…&endpoint=…".into(),
            ));
        }
        let mut c = Self::default();
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            let duration = || duration_param(&k, &v).map_err(&invalid);
            let number = || positive_param(&k, &v).map_err(&invalid);
            match &*k {
                "region" => c.region = Some(v.into_owned()),
                "endpoint" => {
                    url::Url::parse(&v).map_err(|e| invalid(format!("endpoint: {e}")))?;
                    c.endpoint = Some(v.into_owned());
                }
                "mode" => {
                    c.mode = match &*v {
                        "queue" => Mode::Queue,
                        "fanout" | "fan-out" | "sns" => Mode::FanOut,
                        other => {
                            return Err(invalid(format!(
                                "mode: {other:?} (expected queue or fanout)"
                            )));
                        }
                    };
                }
                "fifo" => {
                    c.fifo = match &*v {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        other => {
                            return Err(invalid(format!(
                                "fifo: {other:?} (expected true or false)"
                            )));
                        }
                    };
                }
                "connect_timeout" => c.connect_timeout = duration()?,
                "request_timeout" => c.request_timeout = duration()?,
                "wait" => {
                    let w = duration()?;
                    if w < Duration::from_secs(1) || w > Duration::from_secs(20) {
                        return Err(invalid("wait: must be 1–20 s".into()));
                    }
                    c.wait = w;
                }
                "pollers" => c.pollers = number()?,
                "publish_window" => c.publish_window = number()?,
                "max_message_size" => c.max_message_size = number()?,
                other => return Err(invalid(format!("unknown parameter {other:?}"))),
            }
        }
        Ok(c)
    }

    /// The mapping in use.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Sets the mapping. Default [`Mode::Queue`].
    #[must_use]
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Whether queues (and, in fan-out mode, SNS topics) are FIFO.
    #[must_use]
    pub fn fifo(&self) -> bool {
        self.fifo
    }

    /// FIFO queues and topics (names end in `.fifo`): messages with the same
    /// key reach a consumer in publish order (the key is the
    /// `MessageGroupId`; a message without a key is its own group), and
    /// SQS holds back a key's later messages while one of them is out for
    /// processing or waiting out a nack delay. Default `false` (standard
    /// queues: no order, higher throughput). FIFO and standard queues of one
    /// topic are different queues: choose once per deployment.
    ///
    /// # Examples
    ///
    /// ```
    /// use switchyard_sqs::SqsConfig;
    /// let c = SqsConfig::from_url("sqs://?region=us-east-1&fifo=true").unwrap();
    /// assert!(c.fifo());
    /// assert!(!SqsConfig::default().with_fifo(false).fifo());
    /// ```
    #[must_use]
    pub fn with_fifo(mut self, fifo: bool) -> Self {
        self.fifo = fifo;
        self
    }

    /// Static credentials instead of the AWS chain (for local emulators
    /// such as moto or LocalStack).
    #[must_use]
    pub fn with_static_credentials(
        mut self,
        key_id: impl Into<String>,
        secret: impl Into<String>,
    ) -> Self {
        self.credentials = Some((key_id.into(), secret.into()));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_read_and_bad_ones_named() {
        let c = SqsConfig::from_url(
            "sqs://?region=eu-west-1&endpoint=http://127.0.0.1:4566&mode=fanout&wait=2s&pollers=8",
        )
        .unwrap();
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(
            (c.mode, c.wait, c.pollers),
            (Mode::FanOut, Duration::from_secs(2), 8)
        );
        for (url, why) in [
            ("nats://x", "sqs://"),
            ("sqs://host", "query"),
            ("sqs://?mode=kafka", "mode"),
            ("sqs://?fifo=maybe", "fifo"),
            ("sqs://?wait=30s", "wait"),
            ("sqs://?bogus=1", "bogus"),
        ] {
            let e = SqsConfig::from_url(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
        let c = SqsConfig::default().with_static_credentials("id", "very-secret");
        assert!(!format!("{c:?}").contains("very-secret"));
    }
}
