//! Per-partition offset tracking: Kafka keeps one committed offset per
//! partition, switchyard settles records one by one.
//!
//! - The committed offset is always the lowest fetched record not yet
//!   settled (or one past the last fetched record), so a commit never skips
//!   an unsettled record.
//! - Records settled *above* it travel in the commit's metadata string
//!   (as ranges relative to the committed offset, within Kafka's default
//!   4 KiB `offset.metadata.max.bytes`), so the next owner of the partition
//!   skips them: an ack stays final across restarts and rebalances. (The
//!   technique Confluent's parallel-consumer uses.)
//! - The metadata also carries delivery counts, so attempts survive a crash:
//!   `n`, how many times the record at the committed offset was handed out,
//!   and `h`, the highest offset ever handed out. A new owner reports the
//!   head record as redelivered `n` times, the other records up to `h` as
//!   redelivered once (a lower bound), and later records as new. Before the
//!   head is handed out, the raised count is committed synchronously, so a
//!   record that kills its consumer is still dead-lettered after
//!   `max_attempts`.
//!
//! Metadata another client wrote is ignored.

use std::collections::BTreeMap;

/// Leaves room under Kafka's default `offset.metadata.max.bytes` (4096).
const MAX_METADATA: usize = 4000;
const TAG: &str = "sy1";

/// What a commit's metadata says about its partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Times the record at the committed offset was handed out.
    pub(crate) n: u32,
    /// Highest offset handed out (-1: none).
    pub(crate) high: i64,
    /// Offsets above the committed one that are settled, as inclusive
    /// absolute ranges in ascending order.
    pub(crate) acked: Vec<(i64, i64)>,
}

impl Meta {
    /// Reads metadata committed with `offset` (anything unknown: nothing
    /// known).
    pub(crate) fn decode(offset: i64, text: &str) -> Self {
        let empty = Self {
            n: 0,
            high: -1,
            acked: Vec::new(),
        };
        let mut parts = text.split(';');
        if parts.next() != Some(TAG) {
            return empty;
        }
        let (Some(n), Some(high), ranges) = (
            parts.next().and_then(|s| s.parse::<u32>().ok()),
            parts.next().and_then(|s| s.parse::<i64>().ok()),
            parts.next().unwrap_or(""),
        ) else {
            return empty;
        };
        let mut acked = Vec::new();
        for r in ranges.split(',').filter(|r| !r.is_empty()) {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            match (a.parse::<i64>(), b.parse::<i64>()) {
                (Ok(a), Ok(b)) if a > 0 && b >= a => acked.push((offset + a, offset + b)),
                _ => return empty,
            }
        }
        Self { n, high, acked }
    }

    /// Writes the metadata to commit with `offset`, dropping the highest
    /// acked ranges when it would not fit (those records are then delivered
    /// again: at-least-once).
    pub(crate) fn encode(&self, offset: i64) -> String {
        let mut out = format!("{TAG};{};{};", self.n, self.high);
        let mut first = true;
        for &(a, b) in &self.acked {
            let piece = if a == b {
                format!("{}", a - offset)
            } else {
                format!("{}-{}", a - offset, b - offset)
            };
            if out.len() + piece.len() + 1 > MAX_METADATA {
                break;
            }
            if !first {
                out.push(',');
            }
            out.push_str(&piece);
            first = false;
        }
        out
    }

    fn is_acked(&self, offset: i64) -> bool {
        self.acked.iter().any(|&(a, b)| a <= offset && offset <= b)
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    settled: bool,
    /// Redeliveries it was handed out with, once handed out.
    handed: Option<u32>,
}

/// One partition of one assignment.
#[derive(Debug)]
pub(crate) struct Track {
    /// The committed offset when the partition was assigned.
    start: Option<i64>,
    prior: Meta,
    /// Fetched records from the lowest unsettled one up.
    pending: BTreeMap<i64, Slot>,
    /// One past the highest fetched offset.
    next: Option<i64>,
    /// Highest offset handed out in this assignment.
    high: i64,
    /// Something changed since the last commit.
    pub(crate) dirty: bool,
}

impl Track {
    /// A partition whose group has committed `committed` with `metadata`
    /// (or nothing).
    pub(crate) fn new(committed: Option<i64>, metadata: &str) -> Self {
        let prior = committed.map_or(
            Meta {
                n: 0,
                high: -1,
                acked: Vec::new(),
            },
            |c| Meta::decode(c, metadata),
        );
        Self {
            start: committed,
            prior,
            pending: BTreeMap::new(),
            next: committed,
            high: -1,
            dirty: false,
        }
    }

    /// Registers a fetched record. `None`: skip it (settled before, or
    /// already tracked); `Some(r)`: it was handed out `r` times before.
    pub(crate) fn fetched(&mut self, offset: i64) -> Option<u32> {
        if self.pending.contains_key(&offset) || self.watermark().is_some_and(|w| offset < w) {
            return None;
        }
        self.next = Some(self.next.map_or(offset + 1, |n| n.max(offset + 1)));
        if self.prior.is_acked(offset) {
            // Settled in an earlier assignment: settle it again, silently.
            self.pending.insert(
                offset,
                Slot {
                    settled: true,
                    handed: None,
                },
            );
            self.pop_settled();
            return None;
        }
        self.pending.insert(
            offset,
            Slot {
                settled: false,
                handed: None,
            },
        );
        Some(self.prior_redeliveries(offset))
    }

    fn prior_redeliveries(&self, offset: i64) -> u32 {
        if Some(offset) == self.start {
            self.prior.n
        } else if offset <= self.prior.high {
            1
        } else {
            0
        }
    }

    /// Marks a fetched record as handed out with `redeliveries`; `true`
    /// when it is the head of the assignment, whose raised count must be
    /// committed before it is handed out.
    pub(crate) fn handed(&mut self, offset: i64, redeliveries: u32) -> bool {
        if let Some(slot) = self.pending.get_mut(&offset) {
            slot.handed = Some(redeliveries);
            self.high = self.high.max(offset);
        }
        let head = Some(offset) == self.start && self.watermark() == Some(offset);
        if head {
            self.dirty = true;
        }
        head
    }

    /// Settles a fetched record.
    pub(crate) fn settle(&mut self, offset: i64) {
        if let Some(slot) = self.pending.get_mut(&offset)
            && !slot.settled
        {
            slot.settled = true;
            self.dirty = true;
            self.pop_settled();
        }
    }

    fn pop_settled(&mut self) {
        while let Some(entry) = self.pending.first_entry() {
            if !entry.get().settled {
                break;
            }
            entry.remove();
        }
    }

    /// The offset to commit: the lowest unsettled fetched record, else one
    /// past the last fetched one.
    pub(crate) fn watermark(&self) -> Option<i64> {
        self.pending.keys().next().copied().or(self.next)
    }

    /// The offset and metadata to commit; `None` before anything is known.
    pub(crate) fn commit_point(&self) -> Option<(i64, String)> {
        let w = self.watermark()?;
        let n = match self.pending.get(&w).and_then(|s| s.handed) {
            Some(r) => r + 1,
            None => self.prior_redeliveries(w),
        };
        let mut acked: Vec<(i64, i64)> = Vec::new();
        let mut push = |o: i64| match acked.last_mut() {
            Some((_, b)) if *b + 1 == o => *b = o,
            _ => acked.push((o, o)),
        };
        for (&o, slot) in &self.pending {
            if slot.settled && o > w {
                push(o);
            }
        }
        let next = self.next.unwrap_or(w);
        for &(a, b) in &self.prior.acked {
            for o in a.max(next)..=b {
                push(o);
            }
        }
        let meta = Meta {
            n,
            high: self.prior.high.max(self.high),
            acked,
        };
        Some((w, meta.encode(w)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_and_ignores_foreign_text() {
        let m = Meta {
            n: 3,
            high: 17,
            acked: vec![(11, 11), (13, 15)],
        };
        let text = m.encode(10);
        assert_eq!(text, "sy1;3;17;1,3-5");
        assert_eq!(Meta::decode(10, &text), m);
        for foreign in ["", "hello", "sy1;x;1;", "sy1;1;2;0", "sy1;1;2;5-3"] {
            assert_eq!(Meta::decode(10, foreign), Meta::decode(0, ""), "{foreign}");
        }
    }

    #[test]
    fn metadata_stays_within_the_broker_limit() {
        let m = Meta {
            n: 1,
            high: 1_000_000,
            acked: (0..5000).map(|i| (10 + 2 * i, 10 + 2 * i)).collect(),
        };
        assert!(m.encode(0).len() <= MAX_METADATA);
    }

    #[test]
    fn commits_stop_below_the_lowest_unsettled_record() {
        let mut t = Track::new(Some(0), "");
        for o in 0..5 {
            assert_eq!(t.fetched(o), Some(0));
            t.handed(o, 0);
        }
        t.settle(1);
        t.settle(2);
        let (w, meta) = t.commit_point().unwrap();
        assert_eq!(w, 0, "offset 0 is unsettled");
        assert_eq!(Meta::decode(w, &meta).acked, vec![(1, 2)]);
        t.settle(0);
        assert_eq!(t.commit_point().unwrap().0, 3);
        t.settle(4);
        t.settle(3);
        let (w, meta) = t.commit_point().unwrap();
        assert_eq!(w, 5);
        assert!(Meta::decode(w, &meta).acked.is_empty());
    }

    #[test]
    fn a_new_owner_skips_acked_records_and_counts_redeliveries() {
        // First owner: hands out 0..4, acks 2, crashes with 0, 1, 3 unsettled.
        let mut a = Track::new(Some(0), "");
        for o in 0..4 {
            let r = a.fetched(o).unwrap();
            a.handed(o, r);
        }
        a.settle(2);
        let (w, meta) = a.commit_point().unwrap();
        assert_eq!(w, 0);
        // Second owner.
        let mut b = Track::new(Some(w), &meta);
        assert_eq!(b.fetched(0), Some(1), "the head was handed out once");
        assert_eq!(b.fetched(1), Some(1));
        assert_eq!(b.fetched(2), None, "acked before");
        assert_eq!(b.fetched(3), Some(1));
        assert_eq!(b.fetched(4), Some(0), "never handed out");
        assert!(b.handed(0, 1), "the head's count is committed first");
        let (w, meta) = b.commit_point().unwrap();
        assert_eq!((w, Meta::decode(w, &meta).n), (0, 2));
    }

    #[test]
    fn a_crash_loop_raises_the_head_count_every_time() {
        let mut committed = (0, String::new());
        for expected in 0..4 {
            let mut t = Track::new(Some(committed.0), &committed.1);
            let r = t.fetched(0).unwrap();
            assert_eq!(r, expected);
            assert!(t.handed(0, r));
            committed = t.commit_point().unwrap();
        }
    }

    #[test]
    fn acked_ranges_not_yet_fetched_are_kept() {
        let mut a = Track::new(Some(0), "");
        for o in 0..6 {
            let r = a.fetched(o).unwrap();
            a.handed(o, r);
        }
        for o in [2, 3, 5] {
            a.settle(o);
        }
        let (w, meta) = a.commit_point().unwrap();
        let mut b = Track::new(Some(w), &meta);
        // b commits before fetching anything beyond 1.
        b.fetched(0);
        b.fetched(1);
        b.handed(0, 1);
        b.settle(0);
        let (w, meta) = b.commit_point().unwrap();
        assert_eq!(w, 1);
        assert_eq!(Meta::decode(w, &meta).acked, vec![(2, 3), (5, 5)]);
    }

    #[test]
    fn an_empty_partition_commits_nothing_new() {
        let t = Track::new(None, "");
        assert_eq!(t.commit_point(), None);
        let t = Track::new(Some(7), "sy1;0;-1;");
        assert_eq!(t.commit_point().unwrap().0, 7);
        assert!(!t.dirty);
    }
}
