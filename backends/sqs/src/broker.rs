//! The SQS backend's broker: queues, SNS topics and subscriptions, publishing
//! to SQS or SNS.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, atomic::AtomicUsize},
    time::Duration,
};

use async_trait::async_trait;
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use futures_util::{StreamExt, stream::FuturesOrdered};
use switchyard_core::{
    Capabilities, Client, Error, KeyOrdering, Message, Result, SubscribeOptions,
    driver::{
        Broker, Lifecycle, Outstanding, Publisher, Receiver, ReceiverCore, ReceiverHandle,
        SlowStart, Subscriber,
    },
};
use tokio::sync::{Semaphore, mpsc};

use crate::{
    Mode, SqsConfig,
    codec::{self, Encoded},
    error::{failure, sdk_error, topic_missing},
    names,
    receiver::*,
};

/// Bytes of `max_message_size` kept for attributes; the payload limit is
/// what is left, times 3/4 (a binary payload travels as base64).
pub(crate) const ATTRIBUTE_RESERVE: usize = 8 * 1024;
/// SQS and SNS take at most 10 messages per batch.
pub(crate) const BATCH: usize = 10;
/// Pause after a failed receive before the next one.
pub(crate) const POLL_RETRY: Duration = Duration::from_millis(500);
/// Pause after an empty short poll.
pub(crate) const SHORT_POLL_PAUSE: Duration = Duration::from_millis(100);
/// Longest a poller waits for more free prefetch room before receiving,
/// while its consumer still has messages to work on.
pub(crate) const GATHER: Duration = Duration::from_millis(25);
/// Longest a poller whose consumer has nothing to work on waits for more
/// free room: one `DeleteMessageBatch` frees up to ten permits, released
/// one by one as each ack returns, and the burst is taken in one receive
/// rather than a receive of one and another of the rest.
pub(crate) const BURST: Duration = Duration::from_millis(2);
/// Shortest pause between two rounds of the lease keeper (see
/// [`keep_leases`]).
pub(crate) const KEEP_TICK: Duration = Duration::from_millis(250);
/// `DeleteMessageBatch` calls a receiver keeps in flight; acks that arrive
/// while they are all out wait and go together in the next batch.
pub(crate) const DELETE_WINDOW: usize = 4;
/// Longest a partial `DeleteMessageBatch` waits for more acks, and only
/// while more of the consumer's prefetch is in use than the deletes in
/// flight cover (see [`Held`]): the acks of a burst arrive one by one, and
/// without the wait the first goes alone. Room taken by a receive on its
/// way counts as in use, so with long polls out most partial batches wait
/// it: a millisecond, against an SQS round trip of tens.
pub(crate) const LINGER: Duration = Duration::from_millis(1);

fn sqs_attributes(encoded: &Encoded) -> HashMap<String, MessageAttributeValue> {
    encoded
        .attributes
        .iter()
        .filter_map(|(k, v)| {
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(v)
                .build()
                .ok()
                .map(|a| ((*k).to_owned(), a))
        })
        .collect()
}

fn sns_attributes(encoded: &Encoded) -> HashMap<String, aws_sdk_sns::types::MessageAttributeValue> {
    encoded
        .attributes
        .iter()
        .filter_map(|(k, v)| {
            aws_sdk_sns::types::MessageAttributeValue::builder()
                .data_type("String")
                .string_value(v)
                .build()
                .ok()
                .map(|a| ((*k).to_owned(), a))
        })
        .collect()
}

struct Inner {
    sqs: aws_sdk_sqs::Client,
    sns: aws_sdk_sns::Client,
    config: SqsConfig,
    /// Queue name → URL, for queues known to exist.
    queues: Mutex<HashMap<String, String>>,
    /// Topic → SNS topic ARN (fan-out mode).
    topics: Mutex<HashMap<String, String>>,
    life: Lifecycle<ReceiverShared>,
}

/// A connection to SQS (and SNS in fan-out mode) implementing switchyard's
/// backend traits. Cheap to clone.
#[derive(Clone)]
pub struct SqsBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for SqsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsBroker")
            .field("config", &self.inner.config)
            .field("life", &self.inner.life)
            .finish_non_exhaustive()
    }
}

/// Connects from an `sqs://` URL and returns a [`Client`].
///
/// # Errors
///
/// [`Error::InvalidUrl`] for a malformed URL; [`Error::Config`] when no
/// region or no credentials can be found; [`Error::Connection`] when the
/// endpoint does not answer within the connect timeout;
/// [`Error::Authentication`] when it refuses the credentials.
pub async fn connect(url: &str) -> Result<Client> {
    Ok(Client::new(
        SqsBroker::connect(SqsConfig::from_url(url)?).await?,
    ))
}

impl SqsBroker {
    /// Connects with `config`, checking the endpoint and credentials with
    /// one `ListQueues` call.
    ///
    /// # Errors
    ///
    /// As for [`connect`].
    pub async fn connect(config: SqsConfig) -> Result<Self> {
        use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(config.connect_timeout)
                    .operation_timeout(config.request_timeout)
                    .build(),
            )
            // Throttling and transient errors: retried with backoff.
            .retry_config(RetryConfig::standard().with_max_attempts(3));
        if let Some(r) = &config.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(e) = &config.endpoint {
            loader = loader.endpoint_url(e);
        }
        if let Some((id, secret)) = &config.credentials {
            loader = loader.credentials_provider(aws_credential_types::Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "switchyard-static",
            ));
        }
        let shared = tokio::time::timeout(config.connect_timeout * 2, loader.load())
            .await
            .map_err(|_| Error::Connection {
                message: "loading the AWS configuration timed out".into(),
                source: None,
            })?;
        if shared.region().is_none() {
            return Err(Error::Config(
                "no AWS region: set `region=` in the sqs:// URL or AWS_REGION".into(),
            ));
        }
        let sqs = aws_sdk_sqs::Client::new(&shared);
        let sns = aws_sdk_sns::Client::new(&shared);
        let probe = sqs.list_queues().max_results(1).send();
        match tokio::time::timeout(config.connect_timeout, probe).await {
            Err(_) => {
                return Err(Error::Connection {
                    message: format!(
                        "no SQS endpoint answered within {:?}",
                        config.connect_timeout
                    ),
                    source: None,
                });
            }
            Ok(Err(e)) => return Err(sdk_error("connecting to SQS", e)),
            Ok(Ok(_)) => {}
        }
        Ok(Self {
            inner: Arc::new(Inner {
                sqs,
                sns,
                config,
                queues: Mutex::new(HashMap::new()),
                topics: Mutex::new(HashMap::new()),
                life: Lifecycle::new(),
            }),
        })
    }

    /// The native SQS client (escape hatch).
    #[must_use]
    pub fn sqs_client(&self) -> &aws_sdk_sqs::Client {
        &self.inner.sqs
    }

    /// The native SNS client (escape hatch).
    #[must_use]
    pub fn sns_client(&self) -> &aws_sdk_sns::Client {
        &self.inner.sns
    }

    /// The SQS queue a subscription reads (in queue mode, the topic's).
    #[must_use]
    pub fn queue_name(&self, topic: &str, subscription: &str) -> String {
        let fifo = self.inner.config.fifo;
        match self.inner.config.mode {
            Mode::Queue => names::topic_queue(topic, fifo),
            Mode::FanOut => names::subscription_queue(topic, subscription, fifo),
        }
    }

    /// The SNS topic a topic publishes to in fan-out mode.
    #[must_use]
    pub fn sns_topic_name(&self, topic: &str) -> String {
        names::sns_topic(topic, self.inner.config.fifo)
    }

    /// Forgets the cached SNS topic ARN of `topic` after SNS said it does
    /// not exist (deleted by an operator, or an emulator that lost its
    /// state), and the queues known to be subscribed, so the next publish
    /// creates the topic again and the next `ensure_subscription` or
    /// `subscribe` subscribes its queue to it again.
    fn forget_topic(&self, topic: &str) {
        self.inner
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(topic);
        self.inner
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn limit(&self) -> usize {
        self.inner
            .config
            .max_message_size
            .saturating_sub(ATTRIBUTE_RESERVE)
            / 4
            * 3
    }

    fn check_open(&self) -> Result<()> {
        self.inner.life.check_open()
    }

    /// The URL of queue `name`, created when missing (cached).
    async fn queue_url(&self, name: &str) -> Result<String> {
        if let Some(u) = self
            .inner
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return Ok(u.clone());
        }
        let mut create = self.inner.sqs.create_queue().queue_name(name);
        if self.inner.config.fifo {
            create = create.attributes(QueueAttributeName::FifoQueue, "true");
        }
        let out = create
            .send()
            .await
            .map_err(|e| sdk_error(&format!("creating queue {name}"), e))?;
        let url = out
            .queue_url()
            .ok_or_else(|| Error::broker("CreateQueue returned no URL", true, None))?
            .to_owned();
        self.inner
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), url.clone());
        Ok(url)
    }

    fn forget_queue(&self, name: &str) {
        self.inner
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// The SNS topic ARN of `topic`, created when missing (cached).
    async fn topic_arn(&self, topic: &str) -> Result<String> {
        if let Some(a) = self
            .inner
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
        {
            return Ok(a.clone());
        }
        let name = names::sns_topic(topic, self.inner.config.fifo);
        let mut create = self.inner.sns.create_topic().name(&name);
        if self.inner.config.fifo {
            create = create.attributes("FifoTopic", "true");
        }
        let out = create
            .send()
            .await
            .map_err(|e| sdk_error(&format!("creating SNS topic {name}"), e))?;
        let arn = out
            .topic_arn()
            .ok_or_else(|| Error::broker("CreateTopic returned no ARN", true, None))?
            .to_owned();
        self.inner
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_owned(), arn.clone());
        Ok(arn)
    }

    /// Makes sure the subscription's queue exists (and, in fan-out mode,
    /// receives the topic's messages); returns its URL.
    async fn subscription_queue(&self, topic: &str, subscription: &str) -> Result<String> {
        let name = self.queue_name(topic, subscription);
        let known = self
            .inner
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&name);
        let url = self.queue_url(&name).await?;
        if self.inner.config.mode == Mode::Queue || known {
            return Ok(url);
        }
        let arn = self
            .inner
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| sdk_error("reading the queue ARN", e))?
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .ok_or_else(|| Error::broker("GetQueueAttributes returned no ARN", true, None))?;
        let topic_arn = self.topic_arn(topic).await?;
        // Let the topic deliver into the queue (AWS checks this policy).
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
            }],
        });
        self.inner
            .sqs
            .set_queue_attributes()
            .queue_url(&url)
            .attributes(QueueAttributeName::Policy, policy.to_string())
            .send()
            .await
            .map_err(|e| sdk_error("allowing SNS to deliver to the queue", e))?;
        self.inner
            .sns
            .subscribe()
            .topic_arn(&topic_arn)
            .protocol("sqs")
            .endpoint(&arn)
            .attributes("RawMessageDelivery", "true")
            .return_subscription_arn(true)
            .send()
            .await
            .map_err(|e| sdk_error("subscribing the queue to the topic", e))?;
        Ok(url)
    }

    fn prepare(&self, message: &Message) -> Result<Encoded> {
        let mut encoded = codec::encode(message);
        if self.inner.config.fifo {
            // A fresh deduplication id per publish call: the SDK's retries of
            // one call are de-duplicated, a deliberate re-publish of the same
            // message id (redrive, a bridge) is not.
            let group = names::group_id(message.key().unwrap_or(message.id()));
            encoded.fifo = Some((group, switchyard_core::new_id()));
        }
        let max = self.inner.config.max_message_size;
        if encoded.size() > max {
            // The client checked the payload against `limit`; headers can
            // still push the whole over the service's maximum.
            return Err(Error::PayloadTooLarge {
                size: message.payload().len() + (encoded.size() - max),
                limit: self.limit(),
            });
        }
        Ok(encoded)
    }

    async fn send_one(&self, topic: &str, encoded: Encoded) -> Result<()> {
        match self.inner.config.mode {
            Mode::Queue => {
                let name = names::topic_queue(topic, self.inner.config.fifo);
                let url = self.queue_url(&name).await?;
                let r = self
                    .inner
                    .sqs
                    .send_message()
                    .queue_url(url)
                    .message_body(&encoded.body)
                    .set_message_attributes(Some(sqs_attributes(&encoded)))
                    .set_message_group_id(encoded.group_id())
                    .set_message_deduplication_id(encoded.dedup_id())
                    .send()
                    .await;
                r.map(|_| ()).map_err(|e| {
                    self.forget_queue(&name);
                    sdk_error("SendMessage", e)
                })
            }
            Mode::FanOut => {
                let arn = self.topic_arn(topic).await?;
                self.inner
                    .sns
                    .publish()
                    .topic_arn(arn)
                    .message(&encoded.body)
                    .set_message_attributes(Some(sns_attributes(&encoded)))
                    .set_message_group_id(encoded.group_id())
                    .set_message_deduplication_id(encoded.dedup_id())
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        if topic_missing(&e) {
                            self.forget_topic(topic);
                        }
                        sdk_error("SNS Publish", e)
                    })
            }
        }
    }

    /// Sends up to 10 encoded messages in one batch call; one result each.
    async fn send_batch(&self, topic: &str, batch: Vec<Encoded>) -> Vec<Result<()>> {
        let n = batch.len();
        let failed_all = |e: Error| -> Vec<Result<()>> {
            let text = e.to_string();
            let retryable = e.is_retryable();
            (0..n)
                .map(|_| Err(Error::broker(text.clone(), retryable, None)))
                .collect()
        };
        let mut results: Vec<Result<()>> = (0..n).map(|_| Ok(())).collect();
        let failures: Vec<(usize, String, bool)> = match self.inner.config.mode {
            Mode::Queue => {
                let name = names::topic_queue(topic, self.inner.config.fifo);
                let url = match self.queue_url(&name).await {
                    Ok(u) => u,
                    Err(e) => return failed_all(e),
                };
                let entries: Vec<SendMessageBatchRequestEntry> = batch
                    .iter()
                    .enumerate()
                    .filter_map(|(i, e)| {
                        SendMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .message_body(&e.body)
                            .set_message_attributes(Some(sqs_attributes(e)))
                            .set_message_group_id(e.group_id())
                            .set_message_deduplication_id(e.dedup_id())
                            .build()
                            .ok()
                    })
                    .collect();
                match self
                    .inner
                    .sqs
                    .send_message_batch()
                    .queue_url(url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                {
                    Ok(out) => out
                        .failed()
                        .iter()
                        .filter_map(|f| failure(f.id(), f.code(), f.message(), f.sender_fault()))
                        .collect(),
                    Err(e) => {
                        self.forget_queue(&name);
                        return failed_all(sdk_error("SendMessageBatch", e));
                    }
                }
            }
            Mode::FanOut => {
                let arn = match self.topic_arn(topic).await {
                    Ok(a) => a,
                    Err(e) => return failed_all(e),
                };
                let entries: Vec<aws_sdk_sns::types::PublishBatchRequestEntry> = batch
                    .iter()
                    .enumerate()
                    .filter_map(|(i, e)| {
                        aws_sdk_sns::types::PublishBatchRequestEntry::builder()
                            .id(i.to_string())
                            .message(&e.body)
                            .set_message_attributes(Some(sns_attributes(e)))
                            .set_message_group_id(e.group_id())
                            .set_message_deduplication_id(e.dedup_id())
                            .build()
                            .ok()
                    })
                    .collect();
                match self
                    .inner
                    .sns
                    .publish_batch()
                    .topic_arn(arn)
                    .set_publish_batch_request_entries(Some(entries))
                    .send()
                    .await
                {
                    Ok(out) => out
                        .failed()
                        .iter()
                        .filter_map(|f| failure(f.id(), f.code(), f.message(), f.sender_fault()))
                        .collect(),
                    Err(e) => {
                        if topic_missing(&e) {
                            self.forget_topic(topic);
                        }
                        return failed_all(sdk_error("SNS PublishBatch", e));
                    }
                }
            }
        };
        for (i, text, retryable) in failures {
            if let Some(r) = results.get_mut(i) {
                *r = Err(Error::broker(text, retryable, None));
            }
        }
        results
    }
}

#[async_trait]
impl Publisher for SqsBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        self.check_open()?;
        let encoded = self.prepare(&message)?;
        self.send_one(topic, encoded).await
    }

    /// Batches of 10 (`SendMessageBatch`, or SNS `PublishBatch` in fan-out
    /// mode), with `publish_window` batches in flight.
    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<()>> {
        if self.check_open().is_err() {
            return messages.iter().map(|_| Err(Error::Closed)).collect();
        }
        let mut results: Vec<Option<Result<()>>> = (0..messages.len()).map(|_| None).collect();
        let mut ready: Vec<(usize, Encoded)> = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            match self.prepare(m) {
                Ok(e) => ready.push((i, e)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let mut chunks = Vec::new();
        let mut it = ready.into_iter().peekable();
        while it.peek().is_some() {
            let chunk: Vec<(usize, Encoded)> = it.by_ref().take(BATCH).collect();
            chunks.push(chunk);
        }
        let mut in_flight = FuturesOrdered::new();
        let window = self.inner.config.publish_window;
        let mut pending = chunks.into_iter();
        loop {
            while in_flight.len() < window {
                let Some(chunk) = pending.next() else { break };
                let (idx, enc): (Vec<usize>, Vec<Encoded>) = chunk.into_iter().unzip();
                in_flight.push_back(async move { (idx, self.send_batch(topic, enc).await) });
            }
            let Some((idx, rs)) = in_flight.next().await else {
                break;
            };
            for (i, r) in idx.into_iter().zip(rs) {
                results[i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::broker("publish result missing", true, None))))
            .collect()
    }

    async fn close(&self) -> Result<()> {
        // Every publish was confirmed by the service before it returned.
        self.inner.life.cancel();
        Ok(())
    }
}

#[async_trait]
impl Subscriber for SqsBroker {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.check_open()?;
        match self.inner.config.mode {
            Mode::Queue => self
                .queue_url(&names::topic_queue(topic, self.inner.config.fifo))
                .await
                .map(|_| ()),
            Mode::FanOut => self.topic_arn(topic).await.map(|_| ()),
        }
    }

    async fn ensure_subscription(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.check_open()?;
        self.subscription_queue(topic, options.name())
            .await
            .map(|_| ())
    }

    async fn receiver(&self, topic: &str, options: &SubscribeOptions) -> Result<Box<dyn Receiver>> {
        self.check_open()?;
        let url = self.subscription_queue(topic, options.name()).await?;
        let prefetch = options.prefetch();
        let (tx, rx) = mpsc::channel(prefetch.max(1));
        let ack_timeout = options.ack_timeout();
        let visibility =
            i32::try_from(ack_timeout.as_secs() + u64::from(ack_timeout.subsec_nanos() > 0))
                .unwrap_or(43_200)
                .clamp(1, 43_200);
        let (deletes, delete_rx) = mpsc::unbounded_channel();
        let permits = Arc::new(Semaphore::new(prefetch));
        tokio::spawn(deleter(
            self.inner.sqs.clone(),
            url.clone(),
            delete_rx,
            Held {
                permits: Arc::clone(&permits),
                prefetch,
            },
        ));
        let shared = Arc::new(ReceiverShared {
            sqs: self.inner.sqs.clone(),
            url,
            deletes,
            permits,
            prefetch,
            visibility,
            wait: wait_for(self.inner.config.wait, visibility),
            request_timeout: self.inner.config.request_timeout,
            core: ReceiverCore::new(self.inner.life.child_token(), rx),
            receiving: AtomicUsize::new(0),
            gathering: tokio::sync::Mutex::new(()),
            receive_started: std::sync::Mutex::new(None),
            outstanding: Outstanding::new(),
            prefetched: Prefetched::new(),
            slow: SlowStart::new(),
            gone: std::sync::OnceLock::new(),
        });
        for _ in 0..self.inner.config.pollers.max(1) {
            tokio::spawn(poll(Arc::clone(&shared), tx.clone()));
        }
        tokio::spawn(keep_leases(Arc::clone(&shared)));
        self.inner.life.adopt(&shared);
        Ok(Box::new(ReceiverHandle::new(shared)))
    }

    async fn close(&self) -> Result<()> {
        // At once, so closing takes one receiver's bound, not their sum.
        let live = self.inner.life.close();
        futures_util::future::join_all(live.iter().map(|r| r.hand_back())).await;
        Ok(())
    }
}

impl Broker for SqsBroker {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(self.limit())
            .with_backend("sqs")
            // FIFO queues keep per-key order (the key is the message
            // group); standard queues keep none.
            .with_ordering(if self.inner.config.fifo {
                KeyOrdering::PerKey
            } else {
                KeyOrdering::PerKeyInSpecialMode
            })
            .with_native_delay(true)
            .with_returns_count_attempts(true)
            .with_fan_out(self.inner.config.mode == Mode::FanOut)
            .with_competing_consumers(true)
            .with_replay(false)
            .with_persistent(true)
            .with_min_ack_timeout(Duration::from_secs(1))
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}
