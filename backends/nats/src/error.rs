//! Native errors of async-nats mapped onto switchyard's [`Error`].

use switchyard_core::Error;

/// A failed connect: refused credentials are
/// [`Error::Authentication`], everything else [`Error::Connection`]
/// (retryable).
pub(crate) fn connect_error(e: async_nats::ConnectError, servers: &[String]) -> Error {
    use async_nats::ConnectErrorKind as K;
    let message = format!(
        "connecting to {}: {e}",
        servers
            .iter()
            .map(|s| switchyard_core::redact_url(s))
            .collect::<Vec<_>>()
            .join(",")
    );
    match e.kind() {
        K::AuthorizationViolation | K::Authentication => Error::Authentication {
            message,
            source: Some(std::sync::Arc::new(e)),
        },
        K::TimedOut => Error::Connection {
            message,
            source: Some(std::sync::Arc::new(e)),
        },
        _ => Error::connection(message, e),
    }
}

/// A failed JetStream call `what`, retryable or not.
pub(crate) fn js_error(
    what: &str,
    e: impl std::error::Error + Send + Sync + 'static,
    retryable: bool,
) -> Error {
    Error::broker(format!("{what}: {e}"), retryable, Some(Box::new(e)))
}
