//! Native errors of rdkafka mapped onto switchyard's [`Error`].

use rdkafka::{error::KafkaError, types::RDKafkaErrorCode};
use switchyard_core::Error;

/// Maps a librdkafka error: transport and timeouts → connection errors;
/// authentication → [`Error::Authentication`]; the rest → broker errors.
pub(crate) fn kafka_error(what: &str, e: KafkaError) -> Error {
    let text = format!("{what}: {e}");
    // rdkafka reports no code for a failed admin operation, though it has
    // one (a create-topics request timed out on a dead link, say).
    let code = match &e {
        KafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    };
    match code {
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::NetworkException,
        ) => Error::connection(text, e),
        Some(
            RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => Error::Authentication {
            message: text,
            source: Some(std::sync::Arc::new(e)),
        },
        code => {
            let retryable = matches!(
                code,
                Some(
                    RDKafkaErrorCode::LeaderNotAvailable
                        | RDKafkaErrorCode::NotLeaderForPartition
                        | RDKafkaErrorCode::UnknownTopicOrPartition
                        | RDKafkaErrorCode::NotEnoughReplicas
                        | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
                        | RDKafkaErrorCode::QueueFull
                        | RDKafkaErrorCode::CoordinatorNotAvailable
                        | RDKafkaErrorCode::NotCoordinator
                        | RDKafkaErrorCode::RebalanceInProgress
                        | RDKafkaErrorCode::KafkaStorageError
                        // UNKNOWN_SERVER_ERROR: the broker failed the
                        // request unexpectedly (tansu answers produces so
                        // while it restarts); nothing was stored, and a
                        // retry with the same id cannot lose or reorder
                        // more than at-least-once allows.
                        | RDKafkaErrorCode::Unknown
                )
            );
            Error::broker(text, retryable, Some(Box::new(e)))
        }
    }
}
