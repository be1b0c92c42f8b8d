//! Integration tests of the memory backend: the whole conformance suite,
//! plus behaviour specific to the in-process broker.

use std::time::Duration;

use switchyard_conformance::{Harness, Timing};
use switchyard_core::{Client, Result};
use switchyard_memory::MemoryBroker;

mod specific;

/// Each case gets its own broker; every `client()` is a new connection to it.
#[derive(Debug)]
struct MemoryHarness {
    broker: MemoryBroker,
    name: String,
}

#[async_trait::async_trait]
impl Harness for MemoryHarness {
    async fn client(&self) -> Result<Client> {
        Ok(self.broker.client())
    }

    async fn connect_url(&self) -> Result<Client> {
        switchyard_memory::connect(&format!("memory://{}", self.name))
    }

    fn timing(&self) -> Timing {
        Timing {
            ack_timeout: Duration::from_millis(300),
            receive_timeout: Duration::from_secs(5),
            slack: Duration::from_millis(500),
        }
    }

    /// The broker's own [`MemoryBroker::delete_subscription`].
    async fn delete_subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> std::result::Result<(), String> {
        assert!(
            self.broker.delete_subscription(topic, subscription),
            "no subscription {subscription} on {topic}"
        );
        Ok(())
    }
}

async fn harness() -> Option<MemoryHarness> {
    let name = format!("conformance-{}", switchyard_core::new_id());
    Some(MemoryHarness {
        broker: MemoryBroker::named(&name),
        name,
    })
}

switchyard_conformance::conformance_tests!(harness);
