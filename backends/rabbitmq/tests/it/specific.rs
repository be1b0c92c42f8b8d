//! RabbitMQ-specific behaviour: bad input, faults, mapping.
