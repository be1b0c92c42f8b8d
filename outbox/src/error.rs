//! The crate's error type.

use std::time::Duration;

/// What can go wrong in the outbox, the relay and the stores.
///
/// `Display` never prints payloads or credentials.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database refused or failed an operation, or could not be reached.
    #[cfg(feature = "postgres")]
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// Redis refused or failed an operation, or could not be reached.
    #[cfg(feature = "redis")]
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),

    /// A database or Redis operation did not finish within its bound.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        operation: &'static str,
        /// The bound.
        after: Duration,
    },

    /// switchyard refused the message (an invalid topic name or header), or
    /// the broker failed to publish it.
    #[error(transparent)]
    Switchyard(#[from] switchyard_core::Error),

    /// A table name or option is not usable.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    /// Whether trying the same operation again may succeed (a lost
    /// connection, a timeout, a lock wait that gave up, a deadlock).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            #[cfg(feature = "postgres")]
            Error::Database(e) => database_retryable(e),
            #[cfg(feature = "redis")]
            Error::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_cluster_error()
            }
            Error::Timeout { .. } => true,
            Error::Switchyard(e) => e.is_retryable(),
            Error::Config(_) => false,
        }
    }
}

#[cfg(feature = "postgres")]
fn database_retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            // serialization_failure, deadlock_detected, lock_not_available,
            // query_canceled (statement or lock timeout), admin/crash shutdown,
            // cannot_connect_now
            Some("40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03")
        ),
        _ => false,
    }
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs `op`, giving up after `after`.
#[cfg(any(feature = "postgres", feature = "redis"))]
pub(crate) async fn bounded<T, E: Into<Error>>(
    operation: &'static str,
    after: Duration,
    op: impl Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(after, op).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(Error::Timeout { operation, after }),
    }
}
