//! What every backend needs besides the traits: the wire names switchyard
//! writes on every broker, and the pieces of mapping portable names onto a
//! broker's narrower rules.
//!
//! Portable names are 1–200 characters of `[A-Za-z0-9._-]`. A broker that
//! takes fewer characters (no `.` in a NATS stream name, only `[A-Za-z0-9_-]`
//! in an SQS queue name) gets [`escape_token`]: `_` → `__`, `.` → `_d`, which
//! is injective, so distinct names never collide. A name still too long
//! keeps a readable prefix ([`escaped_prefix`] or a plain cut) and ends in a
//! digest of the full name ([`digest_hex`]), behind a marker the verbatim
//! form cannot contain.
//!
//! ```
//! use switchyard_core::driver::support::{digest_hex, escape_token, escaped_prefix};
//!
//! let escaped = escape_token("orders.created_v2");
//! assert_eq!(escaped, "orders_dcreated__v2");
//! // Never half an escape: the `_` of `_d` goes with it.
//! assert_eq!(escaped_prefix(&escaped, 7), "orders");
//! // A shortened name: a readable prefix, a marker, a digest of the full name.
//! let short = format!("{}_h{}", escaped_prefix(&escaped, 7), digest_hex("orders.created_v2", 8));
//! assert_eq!(short.len(), 6 + 2 + 16);
//! ```

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::Error;

/// The header (or attribute) carrying a message's id where the broker has
/// no id field of its own, or one too small.
pub const ID_HEADER: &str = "sy-id";

/// The header carrying a message's key where the broker has no key field.
pub const KEY_HEADER: &str = "sy-key";

/// Escapes a portable name into one token of `[A-Za-z0-9_-]` (a portable
/// name without `.`): `_` → `__`, `.` → `_d`. Injective: decoding reads
/// each `_` with the character after it. `_` followed by any other letter
/// never occurs in an escaped name, so backends use `_h`, `_s`, … as
/// markers.
#[must_use]
pub fn escape_token(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        match c {
            '_' => out.push_str("__"),
            '.' => out.push_str("_d"),
            c => out.push(c),
        }
    }
    out
}

/// The longest prefix of `escaped` (an [`escape_token`] result) of at most
/// `max` bytes that does not end inside an escape: a readable start for a
/// shortened name.
#[must_use]
pub fn escaped_prefix(escaped: &str, max: usize) -> &str {
    let mut cut = max.min(escaped.len());
    while !escaped.is_char_boundary(cut) {
        cut -= 1;
    }
    let prefix = &escaped[..cut];
    // Escapes are `_` plus one character: an odd run of trailing `_` ends
    // with the first half of one.
    let underscores = prefix.bytes().rev().take_while(|b| *b == b'_').count();
    if underscores % 2 == 1 {
        &prefix[..prefix.len() - 1]
    } else {
        prefix
    }
}

/// The first `bytes` bytes of the SHA-256 digest of `text`, in lower-case
/// hex (`2 × bytes` characters; `bytes` is at most 32).
#[must_use]
pub fn digest_hex(text: &str, bytes: usize) -> String {
    use std::fmt::Write as _;
    Sha256::digest(text.as_bytes())[..bytes.min(32)]
        .iter()
        .fold(String::with_capacity(bytes * 2), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

/// The error for a bad backend URL: [`Error::InvalidUrl`] with the URL's
/// password replaced ([`redact_url`](crate::redact_url)) and `reason`.
///
/// ```
/// use switchyard_core::driver::support::invalid_url;
/// let e = invalid_url("nats://app:hunter2@h:4222")("no server address".into());
/// assert!(e.to_string().contains("no server address"));
/// assert!(!e.to_string().contains("hunter2"));
/// ```
pub fn invalid_url(url: &str) -> impl Fn(String) -> Error + '_ {
    move |reason| Error::InvalidUrl {
        url: crate::redact_url(url),
        reason,
    }
}

/// Reads the URL parameter `key=value` as a duration (`5s`, `500ms`,
/// `2m`); the error names the key and the value.
///
/// # Errors
///
/// The reason, for [`invalid_url`], when `value` is not a duration.
pub fn duration_param(key: &str, value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| {
        format!("{key} must be a duration such as 5s, 500ms or 2m, got {value:?} ({e})")
    })
}

/// Reads the URL parameter `key=value` as a positive integer; the error
/// names the key and the value.
///
/// # Errors
///
/// The reason, for [`invalid_url`], when `value` is not an integer above
/// zero.
pub fn positive_param(key: &str, value: &str) -> Result<usize, String> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{key} must be a positive integer, got {value:?}"))
}

/// A message with every part a codec finds awkward, for backend authors'
/// round-trip tests: a binary payload, an id with a space and non-ASCII, a
/// key with padding, headers that are empty, padded, multi-line, non-ASCII
/// and differ only by case — plus `lookalikes`, headers named like the
/// broker's own (which a codec must carry as the user's, not obey).
///
/// ```
/// use switchyard_core::driver::support::awkward_message;
///
/// let m = awkward_message(&[("x-death", "user's")]);
/// assert_eq!(m.headers().get("x-death"), Some("user's"));
/// assert_eq!(m.headers().get("Case"), Some("A"));
/// assert_eq!(m.headers().get("case"), Some("a"));
/// ```
#[must_use]
pub fn awkward_message(lookalikes: &[(&str, &str)]) -> crate::Message {
    let mut m = crate::Message::new(vec![0u8, 255])
        .with_id("id with space/ü")
        .with_key(" padded ")
        .with_header("plain", "value")
        .with_header("empty", "")
        .with_header("spaces", "  x  ")
        .with_header("newline", "a\nb\r\nc")
        .with_header("uni", "ünï ✓")
        .with_header("Case", "A")
        .with_header("case", "a");
    for (name, value) in lookalikes {
        m = m.with_header(*name, *value);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn escaping_is_injective() {
        let names = [
            "a.b", "a_b", "a-b", "a__b", "a_d", "a.d", "a_.b", "a._b", "...", "_", ".", "__", "_d",
        ];
        let tokens: HashSet<String> = names.iter().map(|n| escape_token(n)).collect();
        assert_eq!(tokens.len(), names.len());
        assert!(tokens.iter().all(|t| !t.contains('.')));
    }

    #[test]
    fn prefixes_never_end_inside_an_escape() {
        assert_eq!(escaped_prefix("ab__c", 3), "ab");
        assert_eq!(escaped_prefix("ab__c", 4), "ab__");
        assert_eq!(escaped_prefix("ab_dc", 3), "ab");
        assert_eq!(escaped_prefix("abc", 10), "abc");
    }

    #[test]
    fn url_parameters_say_what_is_wrong() {
        assert_eq!(
            duration_param("wait", "250ms"),
            Ok(Duration::from_millis(250))
        );
        let e = duration_param("connect_timeout", "soon").unwrap_err();
        assert!(
            e.contains("connect_timeout must be a duration") && e.contains("\"soon\""),
            "{e}"
        );
        assert!(duration_param("t", "1e400s").is_err());
        assert_eq!(positive_param("pollers", "4"), Ok(4));
        for bad in ["0", "-1", "x", ""] {
            let e = positive_param("pollers", bad).unwrap_err();
            assert!(e.contains("pollers must be a positive integer"), "{e}");
        }
    }

    #[test]
    fn digests_are_hex_of_the_asked_length() {
        let d = digest_hex("orders", 16);
        assert_eq!(d.len(), 32);
        assert!(
            d.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(d, digest_hex("orders2", 16));
        assert_eq!(digest_hex("x", 99).len(), 64);
    }
}
