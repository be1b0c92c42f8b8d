//! Native errors of lapin mapped onto switchyard's [`Error`], and the
//! bound on every broker round trip.

use std::time::Duration;

use lapin::ErrorKind;

use switchyard_core::{Error, Result};

/// The AMQP reply code of a protocol error (403 access refused, 404 not
/// found, 406 precondition failed, …).
pub(crate) fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        ErrorKind::ProtocolError(a) => Some(a.get_id()),
        _ => None,
    }
}

pub(crate) fn amqp_error(what: &str, e: lapin::Error) -> Error {
    match reply_code(&e) {
        // Access refused, precondition failed, not allowed: retrying the
        // same request cannot succeed.
        Some(403 | 406 | 530) => Error::broker(format!("{what}: {e}"), false, Some(Box::new(e))),
        Some(_) => Error::broker(format!("{what}: {e}"), true, Some(Box::new(e))),
        None if e.is_io_error() => Error::connection(format!("{what}: {e}"), e),
        None => Error::broker(format!("{what}: {e}"), true, Some(Box::new(e))),
    }
}

/// Whether `e` carries the broker's 404 (`NOT_FOUND`) reply.
pub(crate) fn is_not_found(e: &Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<lapin::Error>())
        .is_some_and(|e| reply_code(e) == Some(404))
}

pub(crate) async fn bounded<T>(
    what: &'static str,
    after: Duration,
    f: impl Future<Output = lapin::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(after, f).await {
        Ok(r) => r.map_err(|e| amqp_error(what, e)),
        Err(_) => Err(Error::Timeout {
            operation: what,
            after,
        }),
    }
}
