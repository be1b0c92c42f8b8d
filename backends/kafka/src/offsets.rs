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
//! - Delivery counts survive a crash through a [`Journal`] per partition,
//!   written (and confirmed) *before* the records it covers are handed out,
//!   so it never depends on a commit that a crash can lose, nor on commit
//!   metadata (which some Kafka-compatible brokers drop):
//!   - `high`, a reservation: no record above it was handed out. The
//!     receiver raises it a reservation (`reserve` records) at a time.
//!   - `head` and `n`: the last *suspect* handed out and how many times.
//! - A new owner treats the records from the committed offset up to `high`
//!   as suspects: each may have been handed out (and may have killed its
//!   consumer). It hands them out one at a time, each after recording it
//!   as the journal's head with its raised count (the head's `n` + 1, any
//!   other suspect's 1 + 1), so a record that crashes its consumer every
//!   time counts one attempt per crash and is dead-lettered after
//!   `max_attempts`, whichever record was committed. A clean close or
//!   revoke lowers `high` back to what was handed out, so a restart costs
//!   nothing; a crash costs at most one attempt to the records of its
//!   reservation.
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

/// The durable delivery counts of one partition (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Journal {
    /// The last suspect handed out (-1: none).
    pub(crate) head: i64,
    /// Times `head` was handed out.
    pub(crate) n: u32,
    /// No record above it was handed out (-1: none was).
    pub(crate) high: i64,
}

impl Default for Journal {
    fn default() -> Self {
        Self {
            head: -1,
            n: 0,
            high: -1,
        }
    }
}

impl Journal {
    /// Counts kept per head (a higher count is kept as this one: well past
    /// any sensible `max_attempts`).
    const MAX_N: u32 = 255;

    /// `head` and `n` as one committed offset.
    pub(crate) fn pack_head(head: i64, n: u32) -> i64 {
        head.saturating_mul(256)
            .saturating_add(i64::from(n.min(Self::MAX_N)))
    }

    /// The inverse of [`pack_head`](Self::pack_head).
    pub(crate) fn unpack_head(v: i64) -> (i64, u32) {
        let n = u32::try_from(v.rem_euclid(256)).unwrap_or(0);
        (v.div_euclid(256), n)
    }
}

/// A write to the journal that must be confirmed before a record is handed
/// out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    /// The suspect at `offset` is handed out for the `n`-th time.
    Head { offset: i64, n: u32 },
    /// Raise the reservation to this offset.
    High(i64),
}

/// Whether a fetched record may be handed out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Yes.
    Go,
    /// Not yet: a suspect of its partition is out, or it is a suspect and
    /// other records of its partition are out.
    Wait,
    /// After this journal write is confirmed.
    Record(Write),
    /// Yes, and start this journal write (the next reservation, ahead of
    /// need) without waiting for it.
    Ahead(Write),
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
    /// The journal as the previous owner left it.
    journal: Journal,
    /// The reservation confirmed in the journal.
    reserved: i64,
    /// A reservation is being written.
    reserving: bool,
    /// Records a reservation covers.
    reserve: i64,
    /// The journal's head as this owner last wrote it.
    recorded: Option<(i64, u32)>,
    /// Records handed out and not settled.
    out: usize,
    /// The suspect handed out and not settled, if any.
    suspect_out: Option<i64>,
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
    /// (or nothing), and whose journal reads `journal`; reservations cover
    /// `reserve` records.
    pub(crate) fn new(
        committed: Option<i64>,
        metadata: &str,
        journal: Journal,
        reserve: usize,
    ) -> Self {
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
            journal,
            reserved: journal.high,
            reserving: false,
            reserve: i64::try_from(reserve.max(1)).unwrap_or(i64::MAX),
            recorded: None,
            out: 0,
            suspect_out: None,
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

    /// How many times the previous owners handed a record out, as far as
    /// the journal tells (at least once for any suspect).
    fn prior_redeliveries(&self, offset: i64) -> u32 {
        if offset == self.journal.head {
            self.journal.n.max(1)
        } else if offset <= self.journal.high && self.start.is_none_or(|s| offset >= s) {
            1
        } else {
            0
        }
    }

    /// Whether the fetched record at `offset`, redelivered `redeliveries`
    /// times before, may be handed out now.
    pub(crate) fn gate(&self, offset: i64, redeliveries: u32) -> Gate {
        if self.suspect_out.is_some() {
            return Gate::Wait;
        }
        if redeliveries > 0 {
            if self.out > 0 {
                return Gate::Wait;
            }
            let n = redeliveries.saturating_add(1);
            if self.recorded != Some((offset, n)) {
                return Gate::Record(Write::Head { offset, n });
            }
            return Gate::Go;
        }
        if offset > self.reserved {
            if self.reserving {
                return Gate::Wait;
            }
            return Gate::Record(Write::High(offset.saturating_add(self.reserve)));
        }
        // Always one reservation on its way while the last quarter of the
        // current one goes out.
        if !self.reserving && offset.saturating_add(self.reserve * 3 / 4) > self.reserved {
            return Gate::Ahead(Write::High(self.reserved.saturating_add(self.reserve)));
        }
        Gate::Go
    }

    /// The reservation to write when the partition is assigned, before
    /// anything is fetched (so the first records need not wait for it);
    /// `None` when the start is unknown or the journal covers it already.
    pub(crate) fn first_reservation(&self) -> Option<i64> {
        let high = self
            .start?
            .saturating_add(self.reserve - 1)
            .max(self.journal.high);
        (high > self.reserved).then_some(high)
    }

    /// A journal write is on its way (see [`Gate::Ahead`]).
    pub(crate) fn recording(&mut self, write: Write) {
        if matches!(write, Write::High(_)) {
            self.reserving = true;
        }
    }

    /// A journal write ended: confirmed (`true`) or failed.
    pub(crate) fn recorded(&mut self, write: Write, confirmed: bool) {
        match write {
            Write::Head { offset, n } if confirmed => self.recorded = Some((offset, n)),
            Write::Head { .. } => {}
            Write::High(h) => {
                self.reserving = false;
                if confirmed {
                    self.reserved = self.reserved.max(h);
                }
            }
        }
    }

    /// The reservation to leave in the journal when this owner stops
    /// cleanly (nothing it holds is out): what it handed out, and the
    /// suspects it did not get to; `None` when that is what the journal
    /// says already.
    pub(crate) fn release(&self) -> Option<i64> {
        let keep = self.high.max(self.journal.high);
        (keep < self.reserved).then_some(keep)
    }

    /// Marks a fetched record as handed out with `redeliveries` (after
    /// [`gate`](Self::gate) let it go).
    pub(crate) fn handed(&mut self, offset: i64, redeliveries: u32) {
        if let Some(slot) = self.pending.get_mut(&offset)
            && slot.handed.is_none()
        {
            slot.handed = Some(redeliveries);
            self.high = self.high.max(offset);
            self.out += 1;
            if redeliveries > 0 {
                self.suspect_out = Some(offset);
            }
        }
    }

    /// Settles a fetched record.
    pub(crate) fn settle(&mut self, offset: i64) {
        if let Some(slot) = self.pending.get_mut(&offset)
            && !slot.settled
        {
            slot.settled = true;
            if slot.handed.is_some() {
                self.out = self.out.saturating_sub(1);
            }
            if self.suspect_out == Some(offset) {
                self.suspect_out = None;
            }
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

    /// A partition with no history, reservations of `reserve`.
    fn fresh(reserve: usize) -> Track {
        Track::new(Some(0), "", Journal::default(), reserve)
    }

    /// Hands out `offset` as the receiver does: confirms the journal write
    /// the gate asks for (into `journal`) first.
    fn hand(t: &mut Track, journal: &mut Journal, offset: i64, r: u32) {
        loop {
            let (w, go) = match t.gate(offset, r) {
                Gate::Go => break,
                Gate::Wait => panic!("{offset} must wait"),
                Gate::Record(w) => (w, false),
                Gate::Ahead(w) => (w, true),
            };
            match w {
                Write::Head { offset, n } => (journal.head, journal.n) = (offset, n),
                Write::High(h) => journal.high = h,
            }
            t.recorded(w, true);
            if go {
                break;
            }
        }
        t.handed(offset, r);
    }

    #[test]
    fn packed_heads_round_trip() {
        for (head, n) in [(0, 0), (0, 1), (7, 255), (1 << 40, 3)] {
            assert_eq!(Journal::unpack_head(Journal::pack_head(head, n)), (head, n));
        }
        assert_eq!(Journal::unpack_head(Journal::pack_head(5, 1000)), (5, 255));
    }

    #[test]
    fn commits_stop_below_the_lowest_unsettled_record() {
        let mut t = fresh(64);
        let mut j = Journal::default();
        for o in 0..5 {
            assert_eq!(t.fetched(o), Some(0));
            hand(&mut t, &mut j, o, 0);
        }
        assert_eq!(j.high, 64, "one reservation covers them all");
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
    fn reservations_come_before_the_records_they_cover() {
        let mut t = fresh(4);
        for o in 0..10 {
            t.fetched(o);
        }
        assert_eq!(t.gate(0, 0), Gate::Record(Write::High(4)));
        t.recorded(Write::High(4), true);
        for o in 0..2 {
            assert_eq!(t.gate(o, 0), Gate::Go);
            t.handed(o, 0);
        }
        // Past a quarter of the reservation the next one starts, without
        // waiting.
        assert_eq!(t.gate(2, 0), Gate::Ahead(Write::High(8)));
        t.recording(Write::High(8));
        t.handed(2, 0);
        for o in 3..5 {
            assert_eq!(t.gate(o, 0), Gate::Go);
            t.handed(o, 0);
        }
        assert_eq!(t.gate(5, 0), Gate::Wait, "not covered until confirmed");
        t.recorded(Write::High(8), false);
        assert_eq!(
            t.gate(5, 0),
            Gate::Record(Write::High(9)),
            "failed: asked again"
        );
    }

    #[test]
    fn an_assignment_reserves_ahead_of_its_first_fetch() {
        let mut t = Track::new(Some(10), "", Journal::default(), 4);
        assert_eq!(t.first_reservation(), Some(13));
        t.recorded(Write::High(13), true);
        assert_eq!(t.first_reservation(), None);
        t.fetched(10);
        assert_eq!(t.gate(10, 0), Gate::Go);
        let suspects = Journal {
            head: -1,
            n: 0,
            high: 40,
        };
        let t = Track::new(Some(10), "", suspects, 4);
        assert_eq!(t.first_reservation(), None, "never below the journal's");
        assert_eq!(
            Track::new(None, "", Journal::default(), 4).first_reservation(),
            None
        );
    }

    #[test]
    fn a_new_owner_hands_out_suspects_one_at_a_time() {
        // First owner: hands out 0..4, acks 2, crashes (nothing committed).
        let mut j = Journal::default();
        let mut a = fresh(8);
        for o in 0..4 {
            let r = a.fetched(o).unwrap();
            hand(&mut a, &mut j, o, r);
        }
        a.settle(2);
        let (w, meta) = a.commit_point().unwrap();
        assert_eq!((w, j.high), (0, 16), "reserved ahead once");
        // Second owner: everything up to the reservation is a suspect.
        let mut b = Track::new(Some(w), &meta, j, 8);
        assert_eq!(b.fetched(0), Some(1));
        assert_eq!(b.fetched(1), Some(1));
        assert_eq!(b.fetched(2), None, "acked before");
        assert_eq!(b.fetched(3), Some(1));
        assert_eq!(b.fetched(17), Some(0), "above the reservation: new");
        assert_eq!(b.gate(0, 1), Gate::Record(Write::Head { offset: 0, n: 2 }));
        hand(&mut b, &mut j, 0, 1);
        assert_eq!(b.gate(1, 1), Gate::Wait, "one suspect at a time");
        assert_eq!(b.gate(17, 0), Gate::Wait, "nothing overtakes a suspect");
        b.settle(0);
        assert_eq!(b.gate(1, 1), Gate::Record(Write::Head { offset: 1, n: 2 }));
    }

    #[test]
    fn a_record_that_crashes_every_owner_counts_one_attempt_per_crash() {
        // A and B are handled, P crashes its consumer every time; commits
        // never reach the broker (the worst case).
        let (a, b, p) = (0, 1, 2);
        let mut j = Journal::default();
        let mut p_attempts = Vec::new();
        for _run in 0..4 {
            let mut t = Track::new(Some(0), "", j, 16);
            for o in 0..4 {
                t.fetched(o);
            }
            for o in [a, b, p] {
                let r = t.prior_redeliveries(o);
                hand(&mut t, &mut j, o, r);
                if o == p {
                    p_attempts.push(r + 1);
                    break; // the crash
                }
                t.settle(o);
            }
        }
        assert_eq!(p_attempts, vec![1, 2, 3, 4]);
    }

    #[test]
    fn a_clean_stop_gives_back_the_unused_reservation() {
        let mut j = Journal::default();
        let mut t = fresh(100);
        for o in 0..3 {
            t.fetched(o);
            hand(&mut t, &mut j, o, 0);
            t.settle(o);
        }
        assert_eq!(t.release(), Some(2));
        j.high = 2;
        let (w, meta) = t.commit_point().unwrap();
        let mut next = Track::new(Some(w), &meta, j, 100);
        assert_eq!(next.fetched(3), Some(0), "a restart costs no attempt");
    }

    #[test]
    fn acked_ranges_not_yet_fetched_are_kept() {
        let mut j = Journal::default();
        let mut a = fresh(64);
        for o in 0..6 {
            let r = a.fetched(o).unwrap();
            hand(&mut a, &mut j, o, r);
        }
        for o in [2, 3, 5] {
            a.settle(o);
        }
        let (w, meta) = a.commit_point().unwrap();
        let mut b = Track::new(Some(w), &meta, j, 64);
        // b commits before fetching anything beyond 1.
        b.fetched(0);
        b.fetched(1);
        hand(&mut b, &mut j, 0, 1);
        b.settle(0);
        let (w, meta) = b.commit_point().unwrap();
        assert_eq!(w, 1);
        assert_eq!(Meta::decode(w, &meta).acked, vec![(2, 3), (5, 5)]);
    }

    #[test]
    fn an_empty_partition_commits_nothing_new() {
        let t = Track::new(None, "", Journal::default(), 8);
        assert_eq!(t.commit_point(), None);
        let t = Track::new(Some(7), "sy1;0;-1;", Journal::default(), 8);
        assert_eq!(t.commit_point().unwrap().0, 7);
        assert!(!t.dirty);
    }
}
