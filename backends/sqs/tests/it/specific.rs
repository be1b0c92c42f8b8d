//! SQS-specific behaviour: bad input, faults, mapping.
