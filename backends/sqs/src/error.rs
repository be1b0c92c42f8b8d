//! Native errors of the AWS SDK mapped onto switchyard's [`Error`].

use std::fmt;

use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use switchyard_core::Error;

/// Whether SNS answered that the topic does not exist.
pub(crate) fn topic_missing<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.code().is_some_and(|c| c.contains("NotFound"))
}

/// Maps an SDK error: credentials and signatures → authentication;
/// throttling, timeouts and transport → retryable; the rest → broker errors.
pub(crate) fn sdk_error<E, R>(what: &str, e: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    // A service error says its code and message (the raw response, with
    // all its headers, stays in the source); anything else its whole chain.
    let text = match &e {
        SdkError::ServiceError(s) => format!(
            "{what}: {}: {}",
            s.err().code().unwrap_or("unknown error"),
            s.err().message().unwrap_or_default()
        ),
        _ => format!("{what}: {}", DisplayErrorContext(&e)),
    };
    match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
            if text.contains("credentials") {
                Error::Credentials {
                    message: text,
                    source: Some(std::sync::Arc::new(e)),
                }
            } else {
                Error::connection(text, e)
            }
        }
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or_default();
            match code {
                "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "AccessDenied"
                | "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidAccessKeyId"
                | "AuthorizationError" => Error::Authentication {
                    message: text,
                    source: Some(std::sync::Arc::new(e)),
                },
                _ => {
                    let retryable = code.contains("Throttl")
                        || code.contains("NonExistentQueue")
                        || code.contains("QueueDoesNotExist")
                        || code.contains("NotFound")
                        || code.contains("InternalError")
                        || code.contains("ServiceUnavailable");
                    Error::broker(text, retryable, Some(Box::new(e)))
                }
            }
        }
        SdkError::ConstructionFailure(_) if text.contains("credentials") => Error::Credentials {
            message: text,
            source: Some(std::sync::Arc::new(e)),
        },
        _ => Error::broker(text, true, Some(Box::new(e))),
    }
}

/// One failed entry of a batch call (SQS and SNS report them alike):
/// (entry index, what went wrong, whether a retry may succeed).
pub(crate) fn failure(
    id: &str,
    code: &str,
    message: Option<&str>,
    sender_fault: bool,
) -> Option<(usize, String, bool)> {
    Some((
        id.parse().ok()?,
        format!("{code}: {}", message.unwrap_or_default()),
        !sender_fault,
    ))
}
