//! Kafka-specific tests.
