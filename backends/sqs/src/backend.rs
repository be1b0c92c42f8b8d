//! The SQS backend: publisher (SQS or SNS), subscriber, receivers, ackers.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use aws_sdk_sqs::{
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    types::{
        ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
        MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
        SendMessageBatchRequestEntry,
    },
};
use futures_util::{StreamExt, stream::FuturesOrdered};
use switchyard_core::{
    Acker, Broker, Capabilities, Client, Error, KeyOrdering, Message, Publisher, RawDelivery,
    Receiver, Result, SubscribeOptions, Subscriber,
    driver::{FailureStreak, Outstanding, ReceiverSet, SlowStart},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    Mode, SqsConfig,
    codec::{self, Encoded},
    names,
};

/// Bytes of `max_message_size` kept for attributes; the payload limit is
/// what is left, times 3/4 (a binary payload travels as base64).
const ATTRIBUTE_RESERVE: usize = 8 * 1024;
/// SQS and SNS take at most 10 messages per batch.
const BATCH: usize = 10;
/// Pause after a failed receive before the next one.
const POLL_RETRY: Duration = Duration::from_millis(500);
/// Pause after an empty short poll.
const SHORT_POLL_PAUSE: Duration = Duration::from_millis(100);
/// Longest a poller waits for more free prefetch room before receiving,
/// while its consumer still has messages to work on.
const GATHER: Duration = Duration::from_millis(25);
/// Shortest pause between two rounds of the lease keeper (see
/// [`keep_leases`]).
const KEEP_TICK: Duration = Duration::from_millis(250);
/// `DeleteMessageBatch` calls a receiver keeps in flight; acks that arrive
/// while they are all out wait and go together in the next batch.
const DELETE_WINDOW: usize = 4;

/// Maps an SDK error: credentials and signatures → authentication;
/// throttling, timeouts and transport → retryable; the rest → broker errors.
/// Whether SNS answered that the topic does not exist.
fn topic_missing<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.code().is_some_and(|c| c.contains("NotFound"))
}

fn sdk_error<E, R>(what: &str, e: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    // A service error says its code and message (the raw response, with
    // all its headers, stays in the source); anything else its whole chain.
    let text = match &e {
        SdkError::ServiceError(s) => format!(
            "{what}: {}: {}",
            s.err().code().unwrap_or("unknown error"),
            s.err().message().unwrap_or_default()
        ),
        _ => format!("{what}: {}", DisplayErrorContext(&e)),
    };
    match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
            if text.contains("credentials") {
                Error::Config(text)
            } else {
                Error::connection(text, e)
            }
        }
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or_default();
            match code {
                "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "AccessDenied"
                | "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidAccessKeyId"
                | "AuthorizationError" => Error::Authentication {
                    message: text,
                    source: Some(Box::new(e)),
                },
                _ => {
                    let retryable = code.contains("Throttl")
                        || code.contains("NonExistentQueue")
                        || code.contains("QueueDoesNotExist")
                        || code.contains("NotFound")
                        || code.contains("InternalError")
                        || code.contains("ServiceUnavailable");
                    Error::broker(text, retryable, Some(Box::new(e)))
                }
            }
        }
        SdkError::ConstructionFailure(_) if text.contains("credentials") => Error::Config(text),
        _ => Error::broker(text, true, Some(Box::new(e))),
    }
}

/// One failed entry of a batch call (SQS and SNS report them alike):
/// (entry index, what went wrong, whether a retry may succeed).
fn failure(
    id: &str,
    code: &str,
    message: Option<&str>,
    sender_fault: bool,
) -> Option<(usize, String, bool)> {
    Some((
        id.parse().ok()?,
        format!("{code}: {}", message.unwrap_or_default()),
        !sender_fault,
    ))
}

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
    closed: CancellationToken,
    receivers: ReceiverSet<ReceiverShared>,
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
            .field("closed", &self.inner.closed.is_cancelled())
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
                closed: CancellationToken::new(),
                receivers: ReceiverSet::new(),
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
        if self.inner.closed.is_cancelled() {
            Err(Error::Closed)
        } else {
            Ok(())
        }
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
        self.inner.closed.cancel();
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
        let prefetch = options.prefetch_limit();
        let (tx, rx) = mpsc::channel(prefetch.max(1));
        let ack_timeout = options.ack_timeout_value();
        let visibility =
            i32::try_from(ack_timeout.as_secs() + u64::from(ack_timeout.subsec_nanos() > 0))
                .unwrap_or(43_200)
                .clamp(1, 43_200);
        let (deletes, delete_rx) = mpsc::unbounded_channel();
        tokio::spawn(deleter(self.inner.sqs.clone(), url.clone(), delete_rx));
        let shared = Arc::new(ReceiverShared {
            sqs: self.inner.sqs.clone(),
            url,
            deletes,
            cancel: self.inner.closed.child_token(),
            permits: Arc::new(Semaphore::new(prefetch)),
            prefetch,
            visibility,
            wait: wait_for(self.inner.config.wait, visibility),
            request_timeout: self.inner.config.request_timeout,
            rx: tokio::sync::Mutex::new(rx),
            receiving: AtomicUsize::new(0),
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
        self.inner.receivers.insert(&shared);
        Ok(Box::new(SqsReceiver { shared }))
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.cancel();
        // At once, so closing takes one receiver's bound, not their sum.
        let live = self.inner.receivers.take_live();
        futures_util::future::join_all(live.iter().map(|r| r.shutdown())).await;
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
}

/// A received message with the prefetch permit it holds and its ticket in
/// [`Prefetched`].
type Received = (aws_sdk_sqs::types::Message, OwnedSemaphorePermit, u64);

/// The messages a receiver took from the queue and has not handed out yet
/// (by ticket).
///
/// Their visibility timeout runs from the receive, but none of them is an
/// attempt until the application sees it (DESIGN §3.14): [`keep_leases`]
/// extends those whose lease runs low, so a consumer busy with what it holds
/// does not let its prefetch fall back to the queue — where another consumer
/// would take it at a raised receive count while this one still hands out
/// its stale copy.
type Prefetched = Outstanding<Lease>;

/// The lease on one prefetched copy.
struct Lease {
    receipt: String,
    /// When its visibility timeout ends at the latest.
    due: tokio::time::Instant,
    /// Lost: SQS refused to extend it (the copy's visibility lapsed). The
    /// message is back in the queue, so the copy is dropped rather than
    /// handed out.
    lost: bool,
}

struct ReceiverShared {
    sqs: aws_sdk_sqs::Client,
    url: String,
    cancel: CancellationToken,
    /// One permit per message this consumer may hold (its prefetch).
    permits: Arc<Semaphore>,
    prefetch: usize,
    /// Visibility timeout (the ack timeout), in seconds.
    visibility: i32,
    /// Long-poll wait, in seconds.
    wait: i32,
    /// Bound on one SQS call.
    request_timeout: Duration,
    rx: tokio::sync::Mutex<mpsc::Receiver<Received>>,
    /// Acks, to the receiver's deleter (see [`deleter`]).
    deletes: mpsc::UnboundedSender<Delete>,
    /// Receive calls in flight, over all of the receiver's pollers.
    receiving: AtomicUsize,
    /// When the latest of them started.
    receive_started: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Receipt handles of the messages handed out and not settled: `close`
    /// makes them visible again at once, rather than after the visibility
    /// timeout.
    outstanding: Outstanding<String>,
    /// What the pollers received and the receiver has not handed out.
    prefetched: Prefetched,
    /// One message at a time until a first delivery shows that the head of
    /// the queue is not what crashed the last consumer.
    slow: SlowStart,
    /// Set (and the pollers stopped) once SQS says the queue does not
    /// exist: every receive returns it.
    gone: std::sync::OnceLock<Error>,
}

/// One ack waiting for its `DeleteMessageBatch`.
struct Delete {
    receipt: String,
    done: oneshot::Sender<Result<()>>,
}

impl fmt::Debug for ReceiverShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverShared")
            .field("url", &self.url)
            .field("closed", &self.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl ReceiverShared {
    /// Stops polling and makes everything this receiver holds visible again
    /// at once: the messages it handed out and that are not settled, and
    /// what it received but never handed out.
    ///
    /// Waits for the receives still in flight to end first (a long poll is
    /// never abandoned, see [`poll`]; at most the poll `wait` plus the
    /// request timeout): after `close` this receiver takes nothing more from
    /// the queue — a poll left running would take messages published after
    /// the close (counting a receive for each) only to hand them back.
    /// Stops the pollers and hands back what the receiver holds. Takes at
    /// most the long-poll wait plus one request timeout, however much it
    /// holds and whether or not SQS answers: a receive in flight is waited
    /// for (within that bound), the hand-back gets what is left of it (its
    /// batches at once), and what it could not hand back comes back after
    /// the visibility timeout.
    async fn shutdown(&self) {
        self.cancel.cancel();
        let wait = Duration::from_secs(u64::try_from(self.wait).unwrap_or(0));
        let until = tokio::time::Instant::now() + wait + self.request_timeout;
        while self.receiving.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut held = self.outstanding.take_all();
        if let Ok(mut rx) = self.rx.try_lock() {
            rx.close();
            while let Ok((m, _permit, ticket)) = rx.try_recv() {
                self.prefetched.settle(ticket);
                held.extend(m.receipt_handle);
            }
        }
        let _ = tokio::time::timeout_at(until, self.release(held)).await;
    }

    /// Hands out a prefetched copy; `None` when its lease was lost (the
    /// message is back in the queue and comes again by a new receive).
    fn deliver(self: &Arc<Self>, (m, permit, ticket): Received) -> Option<RawDelivery> {
        if self.prefetched.settle(ticket).is_none_or(|l| l.lost) {
            return None;
        }
        let system = m.attributes();
        let attempt = system
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(1)
            .max(1);
        let published_at = system
            .and_then(|a| a.get(&MessageSystemAttributeName::SentTimestamp))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        let attr = |name: &str| {
            m.message_attributes()
                .and_then(|a| a.get(name))
                .and_then(|v| v.string_value())
                .map(str::to_owned)
        };
        let message = codec::decode(
            m.body().unwrap_or_default().to_owned(),
            attr(codec::ID),
            attr(codec::META).as_deref(),
            published_at,
            || m.message_id().unwrap_or_default().to_owned(),
        );
        let receipt = m.receipt_handle().unwrap_or_default().to_owned();
        let ticket = self.outstanding.insert(receipt.clone());
        self.slow.handed_out(attempt);
        Some(RawDelivery {
            message,
            attempt,
            acker: Box::new(SqsAcker {
                shared: Arc::clone(self),
                receipt,
                ticket,
                _permit: permit,
            }),
        })
    }
}

impl ReceiverShared {
    /// Makes messages visible again, ten per `ChangeMessageVisibilityBatch`:
    /// at once, or — while one of this closing receiver's own long polls is
    /// still running (a receive is never abandoned, see [`poll`]) — once it
    /// ended, since that poll would take them (counting a receive) and only
    /// hand them back again.
    async fn release(&self, handles: Vec<String>) {
        if handles.is_empty() {
            return;
        }
        let visibility = self.until_polls_end();
        let calls: Vec<_> = handles
            .chunks(BATCH)
            .map(|chunk| {
                let entries = visibility_entries(chunk.iter().map(String::as_str), visibility);
                // Best effort: what is not released comes back after the
                // visibility timeout anyway.
                self.sqs
                    .change_message_visibility_batch()
                    .queue_url(&self.url)
                    .set_entries(Some(entries))
                    .send()
            })
            .collect();
        // As many in flight as acks get (a large hand-back on a dead network
        // is cut by its caller's deadline).
        let mut calls = futures_util::stream::iter(calls).buffer_unordered(DELETE_WINDOW);
        while calls.next().await.is_some() {}
    }
}

impl ReceiverShared {
    /// The visibility timeout (the ack timeout, in whole seconds).
    fn visibility_duration(&self) -> Duration {
        Duration::from_secs(u64::try_from(self.visibility).unwrap_or(1))
    }

    /// Whole seconds until every receive this receiver has in flight ended
    /// (0 when none is), with a second's margin for the server's view.
    fn until_polls_end(&self) -> i32 {
        if self.receiving.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let started = *self
            .receive_started
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(started) = started else { return 0 };
        let end = started + Duration::from_secs(u64::try_from(self.wait).unwrap_or(0) + 1);
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        i32::try_from(left.as_secs() + u64::from(left.subsec_nanos() > 0)).unwrap_or(0)
    }
}

/// Deletes what a receiver's ackers hand it, in `DeleteMessageBatch` calls
/// of up to 10 with [`DELETE_WINDOW`] in flight, and answers each ack with
/// its own entry's result. An ack that finds a free window goes at once
/// (alone, if nothing else is waiting); under load the acks that queue up
/// behind a full window share the next call. Ends when the receiver and all
/// its ackers are gone.
async fn deleter(sqs: aws_sdk_sqs::Client, url: String, mut rx: mpsc::UnboundedReceiver<Delete>) {
    let window = Arc::new(Semaphore::new(DELETE_WINDOW));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = Arc::clone(&window).acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        let (sqs, url) = (sqs.clone(), url.clone());
        tokio::spawn(async move {
            delete_batch(&sqs, &url, batch).await;
            drop(permit);
        });
    }
}

async fn delete_batch(sqs: &aws_sdk_sqs::Client, url: &str, batch: Vec<Delete>) {
    let entries: Vec<DeleteMessageBatchRequestEntry> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(&d.receipt)
                .build()
                .ok()
        })
        .collect();
    let out = sqs
        .delete_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await;
    let mut results: Vec<Result<()>> = match out {
        Ok(out) => {
            let mut results: Vec<Result<()>> = batch.iter().map(|_| Ok(())).collect();
            for (i, text, retryable) in out
                .failed()
                .iter()
                .filter_map(|f| failure(f.id(), f.code(), f.message(), f.sender_fault()))
            {
                if let Some(r) = results.get_mut(i) {
                    *r = Err(Error::broker(
                        format!("DeleteMessage: {text}"),
                        retryable,
                        None,
                    ));
                }
            }
            results
        }
        Err(e) => {
            let e = sdk_error("DeleteMessageBatch", e);
            batch.iter().map(|_| Err(e.replicate())).collect()
        }
    };
    for d in batch.into_iter().rev() {
        let r = results.pop().unwrap_or(Ok(()));
        let _ = d.done.send(r);
    }
}

/// Takes room for a receive: one permit, then more while the consumer still
/// has messages to work on, or another poller's receive is on its way to
/// it: one receive of 10 instead of ten of 1 (each receive is a billed call,
/// and emulators scan the queue on each). `None` when the receiver closed.
async fn gather(
    shared: &Arc<ReceiverShared>,
    tx: &mpsc::Sender<Received>,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let first = tokio::select! {
        p = Arc::clone(&shared.permits).acquire_owned() => match p {
            Ok(p) => p,
            Err(_) => return None,
        },
        () = shared.cancel.cancelled() => return None,
    };
    let mut permits = vec![first];
    let target = BATCH.min(shared.prefetch);
    let gather_until = tokio::time::Instant::now() + GATHER;
    while permits.len() < target {
        if let Ok(p) = Arc::clone(&shared.permits).try_acquire_owned() {
            permits.push(p);
            continue;
        }
        if tx.capacity() == tx.max_capacity() && shared.receiving.load(Ordering::Acquire) == 0 {
            break; // the consumer is waiting on nothing: receive now
        }
        tokio::select! {
            p = Arc::clone(&shared.permits).acquire_owned() => match p {
                Ok(p) => permits.push(p),
                Err(_) => return None,
            },
            () = tokio::time::sleep_until(gather_until) => break,
            () = shared.cancel.cancelled() => return None,
        }
    }
    Some(permits)
}

/// One polling loop of a receiver: asks for as many messages as the
/// receiver has free prefetch room (at most 10), holding those permits.
///
/// A receive is never abandoned half-way: SQS would still hand messages to
/// the abandoned request and hide them for the visibility timeout. After the
/// receiver closes, the loop finishes its current receive and makes what it
/// got visible again.
async fn poll(shared: Arc<ReceiverShared>, tx: mpsc::Sender<Received>) {
    let mut failing = FailureStreak::default();
    loop {
        let mut permits = if shared.slow.is_open() {
            let Some(permits) = gather(&shared, &tx).await else {
                return;
            };
            permits
        } else {
            // One message at a time (see `SlowStart`): wait until nothing
            // is held — all the room is free, which also keeps the other
            // pollers out — and ask for one.
            // (The wait ends too when a first delivery, handed out and
            // still held, opens the receiver.)
            let all = u32::try_from(shared.prefetch).unwrap_or(u32::MAX);
            let wait = Arc::clone(&shared.permits).acquire_many_owned(all);
            let room = tokio::select! {
                p = wait => match p {
                    Ok(p) => Some(p),
                    Err(_) => return,
                },
                () = shared.slow.opened() => None,
                () = shared.cancel.cancelled() => return,
            };
            let Some(mut room) = room else { continue };
            room.split(1).into_iter().collect()
        };
        shared.receiving.fetch_add(1, Ordering::AcqRel);
        let started = tokio::time::Instant::now();
        *shared
            .receive_started
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(started);
        let out = shared
            .sqs
            .receive_message()
            .queue_url(&shared.url)
            .max_number_of_messages(i32::try_from(permits.len()).unwrap_or(1))
            .wait_time_seconds(shared.wait)
            .visibility_timeout(shared.visibility)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_attribute_names("All")
            .send()
            .await;
        shared.receiving.fetch_sub(1, Ordering::AcqRel);
        let messages = match out {
            Ok(out) => {
                failing.recovered();
                out.messages.unwrap_or_default()
            }
            Err(e) => {
                let code = e.code().unwrap_or_default().to_owned();
                let e = sdk_error("receiving messages", e);
                if code.contains("NonExistentQueue") || code.contains("QueueDoesNotExist") {
                    // Deleted under the receiver: say so, stop polling.
                    let _ = shared.gone.set(Error::not_found(
                        "queue",
                        shared.url.clone(),
                        format!("the subscription's queue was deleted: {e}"),
                        Some(Box::new(e)),
                    ));
                    shared.cancel.cancel();
                    return;
                }
                // Transient (the endpoint unreachable, throttling): retry,
                // never silently.
                if failing.failed() {
                    tracing::warn!(queue = %shared.url, error = %e, "receiving failed; retrying");
                }
                tokio::select! {
                    () = tokio::time::sleep(POLL_RETRY) => {}
                    () = shared.cancel.cancelled() => return,
                }
                continue;
            }
        };
        if shared.cancel.is_cancelled() {
            shared.release(receipts(messages)).await;
            return;
        }
        let empty = messages.is_empty();
        let mut rest = messages.into_iter();
        while let Some(m) = rest.next() {
            let Some(permit) = permits.pop() else {
                shared
                    .release(receipts(std::iter::once(m).chain(rest)))
                    .await;
                break;
            };
            let due = started + shared.visibility_duration();
            let ticket = shared.prefetched.insert(Lease {
                receipt: m.receipt_handle().unwrap_or_default().to_owned(),
                due,
                lost: false,
            });
            if let Err(mpsc::error::SendError((m, _, ticket))) = tx.send((m, permit, ticket)).await
            {
                shared.prefetched.settle(ticket);
                shared
                    .release(receipts(std::iter::once(m).chain(rest)))
                    .await;
                return;
            }
        }
        if empty && shared.wait == 0 {
            // Short polling (see `wait_for`): do not spin on an empty queue.
            tokio::select! {
                () = tokio::time::sleep(SHORT_POLL_PAUSE) => {}
                () = shared.cancel.cancelled() => return,
            }
        }
    }
}

/// Keeps the leases of a receiver's prefetched copies (see [`Prefetched`]):
/// every quarter of the visibility timeout (at least [`KEEP_TICK`]), the
/// copies with less than half of it left get it again, by
/// `ChangeMessageVisibilityBatch` — which SQS does not count as a receive.
/// A copy SQS refuses to extend is marked lost and dropped when its turn
/// comes. Ends when the receiver closes.
async fn keep_leases(shared: Arc<ReceiverShared>) {
    let visibility = shared.visibility_duration();
    let tick = (visibility / 4).max(KEEP_TICK);
    let mut failing = FailureStreak::default();
    loop {
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = shared.cancel.cancelled() => return,
        }
        let by = tokio::time::Instant::now() + visibility / 2;
        let due = shared
            .prefetched
            .select(|t, l| (!l.lost && l.due < by).then(|| (t, l.receipt.clone())));
        let calls: Vec<_> = due
            .chunks(BATCH)
            .map(|chunk| {
                let entries = visibility_entries(
                    chunk.iter().map(|(_, receipt)| receipt.as_str()),
                    shared.visibility,
                );
                let started = tokio::time::Instant::now();
                let call = shared
                    .sqs
                    .change_message_visibility_batch()
                    .queue_url(&shared.url)
                    .set_entries(Some(entries))
                    .send();
                async move { (chunk, started, call.await) }
            })
            .collect();
        let mut calls = futures_util::stream::iter(calls).buffer_unordered(DELETE_WINDOW);
        while let Some((chunk, started, out)) = calls.next().await {
            let out = match out {
                Ok(out) => {
                    failing.recovered();
                    out
                }
                Err(e) => {
                    // Transient, or the receiver is going: the next round
                    // tries again while the leases last.
                    if failing.failed() {
                        let e = sdk_error("ChangeMessageVisibilityBatch", e);
                        tracing::warn!(queue = %shared.url, error = %e, "keeping prefetched leases failed");
                    }
                    continue;
                }
            };
            let mut refused = vec![false; chunk.len()];
            for (i, text, retryable) in out
                .failed()
                .iter()
                .filter_map(|f| failure(f.id(), f.code(), f.message(), f.sender_fault()))
            {
                if let Some(r) = refused.get_mut(i) {
                    if retryable {
                        tracing::debug!(queue = %shared.url, error = %text, "extending a prefetched lease failed");
                    } else {
                        *r = true;
                    }
                }
            }
            for ((ticket, _), refused) in chunk.iter().zip(refused) {
                shared.prefetched.update(*ticket, |l| {
                    if refused {
                        l.lost = true;
                    } else {
                        l.due = started + visibility;
                    }
                });
            }
        }
    }
}

/// One `ChangeMessageVisibilityBatch` entry per receipt handle (ids are the
/// positions), each to `visibility` seconds.
fn visibility_entries<'a>(
    receipts: impl Iterator<Item = &'a str>,
    visibility: i32,
) -> Vec<ChangeMessageVisibilityBatchRequestEntry> {
    receipts
        .enumerate()
        .filter_map(|(i, receipt)| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(receipt)
                .visibility_timeout(visibility)
                .build()
                .ok()
        })
        .collect()
}

/// The receipt handles of received messages.
fn receipts(messages: impl IntoIterator<Item = aws_sdk_sqs::types::Message>) -> Vec<String> {
    messages
        .into_iter()
        .filter_map(|m| m.receipt_handle)
        .collect()
}

/// The long-poll wait for a visibility timeout: shorter than it, so a
/// receive still running when its receiver goes away ends before anything
/// that receiver held becomes visible again (0 — short polling — for a
/// one-second timeout).
fn wait_for(configured: Duration, visibility: i32) -> i32 {
    let configured = i32::try_from(configured.as_secs()).unwrap_or(20);
    configured.min(visibility - 1).max(0)
}

#[derive(Debug)]
struct SqsReceiver {
    shared: Arc<ReceiverShared>,
}

#[async_trait]
impl Receiver for SqsReceiver {
    /// The next message the receiver's long polls brought in.
    ///
    /// Cancel safe: polls run in background tasks and hand messages over a
    /// channel; a cancelled receive leaves them there.
    async fn recv(&self) -> Option<Result<RawDelivery>> {
        let s = &self.shared;
        let ended = || s.gone.get().map(|gone| Err(gone.replicate()));
        if s.gone.get().is_some() {
            return ended();
        }
        let mut rx = tokio::select! {
            rx = s.rx.lock() => rx,
            () = s.cancel.cancelled() => return ended(),
        };
        loop {
            let received = tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => r,
                    None => return ended(),
                },
                () = s.cancel.cancelled() => return ended(),
            };
            if let Some(d) = s.deliver(received) {
                return Some(Ok(d));
            }
        }
    }

    fn try_recv(&self) -> Option<Result<RawDelivery>> {
        let s = &self.shared;
        if s.cancel.is_cancelled() {
            return None;
        }
        let mut rx = s.rx.try_lock().ok()?;
        loop {
            if let Some(d) = s.deliver(rx.try_recv().ok()?) {
                return Some(Ok(d));
            }
        }
    }

    async fn close(&self) -> Result<()> {
        self.shared.shutdown().await;
        Ok(())
    }
}

impl Drop for SqsReceiver {
    fn drop(&mut self) {
        // What it held comes back after the visibility timeout (`close`
        // hands it back at once).
        self.shared.cancel.cancel();
    }
}

struct SqsAcker {
    shared: Arc<ReceiverShared>,
    receipt: String,
    /// Where this message is recorded as handed out, until it is settled.
    ticket: u64,
    _permit: OwnedSemaphorePermit,
}

impl fmt::Debug for SqsAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsAcker").finish_non_exhaustive()
    }
}

#[async_trait]
impl Acker for SqsAcker {
    /// Deleted through the receiver's batched deletes (`DeleteMessageBatch`,
    /// up to 10 per call); `Ok` once SQS confirmed this message's entry.
    async fn ack(&self) -> Result<()> {
        if self.shared.cancel.is_cancelled() {
            return Err(Error::Closed);
        }
        let (done, result) = oneshot::channel();
        self.shared
            .deletes
            .send(Delete {
                receipt: self.receipt.clone(),
                done,
            })
            .map_err(|_| Error::Closed)?;
        let deleted = result.await.unwrap_or_else(|_| {
            Err(Error::broker(
                "DeleteMessageBatch: the deleter stopped before answering",
                true,
                None,
            ))
        });
        if deleted.is_ok() {
            self.shared.outstanding.settle(self.ticket);
        }
        deleted
    }

    /// `ChangeMessageVisibility` to the delay (whole seconds, rounded up;
    /// 0 without one): SQS holds the message and counts the next receive.
    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        if self.shared.cancel.is_cancelled() {
            return Err(Error::Closed);
        }
        let secs = delay.map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
        let secs = i32::try_from(secs.min(43_200)).unwrap_or(43_200);
        self.shared
            .sqs
            .change_message_visibility()
            .queue_url(&self.shared.url)
            .receipt_handle(&self.receipt)
            .visibility_timeout(secs)
            .send()
            .await
            .map_err(|e| sdk_error("ChangeMessageVisibility", e))?;
        self.shared.outstanding.settle(self.ticket);
        Ok(())
    }

    /// `ChangeMessageVisibility` to the subscription's visibility timeout:
    /// SQS hides the message for that long from now. (It does not count a
    /// receive.)
    async fn extend(&self) -> Result<()> {
        if self.shared.cancel.is_cancelled() {
            return Err(Error::Closed);
        }
        self.shared
            .sqs
            .change_message_visibility()
            .queue_url(&self.shared.url)
            .receipt_handle(&self.receipt)
            .visibility_timeout(self.shared.visibility)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| sdk_error("ChangeMessageVisibility", e))
    }
}
