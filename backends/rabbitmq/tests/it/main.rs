//! The conformance suite against a real RabbitMQ (`SWITCHYARD_RABBITMQ_URL`),
//! plus RabbitMQ-specific fault and mapping tests.

use std::time::Duration;

use switchyard_conformance::Harness;
use switchyard_core::{Client, Result};

mod specific;

#[derive(Debug)]
struct RabbitHarness {
    url: String,
}

#[async_trait::async_trait]
impl Harness for RabbitHarness {
    async fn client(&self) -> Result<Client> {
        switchyard_rabbitmq::connect(&self.url).await
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

/// Test queues go away ten minutes after their last use (`x-expires`): a
/// quorum queue is a Raft group on the broker, and every run makes dozens.
fn with_expiry(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}queue_expires=10m")
}

async fn harness() -> Option<RabbitHarness> {
    switchyard_conformance::broker_url("SWITCHYARD_RABBITMQ_URL").map(|url| RabbitHarness {
        url: with_expiry(&url),
    })
}

switchyard_conformance::conformance_tests!(harness);
