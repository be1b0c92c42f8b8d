//! Mapping portable names onto JetStream's rules.
//!
//! Stream and consumer names may not contain `.`, `*`, `>`, whitespace or
//! path separators, and a subject token may not be empty, so a portable name
//! (`[A-Za-z0-9._-]{1,200}`) is escaped into one token: `_` → `__`,
//! `.` → `_d`. The escape is injective (decoding reads `_` plus one
//! character), so distinct names never collide. Escaped names longer than
//! [`MAX_TOKEN`] keep a readable prefix and end in a SHA-256 digest of the
//! full name, keeping file names on the server short.

use switchyard_core::driver::support::{digest_hex, escape_token, escaped_prefix};

/// Longest escaped token kept verbatim.
pub(crate) const MAX_TOKEN: usize = 120;

/// Escapes a portable name into a single JetStream-safe token.
pub(crate) fn token(name: &str) -> String {
    let out = escape_token(name);
    if out.len() <= MAX_TOKEN {
        return out;
    }
    // `_h` cannot appear in an escaped name (`_` is always followed by `_`
    // or `d`), so hashed tokens never equal verbatim ones.
    format!("{}_h{}", escaped_prefix(&out, 80), digest_hex(name, 16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_single_jetstream_tokens() {
        for name in ["a.b", "a_b", "a-b", "...", "_", ".", "_d", "a-b.c_d"] {
            let t = token(name);
            assert!(!t.contains('.') && !t.is_empty(), "{t}");
        }
        assert_eq!(token("orders.created"), "orders_dcreated");
    }

    #[test]
    fn long_names_are_hashed_deterministically() {
        let a = "x".repeat(200);
        let b = format!("{}y", "x".repeat(199));
        let dots = ".".repeat(200);
        assert!(token(&a).len() <= MAX_TOKEN);
        assert_eq!(token(&a), token(&a));
        assert_ne!(token(&a), token(&b));
        assert!(token(&dots).len() <= MAX_TOKEN);
        assert!(token(&dots).contains("_h"));
    }
}
