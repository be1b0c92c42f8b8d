//! The conformance suite against a Kafka-compatible broker
//! (`SWITCHYARD_KAFKA_URL`; tansu in CI), plus Kafka-specific tests.

use std::time::Duration;

use switchyard_conformance::Harness;
use switchyard_core::{Client, Result};

mod specific;

#[derive(Debug)]
struct KafkaHarness {
    url: String,
}

#[async_trait::async_trait]
impl Harness for KafkaHarness {
    async fn client(&self) -> Result<Client> {
        switchyard_kafka::connect(&self.url).await
    }

    fn ack_timeout(&self) -> Duration {
        Duration::from_secs(2)
    }

    fn receive_timeout(&self) -> Duration {
        // A new consumer first joins its group.
        Duration::from_secs(20)
    }
}

async fn harness() -> Option<KafkaHarness> {
    switchyard_conformance::broker_url("SWITCHYARD_KAFKA_URL").map(|url| KafkaHarness { url })
}

switchyard_conformance::conformance_tests!(harness);
/// For the cases that crash a consumer process: a crashed member holds its
/// partitions until its session times out (45 s by default), so these
/// consumers use 6 s.
async fn crash_harness() -> Option<KafkaHarness> {
    harness().await.map(|h| {
        let sep = if h.url.contains('?') { '&' } else { '?' };
        KafkaHarness {
            url: format!(
                "{}{sep}session.timeout.ms=6000&heartbeat.interval.ms=1000",
                h.url
            ),
        }
    })
}

switchyard_conformance::conformance_tests!(crash crash_harness);
