//! The memory broker's settings: its builder and its URL.

use switchyard_core::{Error, Result};

/// Default payload limit: 1 MiB (SQS's, the smallest of the brokers).
pub(crate) const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// Builder for [`MemoryBroker`](crate::MemoryBroker).
#[derive(Debug, Clone)]
pub struct MemoryBuilder {
    pub(crate) max_payload: usize,
}

impl MemoryBuilder {
    /// Largest accepted payload in bytes (default 1 MiB).
    #[must_use]
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }
}

/// A `memory://[NAME][?max_payload=BYTES]` URL, parsed.
pub(crate) struct MemoryUrl {
    /// The process-wide broker's name (`default` when empty).
    pub(crate) name: String,
    pub(crate) max_payload: Option<usize>,
}

impl MemoryUrl {
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidUrl {
            url: switchyard_core::redact_url(url),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if parsed.scheme() != "memory" {
            return Err(invalid(format!(
                "expected memory://, got {}://",
                parsed.scheme()
            )));
        }
        let name = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .unwrap_or("default");
        let mut max_payload = None;
        for (k, v) in parsed.query_pairs() {
            match &*k {
                "max_payload" => {
                    max_payload = Some(v.parse::<usize>().map_err(|_| {
                        invalid(format!("max_payload must be a byte count, got {v:?}"))
                    })?);
                }
                other => {
                    return Err(invalid(format!(
                        "unknown parameter {other:?} (known: max_payload)"
                    )));
                }
            }
        }
        Ok(Self {
            name: name.to_owned(),
            max_payload,
        })
    }
}
