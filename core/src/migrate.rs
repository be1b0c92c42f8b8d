//! Moving a live system from one broker to another: dual writes and
//! de-duplication.
//!
//! A migration with nothing lost and nothing processed twice goes through
//! these phases (docs/MIGRATION.md, the migration playbook, describes each):
//!
//! 1. **Dual write**: publishers write through a [`Tee`], so every message is
//!    confirmed by the old *and* the new broker before `publish` returns.
//! 2. **Shadow consume / cutover**: consumers read both brokers for a while;
//!    wrapping their handler in [`Dedup`](crate::consumer::Dedup) (keyed by the message id, which
//!    switchyard keeps stable across brokers, bridges and redeliveries) makes
//!    each message processed once, whichever broker delivered it first.
//! 3. **Decommission**: publishers write to the new broker only; consumers
//!    drain the old one and stop reading it.
//!
//! The `switchyard bridge` command moves what is already queued on the old
//! broker (or a live stream) to the new one in the meantime.

use std::sync::Arc;

use async_trait::async_trait;

use crate::{
    Capabilities, Client, Message, SubscribeOptions,
    driver::{Broker, Publisher, Receiver, Subscriber},
    error::Result,
};

/// A broker that publishes every message to two brokers and reports
/// success only when **both** confirmed it: the dual-write phase of a
/// migration.
///
/// Subscriptions are ensured on both (so the new broker keeps messages for
/// them from the start); receiving reads the primary. Capabilities are the
/// primary's, with the smaller of the two payload limits. When one side
/// fails, `publish` returns that side's error (the primary's when both
/// fail); retrying the publish then re-sends to both, which duplicates the
/// message on the side that had confirmed it — harmless, since consumers
/// de-duplicate by id ([`Dedup`](crate::consumer::Dedup)).
///
/// # Examples
///
/// ```
/// use switchyard_core::{Client, Message, migrate::Tee};
///
/// async fn dual_write(old: Client, new: Client) -> switchyard_core::Result<()> {
///     let both = Client::new(Tee::new(old, new));
///     both.publish("orders.created", Message::new("order 1")).await // confirmed by both
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Tee {
    primary: Arc<dyn Broker>,
    secondary: Arc<dyn Broker>,
}

impl Tee {
    /// Publishes to `primary` and `secondary`, receives from `primary`.
    #[must_use]
    pub fn new(primary: Client, secondary: Client) -> Self {
        Self {
            primary: Arc::clone(primary.broker()),
            secondary: Arc::clone(secondary.broker()),
        }
    }
}

#[async_trait]
impl Publisher for Tee {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        let (a, b) = futures_util::future::join(
            self.primary.publish(topic, message.clone()),
            self.secondary.publish(topic, message),
        )
        .await;
        a.and(b)
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<()>> {
        let (a, b) = futures_util::future::join(
            self.primary.publish_batch(topic, messages.clone()),
            self.secondary.publish_batch(topic, messages),
        )
        .await;
        a.into_iter().zip(b).map(|(a, b)| a.and(b)).collect()
    }

    async fn close(&self) -> Result<()> {
        let (a, b) = futures_util::future::join(
            Publisher::close(&*self.primary),
            Publisher::close(&*self.secondary),
        )
        .await;
        a.and(b)
    }
}

#[async_trait]
impl Subscriber for Tee {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.primary.ensure_topic(topic).await?;
        self.secondary.ensure_topic(topic).await
    }

    async fn ensure_subscription(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.primary.ensure_subscription(topic, options).await?;
        self.secondary.ensure_subscription(topic, options).await
    }

    async fn receiver(&self, topic: &str, options: &SubscribeOptions) -> Result<Box<dyn Receiver>> {
        self.primary.receiver(topic, options).await
    }

    async fn close(&self) -> Result<()> {
        let (a, b) = futures_util::future::join(
            Subscriber::close(&*self.primary),
            Subscriber::close(&*self.secondary),
        )
        .await;
        a.and(b)
    }
}

impl Broker for Tee {
    fn capabilities(&self) -> Capabilities {
        let mut caps = self.primary.capabilities();
        caps.max_payload = caps
            .max_payload
            .min(self.secondary.capabilities().max_payload);
        caps
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A broker that records the ids published to it (or refuses every
    /// publish) and delivers nothing.
    #[derive(Debug, Default)]
    struct Sink {
        ids: Mutex<Vec<String>>,
        refuse: bool,
        max_payload: usize,
    }

    #[async_trait]
    impl Publisher for Sink {
        async fn publish(&self, _: &str, message: Message) -> Result<()> {
            if self.refuse {
                return Err(crate::Error::broker("refused", true, None));
            }
            self.ids.lock().unwrap().push(message.id().to_owned());
            Ok(())
        }
        async fn close(&self) -> Result<()> {
            Ok(())
        }
    }

    #[async_trait]
    impl Subscriber for Sink {
        async fn ensure_topic(&self, _: &str) -> Result<()> {
            Ok(())
        }
        async fn ensure_subscription(&self, _: &str, _: &SubscribeOptions) -> Result<()> {
            Ok(())
        }
        async fn receiver(&self, _: &str, _: &SubscribeOptions) -> Result<Box<dyn Receiver>> {
            Err(crate::Error::Closed)
        }
        async fn close(&self) -> Result<()> {
            Ok(())
        }
    }

    impl Broker for Sink {
        fn capabilities(&self) -> Capabilities {
            Capabilities::new(self.max_payload)
        }
    }

    fn sink(refuse: bool, max_payload: usize) -> Arc<Sink> {
        Arc::new(Sink {
            refuse,
            max_payload,
            ..Sink::default()
        })
    }

    #[tokio::test]
    async fn tee_confirms_on_both_sides() {
        let (old, new) = (sink(false, 2048), sink(false, 1024));
        let client = Client::new(Tee::new(
            Client::from_arc(old.clone()),
            Client::from_arc(new.clone()),
        ));
        client
            .publish("t", Message::new("x").with_id("one"))
            .await
            .unwrap();
        let batch = vec![
            Message::new("a").with_id("a"),
            Message::new("b").with_id("b"),
        ];
        let results = client.publish_batch("t", batch).await;
        assert!(results.iter().all(Result::is_ok));
        for side in [&old, &new] {
            assert_eq!(*side.ids.lock().unwrap(), ["one", "a", "b"]);
        }
        // The smaller limit of the two, checked before anything is sent.
        assert_eq!(client.capabilities().max_payload, 1024);
        let big = client.publish("t", Message::new(vec![0_u8; 1500])).await;
        assert!(
            matches!(big, Err(crate::Error::PayloadTooLarge { .. })),
            "{big:?}"
        );

        // One side refusing fails the publish, whichever side it is.
        for (a, b) in [(true, false), (false, true)] {
            let client = Client::new(Tee::new(
                Client::from_arc(sink(a, 1024)),
                Client::from_arc(sink(b, 1024)),
            ));
            assert!(client.publish("t", Message::new("x")).await.is_err());
            let results = client.publish_batch("t", vec![Message::new("y")]).await;
            assert!(results[0].is_err());
        }
    }
}
