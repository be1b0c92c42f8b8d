//! The portable naming rules, checked once for every backend.

use crate::error::{Error, NameKind, Result};

/// Longest portable topic or subscription name, in characters.
pub const MAX_NAME_LEN: usize = 200;

/// Longest header key, in characters.
pub const MAX_HEADER_KEY_LEN: usize = 128;

/// Prefix of header keys reserved for switchyard.
pub const RESERVED_HEADER_PREFIX: &str = "sy-";

/// Checks a topic or subscription name against the portable rule:
/// 1–200 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
///
/// Every backend accepts every name that passes (each maps it onto its
/// broker's narrower rules without collisions), so a migration never renames.
///
/// # Errors
///
/// [`Error::InvalidName`] saying which rule the name broke.
///
/// # Examples
///
/// ```
/// use switchyard_core::{NameKind, validate_name};
/// assert!(validate_name(NameKind::Topic, "orders.created").is_ok());
/// assert!(validate_name(NameKind::Topic, "orders created").is_err());
/// ```
pub fn validate_name(kind: NameKind, name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("must be at most 200 characters")
    } else if name == "." || name == ".." {
        Some("must not be `.` or `..`")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("may contain only ASCII letters, digits, `.`, `_` and `-`")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidName {
            kind,
            name: name.to_owned(),
            reason,
        }),
    }
}

/// Checks a header key: 1–128 printable ASCII characters other than space
/// and `:`. Reserved `sy-` keys are checked separately
/// ([`validate_user_header_key`]).
///
/// # Errors
///
/// [`Error::InvalidHeader`] saying which rule the key broke.
pub fn validate_header_key(key: &str) -> Result<()> {
    let reason = if key.is_empty() {
        Some("must not be empty")
    } else if key.len() > MAX_HEADER_KEY_LEN {
        Some("must be at most 128 characters")
    } else if !key.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        Some("may contain only printable ASCII characters other than space and `:`")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidHeader {
            key: key.to_owned(),
            reason,
        }),
    }
}

/// Checks a header key an application publishes: [`validate_header_key`],
/// and the `sy-` prefix only for the headers switchyard itself defines
/// (so dead letters can be forwarded or bridged, but nobody invents new
/// `sy-` keys that a later version might claim).
///
/// # Errors
///
/// [`Error::InvalidHeader`] saying which rule the key broke.
pub fn validate_user_header_key(key: &str) -> Result<()> {
    validate_header_key(key)?;
    if key.starts_with(RESERVED_HEADER_PREFIX) && !crate::headers::is_known_reserved(key) {
        return Err(Error::InvalidHeader {
            key: key.to_owned(),
            reason: "the `sy-` prefix is reserved for switchyard",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(name: &str) -> &'static str {
        match validate_name(NameKind::Topic, name) {
            Err(Error::InvalidName { reason, .. }) => reason,
            other => panic!("{name:?} should be invalid, got {other:?}"),
        }
    }

    #[test]
    fn portable_names() {
        for ok in ["a", "orders.created", "A-b_c.9", "...", &"x".repeat(200)] {
            validate_name(NameKind::Topic, ok).unwrap();
        }
        assert_eq!(reason(""), "must not be empty");
        assert_eq!(reason(&"x".repeat(201)), "must be at most 200 characters");
        assert_eq!(reason("."), "must not be `.` or `..`");
        assert_eq!(reason(".."), "must not be `.` or `..`");
        for bad in ["a b", "a*", "a>", "a/b", "é", "a:b"] {
            assert!(reason(bad).starts_with("may contain only"), "{bad}");
        }
    }

    #[test]
    fn header_keys() {
        validate_header_key("x-trace").unwrap();
        validate_header_key(&"k".repeat(128)).unwrap();
        assert!(validate_header_key("").is_err());
        assert!(validate_header_key(&"k".repeat(129)).is_err());
        assert!(validate_header_key("a b").is_err());
        assert!(validate_header_key("a:b").is_err());
        assert!(validate_header_key("é").is_err());
        assert!(validate_user_header_key("sy-made-up").is_err());
        validate_user_header_key("sy-dead-letter-reason").unwrap();
    }
}
