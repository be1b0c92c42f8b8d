//! Generic conveniences for anything that publishes, also through `dyn`.

use async_trait::async_trait;
use bytes::Bytes;

use crate::{Message, driver::Publisher, error::Result};

/// Conveniences over [`Publisher`], implemented for every publisher
/// (including `dyn Publisher` and [`Client`](crate::Client)).
///
/// # Examples
///
/// ```
/// use switchyard_core::{Client, PublisherExt};
///
/// async fn send(client: &Client) -> switchyard_core::Result<String> {
///     client.publish_payload("audit", "user logged in").await
/// }
/// ```
#[async_trait]
pub trait PublisherExt: Publisher {
    /// Publishes a payload as a new message; returns the generated id.
    ///
    /// # Errors
    ///
    /// As for [`Publisher::publish`].
    async fn publish_payload(
        &self,
        topic: &str,
        payload: impl Into<Bytes> + Send,
    ) -> Result<String> {
        let message = Message::new(payload);
        let id = message.id().to_owned();
        self.publish(topic, message).await?;
        Ok(id)
    }

    /// Publishes all messages with pipelined confirmations and fails on the
    /// first error (in input order). Use
    /// [`Publisher::publish_batch`] for per-message results.
    ///
    /// # Errors
    ///
    /// The first per-message error.
    async fn publish_all(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.publish_batch(topic, messages)
            .await
            .into_iter()
            .collect()
    }

    /// Publishes `value` as JSON (`content-type: application/json`); returns the id.
    ///
    /// # Errors
    ///
    /// [`Error::Codec`](crate::Error::Codec) if `value` cannot be serialised;
    /// otherwise as for [`Publisher::publish`].
    #[cfg(feature = "json")]
    async fn publish_json<T: serde::Serialize + Sync + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<String> {
        let message = Message::json(value)?;
        let id = message.id().to_owned();
        self.publish(topic, message).await?;
        Ok(id)
    }
}

impl<P: Publisher + ?Sized> PublisherExt for P {}
