//! The error type shared by every backend.

use std::{error::Error as StdError, fmt, time::Duration};

/// A boxed native error kept as [`std::error::Error::source`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Shorthand for `Result<T, switchyard_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of name failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameKind {
    /// A topic name.
    Topic,
    /// A subscription (consumer group) name.
    Subscription,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Topic => "topic",
            NameKind::Subscription => "subscription",
        })
    }
}

/// Everything that can go wrong in switchyard.
///
/// The enum is `#[non_exhaustive]`: match the variants you handle and keep a
/// wildcard arm. [`Error::is_retryable`] tells whether trying the same
/// operation again may succeed. Broker-specific errors are kept as
/// [`source`](std::error::Error::source), so nothing the native client said is lost.
///
/// `Display` never prints payloads or credentials.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A topic or subscription name broke the portable naming rule
    /// (1–200 characters of `[A-Za-z0-9._-]`, not `.` or `..`).
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// Which kind of name.
        kind: NameKind,
        /// The offending name.
        name: String,
        /// Which rule it broke.
        reason: &'static str,
    },

    /// A header key broke the header rule (1–128 printable ASCII characters
    /// other than space and `:`, `sy-` reserved).
    #[error("invalid header key {key:?}: {reason}")]
    InvalidHeader {
        /// The offending key.
        key: String,
        /// Which rule it broke.
        reason: &'static str,
    },

    /// The payload is larger than the backend accepts; nothing was sent.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Size of the rejected payload (as the broker would see it).
        size: usize,
        /// The backend's limit.
        limit: usize,
    },

    /// The handle, publisher or subscription was closed.
    #[error("closed")]
    Closed,

    /// The broker could not be reached or the connection was lost.
    #[error("connection error: {message}")]
    Connection {
        /// What failed, without credentials.
        message: String,
        /// The native error.
        #[source]
        source: Option<BoxError>,
    },

    /// The broker refused the credentials.
    #[error("authentication failed: {message}")]
    Authentication {
        /// What the broker said, without credentials.
        message: String,
        /// The native error.
        #[source]
        source: Option<BoxError>,
    },

    /// An operation did not finish within its bound.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        operation: &'static str,
        /// The bound that was exceeded.
        after: Duration,
    },

    /// The broker rejected or failed an operation.
    #[error("broker error: {message}")]
    Broker {
        /// What failed.
        message: String,
        /// Whether trying again may succeed.
        retryable: bool,
        /// The native error.
        #[source]
        source: Option<BoxError>,
    },

    /// A broker resource the operation needs does not exist: a
    /// subscription's queue, stream, consumer or topic deleted under it
    /// (by an operator, or a broker that lost its state). Not retryable:
    /// nothing comes back by waiting; recreate the resource (e.g.
    /// `ensure_subscription`) or stop.
    #[error("{resource} {name:?} not found: {message}")]
    NotFound {
        /// What kind of resource (`"queue"`, `"stream"`, `"topic"`, …).
        resource: &'static str,
        /// The broker's name for it.
        name: String,
        /// What the broker said.
        message: String,
        /// The native error.
        #[source]
        source: Option<BoxError>,
    },

    /// A connection URL could not be used.
    #[error("invalid URL {url}: {reason}")]
    InvalidUrl {
        /// The URL with any password removed.
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The URL's scheme needs a Cargo feature that was not compiled in.
    #[error("the {scheme}:// scheme needs switchyard's `{feature}` feature, which is not enabled")]
    FeatureNotEnabled {
        /// The URL scheme.
        scheme: String,
        /// The Cargo feature to enable.
        feature: &'static str,
    },

    /// Invalid options or configuration.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The backend cannot do this at all (see [`Capabilities`](crate::Capabilities)).
    #[error("not supported by this backend: {0}")]
    NotSupported(String),

    /// A payload could not be encoded or decoded.
    #[error("codec error: {message}")]
    Codec {
        /// What failed.
        message: String,
        /// The native error.
        #[source]
        source: Option<BoxError>,
    },
}

/// `url` fit for error messages and `Debug`: userinfo (credentials, tokens)
/// and the query (which may carry secrets) are replaced by `***`.
///
/// # Examples
///
/// ```
/// use switchyard_core::redact_url;
/// assert_eq!(redact_url("amqp://app:secret@h:5672/vh?x=1"), "amqp://***@h:5672/vh?***");
/// assert_eq!(redact_url("nats://h1:4222,h2:4222"), "nats://h1:4222,h2:4222");
/// ```
#[must_use]
pub fn redact_url(url: &str) -> String {
    let (head, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let (authority, query) = match rest.split_once('?') {
        Some((a, _)) => (a, "?***"),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((_, hosts)) => format!("***@{hosts}"),
        None => authority.to_owned(),
    };
    format!("{head}{authority}{query}")
}

impl Error {
    /// A [`Error::Connection`] from a message and a native error.
    pub fn connection(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Connection {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A [`Error::NotFound`]: the broker's `resource` called `name` is gone.
    ///
    /// # Examples
    ///
    /// ```
    /// use switchyard_core::Error;
    /// let e = Error::not_found("queue", "sy.orders:billing", "NOT_FOUND - no queue", None);
    /// assert!(e.is_not_found() && !e.is_retryable());
    /// assert_eq!(e.to_string(), r#"queue "sy.orders:billing" not found: NOT_FOUND - no queue"#);
    /// ```
    pub fn not_found(
        resource: &'static str,
        name: impl Into<String>,
        message: impl Into<String>,
        source: Option<BoxError>,
    ) -> Self {
        Error::NotFound {
            resource,
            name: name.into(),
            message: message.into(),
            source,
        }
    }

    /// A [`Error::Broker`] from a message, a retryable flag and a native error.
    pub fn broker(message: impl Into<String>, retryable: bool, source: Option<BoxError>) -> Self {
        Error::Broker {
            message: message.into(),
            retryable,
            source,
        }
    }

    /// This error once more, for a failure that hits every message of a
    /// batch (a `publish_batch` whose setup failed reports it per message).
    /// The copy keeps the variant, text and retryability of connection,
    /// authentication, broker, timeout, closed and size errors (without the
    /// native source, which stays with the original); any other error
    /// becomes an [`Error::Broker`] with the same text.
    ///
    /// # Examples
    ///
    /// ```
    /// use switchyard_core::Error;
    /// let e = Error::broker("topic creation refused", true, None);
    /// let copies: Vec<Error> = (0..3).map(|_| e.replicate()).collect();
    /// assert!(copies.iter().all(|c| c.is_retryable() && c.to_string() == e.to_string()));
    /// assert!(Error::Closed.replicate().is_closed());
    /// ```
    #[must_use]
    pub fn replicate(&self) -> Error {
        match self {
            Error::Closed => Error::Closed,
            Error::Timeout { operation, after } => Error::Timeout {
                operation,
                after: *after,
            },
            Error::PayloadTooLarge { size, limit } => Error::PayloadTooLarge {
                size: *size,
                limit: *limit,
            },
            Error::Connection { message, .. } => Error::Connection {
                message: message.clone(),
                source: None,
            },
            Error::Authentication { message, .. } => Error::Authentication {
                message: message.clone(),
                source: None,
            },
            Error::Broker {
                message, retryable, ..
            } => Error::broker(message.clone(), *retryable, None),
            Error::NotFound {
                resource,
                name,
                message,
                ..
            } => Error::NotFound {
                resource,
                name: name.clone(),
                message: message.clone(),
                source: None,
            },
            other => Error::broker(other.to_string(), other.is_retryable(), None),
        }
    }

    /// Whether the same operation may succeed if tried again later:
    /// connection losses, timeouts and broker errors the backend marked as
    /// transient. Invalid input, oversize payloads, authentication failures
    /// and use after close are not retryable.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connection { .. } | Error::Timeout { .. } => true,
            Error::Broker { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// Whether this is [`Error::NotFound`]: a resource the operation
    /// needs is gone.
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// Whether this is [`Error::Closed`].
    #[must_use]
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Closed)
    }

    /// Whether this is [`Error::Timeout`].
    #[must_use]
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_classification() {
        assert!(Error::connection("down", "refused").is_retryable());
        assert!(
            Error::Timeout {
                operation: "publish",
                after: Duration::from_secs(1)
            }
            .is_retryable()
        );
        assert!(!Error::Closed.is_retryable());
        assert!(!Error::PayloadTooLarge { size: 2, limit: 1 }.is_retryable());
        assert!(Error::broker("busy", true, None).is_retryable());
        assert!(!Error::broker("denied", false, None).is_retryable());
    }

    #[test]
    fn source_is_kept() {
        let e = Error::connection("down", "refused");
        assert_eq!(
            std::error::Error::source(&e).unwrap().to_string(),
            "refused"
        );
    }

    #[test]
    fn feature_error_names_the_feature() {
        let e = Error::FeatureNotEnabled {
            scheme: "kafka".into(),
            feature: "kafka",
        };
        assert!(e.to_string().contains("`kafka` feature"));
    }
}
