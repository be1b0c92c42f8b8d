//! Message headers and the reserved `sy-*` header names.

use std::{collections::BTreeMap, fmt};

/// Why the message was dead-lettered (set by switchyard).
pub const DEAD_LETTER_REASON: &str = "sy-dead-letter-reason";
/// The topic the dead-lettered message was consumed from.
pub const ORIGINAL_TOPIC: &str = "sy-original-topic";
/// The subscription that dead-lettered the message.
pub const ORIGINAL_SUBSCRIPTION: &str = "sy-original-subscription";
/// How many delivery attempts the message had when it was dead-lettered.
pub const ATTEMPTS: &str = "sy-attempts";
/// When the message was dead-lettered, RFC 3339.
pub const DEAD_LETTERED_AT: &str = "sy-dead-lettered-at";

/// The `sy-*` headers switchyard adds when it dead-letters a message.
pub const DEAD_LETTER_HEADERS: [&str; 5] = [
    DEAD_LETTER_REASON,
    ORIGINAL_TOPIC,
    ORIGINAL_SUBSCRIPTION,
    ATTEMPTS,
    DEAD_LETTERED_AT,
];

pub(crate) fn is_known_reserved(key: &str) -> bool {
    DEAD_LETTER_HEADERS.contains(&key)
}

/// Single-valued, case-sensitive message headers.
///
/// Keys are 1–128 printable ASCII characters other than space and `:`
/// (checked when the message is published); values are any UTF-8 and may be
/// empty. Iteration is in key order.
///
/// `Debug` prints keys only: header values may carry tokens.
///
/// # Examples
///
/// ```
/// use switchyard_core::Headers;
/// let mut headers = Headers::new();
/// headers.insert("tenant", "acme");
/// assert_eq!(headers.get("tenant"), Some("acme"));
/// assert_eq!(headers.len(), 1);
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    map: BTreeMap<String, String>,
}

impl Headers {
    /// No headers.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`, returning the previous value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Option<String> {
        self.map.insert(key.into(), value.into())
    }

    /// The value of `key`.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(String::as_str)
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.map.remove(key)
    }

    /// Whether `key` is set.
    #[must_use]
    pub fn contains_key(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Number of headers.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are no headers.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Iterates over `(key, value)` in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Iterates over the keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// Keeps only the headers for which `f` returns true.
    pub fn retain(&mut self, mut f: impl FnMut(&str, &str) -> bool) {
        self.map.retain(|k, v| f(k, v));
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.map.keys()).finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self {
            map: iter
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }
}

impl<K: Into<String>, V: Into<String>> Extend<(K, V)> for Headers {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        self.map
            .extend(iter.into_iter().map(|(k, v)| (k.into(), v.into())));
    }
}

impl IntoIterator for Headers {
    type Item = (String, String);
    type IntoIter = std::collections::btree_map::IntoIter<String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.map.into_iter()
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_values() {
        let h: Headers = [("token", "secret-value")].into_iter().collect();
        let dbg = format!("{h:?}");
        assert!(dbg.contains("token"));
        assert!(!dbg.contains("secret-value"));
    }
}
