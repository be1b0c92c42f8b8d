//! The conformance suite against an SQS endpoint (`SWITCHYARD_SQS_URL`,
//! moto in CI) in queue mode, fan-out mode and fan-out mode with FIFO
//! topics and queues, plus SQS-specific tests. Credentials come
//! from the standard AWS chain (scripts/brokers.sh exports test ones for
//! moto).

use std::time::Duration;

use switchyard_conformance::{
    Harness, Timing,
    fault::{Linked, Via},
};
use switchyard_core::{Client, Result};

mod specific;

/// moto answers one call at a time and scans the whole queue on every
/// `DeleteMessage` (about 60 ms per delete with 1,600 messages queued), so
/// two of its 1,600-message cases at once outlast the three-minute bound of
/// a case: the cases take turns. (The wait for a turn is not part of a
/// case's time; no bound changes.)
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug)]
struct SqsHarness {
    url: String,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

#[async_trait::async_trait]
impl Harness for SqsHarness {
    async fn client(&self) -> Result<Client> {
        switchyard_sqs::connect(&self.url).await
    }

    /// Moto's test credentials where the environment has none, so that
    /// only the endpoint can fail.
    async fn connect(&self, url: &str) -> Result<Client> {
        let mut config = switchyard_sqs::SqsConfig::from_url(url)?;
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            config = config.with_static_credentials("test", "test");
        }
        switchyard_sqs::SqsBroker::connect(config)
            .await
            .map(Client::new)
    }

    fn url_at(&self, addr: std::net::SocketAddr, connect_timeout: Duration) -> Option<String> {
        let ms = connect_timeout.as_millis();
        Some(format!(
            "sqs://?region=us-east-1&endpoint=http://{addr}&connect_timeout={ms}ms"
        ))
    }

    /// Visibility timeouts are whole seconds (1 s here), and moto is a
    /// little later than a broker.
    fn timing(&self) -> Timing {
        Timing {
            slack: Duration::from_millis(2500),
            ..Timing::LOOPBACK
        }
    }

    /// Deletes the subscription's queue (`DeleteQueue`, as `aws sqs
    /// delete-queue` does). In queue mode a topic's subscriptions share one
    /// queue: the second call finds it gone already.
    async fn delete_subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> std::result::Result<(), String> {
        let config = switchyard_sqs::SqsConfig::from_url(&self.url).expect("the URL");
        let broker = switchyard_sqs::SqsBroker::connect(config)
            .await
            .expect("connect");
        let name = broker.queue_name(topic, subscription);
        let sqs = broker.sqs_client();
        match sqs.get_queue_url().queue_name(&name).send().await {
            Ok(found) => {
                sqs.delete_queue()
                    .queue_url(found.queue_url().expect("a queue URL"))
                    .send()
                    .await
                    .expect("DeleteQueue");
            }
            Err(e) => {
                let code = switchyard_sqs::aws_sdk_sqs::error::ProvideErrorMetadata::code(&e)
                    .unwrap_or_default()
                    .to_owned();
                assert!(
                    code.contains("NonExistentQueue") || code.contains("QueueDoesNotExist"),
                    "GetQueueUrl {name}: {e:?}"
                );
            }
        }
        Ok(())
    }

    /// The endpoint behind a link; clients time requests out after 3 s, and
    /// a receiver's close takes at most the 1 s long-poll wait plus that
    /// (bound: 6 s). moto cannot restart with its state, so SQS gets the
    /// network faults only.
    async fn linked(&self) -> Option<Box<dyn Linked>> {
        let endpoint = self
            .url
            .split(['?', '&'])
            // Only an endpoint of the harness's own (moto) goes through a
            // link; AWS itself gets no network faults.
            .find_map(|p| p.strip_prefix("endpoint="))?
            .to_owned();
        let server = endpoint
            .trim_start_matches("http://")
            .split('/')
            .next()?
            .to_owned();
        let url = self.url.clone();
        let linked = Via::to(&server, Duration::from_secs(6), move |addr| {
            let url = url.replace(&endpoint, &format!("http://{addr}"));
            async move {
                switchyard_sqs::connect(&format!("{url}&request_timeout=3s&connect_timeout=2s"))
                    .await
            }
        })
        .await
        .expect("a link in front of the SQS endpoint");
        Some(Box::new(linked))
    }
}

/// The configured URL with `mode` set and one-second long polls: a receive
/// still running when its consumer closes takes (and counts) messages that
/// become visible meanwhile, and the cases restart consumers within seconds.
fn with_mode(url: &str, mode: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}mode={mode}&wait=1s")
}

async fn harness(mode: &str) -> Option<SqsHarness> {
    let url = switchyard_conformance::containers::suite_url(
        "SWITCHYARD_SQS_URL",
        switchyard_conformance::containers::Kind::Sqs,
    )?;
    Some(SqsHarness {
        url: with_mode(&url, mode),
        _turn: TURN.lock().await,
    })
}

async fn queue_mode() -> Option<SqsHarness> {
    harness("queue").await
}

async fn fanout_mode() -> Option<SqsHarness> {
    harness("fanout").await
}

/// FIFO topics and queues in fan-out mode: the whole contract, per-key
/// order included.
async fn fifo_mode() -> Option<SqsHarness> {
    harness("fanout&fifo=true").await
}

mod queue {
    switchyard_conformance::conformance_tests!(super::queue_mode);
    switchyard_conformance::conformance_tests!(crash super::queue_mode);
    switchyard_conformance::conformance_tests!(link_faults super::queue_mode);
}

mod fanout {
    switchyard_conformance::conformance_tests!(super::fanout_mode);
    switchyard_conformance::conformance_tests!(crash super::fanout_mode);
    switchyard_conformance::conformance_tests!(link_faults super::fanout_mode);
}

mod fifo {
    switchyard_conformance::conformance_tests!(super::fifo_mode);
    switchyard_conformance::conformance_tests!(crash super::fifo_mode);
}
