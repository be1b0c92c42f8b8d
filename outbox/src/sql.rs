//! Table names and the hashing shared by the outbox, its relay and the inbox.

use std::sync::Arc;

use sqlx::{AssertSqlSafe, SqlSafeStr as _, SqlStr};

use crate::{Error, Result};

/// A statement built from a validated [`Table`] name and fixed text (no
/// value of the application's is ever formatted into SQL; values are bound).
pub(crate) fn audited(statement: String) -> SqlStr {
    AssertSqlSafe(Arc::<str>::from(statement)).into_sql_str()
}

/// A validated table name: `name` or `schema.name`, each part
/// `[A-Za-z_][A-Za-z0-9_]*`, 50 characters at most (so the derived index
/// and channel names stay under PostgreSQL's 63), in lower case. Every
/// process must spell it the same way: `public.outbox` and `outbox` are one
/// table to PostgreSQL but two sets of relay locks here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Table {
    /// As written in SQL.
    pub(crate) qualified: String,
    /// The part after the schema, for index names.
    pub(crate) bare: String,
}

impl Table {
    pub(crate) fn new(name: &str) -> Result<Self> {
        let ident = |s: &str| {
            let mut chars = s.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        let (schema, bare) = match name.split_once('.') {
            Some((schema, bare)) => (Some(schema), bare),
            None => (None, name),
        };
        if name.len() > 50 || !ident(bare) || schema.is_some_and(|s| !ident(s)) {
            return Err(Error::Config(format!(
                "table name {name:?} must be `name` or `schema.name`, each part a letter or `_` \
                 followed by letters, digits or `_`, 50 characters in all at most"
            )));
        }
        // PostgreSQL folds unquoted names to lower case; so do the lock
        // classes and channel derived from them, so `Orders` and `orders`
        // are one outbox.
        Ok(Self {
            qualified: name.to_ascii_lowercase(),
            bare: bare.to_ascii_lowercase(),
        })
    }

    /// An advisory-lock class (the first key of the two-key form) for
    /// `purpose` on this table: positive, so `pg_locks.classid` shows it as is.
    pub(crate) fn lock_class(&self, purpose: &str) -> i32 {
        let h = fnv1a(format!("{}/{purpose}", self.qualified).as_bytes());
        // Lossless: masked to 31 bits.
        i32::try_from(h & 0x7fff_ffff).unwrap_or(0)
    }
}

/// FNV-1a, 64 bits: stable across processes, versions and platforms (lanes
/// and lock keys are shared by every process writing the table).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        assert_eq!(
            Table::new("switchyard_outbox").unwrap().bare,
            "switchyard_outbox"
        );
        let t = Table::new("app.outbox_1").unwrap();
        assert_eq!(
            (t.qualified.as_str(), t.bare.as_str()),
            ("app.outbox_1", "outbox_1")
        );
        for bad in [
            "",
            "1x",
            "a-b",
            "a.b.c",
            "x; drop table y",
            "a.",
            ".a",
            &"x".repeat(51),
        ] {
            assert!(Table::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn fnv_is_the_published_function() {
        // FNV-1a 64 test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let t = Table::new("switchyard_outbox").unwrap();
        assert!(t.lock_class("lanes") > 0);
        assert_ne!(t.lock_class("lanes"), t.lock_class("members"));
    }
}
