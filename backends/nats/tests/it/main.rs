//! The conformance suite against a real nats-server (`SWITCHYARD_NATS_URL`),
//! plus NATS-specific fault and mapping tests.

use std::time::Duration;

use switchyard_conformance::Harness;
use switchyard_core::{Client, Result};

mod specific;

#[derive(Debug)]
struct NatsHarness {
    url: String,
}

#[async_trait::async_trait]
impl Harness for NatsHarness {
    async fn client(&self) -> Result<Client> {
        switchyard_nats::connect(&self.url).await
    }

    fn ack_timeout(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn receive_timeout(&self) -> Duration {
        Duration::from_secs(10)
    }

    fn slack(&self) -> Duration {
        Duration::from_millis(1500)
    }
}

async fn harness() -> Option<NatsHarness> {
    switchyard_conformance::broker_url("SWITCHYARD_NATS_URL").map(|url| NatsHarness { url })
}

switchyard_conformance::conformance_tests!(harness);
switchyard_conformance::conformance_tests!(crash harness);
