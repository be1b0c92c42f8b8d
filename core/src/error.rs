//! The error type shared by every backend.

use std::{error::Error as StdError, fmt, time::Duration};

/// A boxed native error kept as [`std::error::Error::source`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Shorthand for `Result<T, switchyard_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A native error kept as an [`Error`]'s source: shared, so an [`Error`] is
/// cheap to clone (one failure reported for every message of a batch, a
/// deleted resource reported by every later receive) and the native error
/// stays reachable by `downcast_ref` on
/// [`source()`](std::error::Error::source).
pub type SharedError = std::sync::Arc<dyn StdError + Send + Sync + 'static>;

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
/// [`source`](std::error::Error::source), so nothing the native client said is lost;
/// `source().and_then(|s| s.downcast_ref::<NativeError>())` reaches it.
/// Cloning is cheap and keeps the source (it is shared, [`SharedError`]).
///
/// `Display` never prints payloads or credentials.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// A topic or subscription name broke the portable naming rule
    /// (1–200 characters of `[A-Za-z0-9._-]`, not `.` or `..`).
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
    InvalidHeader {
        /// The offending key.
        key: String,
        /// Which rule it broke.
        reason: &'static str,
    },

    /// The payload is larger than the backend accepts; nothing was sent.
    PayloadTooLarge {
        /// Size of the rejected payload (as the broker would see it).
        size: usize,
        /// The backend's limit.
        limit: usize,
    },

    /// The handle, publisher or subscription was closed.
    Closed,

    /// The broker could not be reached or the connection was lost.
    Connection {
        /// What failed, without credentials.
        message: String,
        /// The native error.
        source: Option<SharedError>,
    },

    /// The broker refused the credentials.
    Authentication {
        /// What the broker said, without credentials.
        message: String,
        /// The native error.
        source: Option<SharedError>,
    },

    /// An operation did not finish within its bound.
    Timeout {
        /// What timed out.
        operation: &'static str,
        /// The bound that was exceeded.
        after: Duration,
    },

    /// The broker rejected or failed an operation.
    Broker {
        /// What failed.
        message: String,
        /// Whether trying again may succeed.
        retryable: bool,
        /// The native error.
        source: Option<SharedError>,
    },

    /// A broker resource the operation needs does not exist: a
    /// subscription's queue, stream, consumer or topic deleted under it
    /// (by an operator, or a broker that lost its state). Not retryable:
    /// nothing comes back by waiting; recreate the resource (e.g.
    /// `ensure_subscription`) or stop.
    NotFound {
        /// What kind of resource (`"queue"`, `"stream"`, `"topic"`, …).
        resource: &'static str,
        /// The broker's name for it.
        name: String,
        /// What the broker said.
        message: String,
        /// The native error.
        source: Option<SharedError>,
    },

    /// A connection URL could not be used.
    InvalidUrl {
        /// The URL with any password removed.
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The URL's scheme needs a Cargo feature that was not compiled in.
    FeatureNotEnabled {
        /// The URL scheme.
        scheme: String,
        /// The Cargo feature to enable.
        feature: &'static str,
    },

    /// A message the portable rules refuse (an empty id); nothing was sent.
    InvalidMessage {
        /// Which rule it broke.
        reason: &'static str,
    },

    /// Credentials this side could not find or read (no AWS credentials in
    /// the provider chain, an unreadable NATS credentials file); the broker
    /// was not asked. Not retryable. A broker refusing credentials is
    /// [`Error::Authentication`].
    Credentials {
        /// What is missing or unreadable, without secrets.
        message: String,
        /// The native error.
        source: Option<SharedError>,
    },

    /// Invalid options or configuration.
    Config(String),

    /// The backend cannot do this at all (see [`Capabilities`](crate::Capabilities)).
    NotSupported(String),

    /// A payload could not be encoded or decoded.
    Codec {
        /// What failed.
        message: String,
        /// The native error.
        source: Option<SharedError>,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidName {
                kind, name, reason, ..
            } => write!(f, "invalid {kind} name {name:?}: {reason}"),
            Error::InvalidHeader { key, reason, .. } => {
                write!(f, "invalid header key {key:?}: {reason}")
            }
            Error::PayloadTooLarge { size, limit, .. } => write!(
                f,
                "payload of {size} bytes exceeds the limit of {limit} bytes"
            ),
            Error::Closed => f.write_str("closed"),
            Error::Connection { message, .. } => write!(f, "connection error: {message}"),
            Error::Authentication { message, .. } => write!(f, "authentication failed: {message}"),
            Error::Timeout {
                operation, after, ..
            } => write!(f, "{operation} timed out after {after:?}"),
            Error::Broker { message, .. } => write!(f, "broker error: {message}"),
            Error::NotFound {
                resource,
                name,
                message,
                ..
            } => write!(f, "{resource} {name:?} not found: {message}"),
            Error::InvalidUrl { url, reason, .. } => write!(f, "invalid URL {url}: {reason}"),
            Error::FeatureNotEnabled {
                scheme, feature, ..
            } => write!(
                f,
                "the {scheme}:// scheme needs switchyard's `{feature}` feature, which is not enabled"
            ),
            Error::InvalidMessage { reason, .. } => write!(f, "invalid message: {reason}"),
            Error::Credentials { message, .. } => write!(f, "credentials: {message}"),
            Error::Config(detail) => write!(f, "invalid configuration: {detail}"),
            Error::NotSupported(detail) => write!(f, "not supported by this backend: {detail}"),
            Error::Codec { message, .. } => write!(f, "codec error: {message}"),
        }
    }
}

/// The source is the native error itself (not the `Arc` around it), so
/// `source().and_then(|s| s.downcast_ref::<NativeError>())` finds it.
impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Error::Connection { source, .. }
            | Error::Authentication { source, .. }
            | Error::Credentials { source, .. }
            | Error::Broker { source, .. }
            | Error::NotFound { source, .. }
            | Error::Codec { source, .. } => {
                source.as_deref().map(|e| e as &(dyn StdError + 'static))
            }
            _ => None,
        }
    }
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
            source: Some(SharedError::from(source.into())),
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
            source: source.map(SharedError::from),
        }
    }

    /// A [`Error::Broker`] from a message, a retryable flag and a native error.
    pub fn broker(message: impl Into<String>, retryable: bool, source: Option<BoxError>) -> Self {
        Error::Broker {
            message: message.into(),
            retryable,
            source: source.map(SharedError::from),
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
    fn clones_share_the_native_source() {
        #[derive(Debug)]
        struct Native;
        impl fmt::Display for Native {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("native")
            }
        }
        impl StdError for Native {}

        let e = Error::not_found("queue", "q", "gone", Some(Box::new(Native)));
        let copy = e.clone();
        for x in [&e, &copy] {
            let source = StdError::source(x).expect("the native error");
            assert!(source.downcast_ref::<Native>().is_some(), "{source:?}");
            assert!(x.is_not_found() && !x.is_retryable());
        }
        assert_eq!(copy.to_string(), e.to_string());
        let batch: Vec<Error> = (0..3).map(|_| Error::Closed.clone()).collect();
        assert!(batch.iter().all(Error::is_closed));
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
