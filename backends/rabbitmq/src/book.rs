//! What a receiver knows about the deliveries it handed out: their ack
//! deadlines (leases), and the acks waiting to be coalesced.
//!
//! One rule keeps coalesced acks safe: **a delivery leaves the book only
//! with its settlement frame queued on the channel, under the same lock.**
//! A `multiple` ack covers every unacked tag up to its own, so a tag must
//! never be out of the book (letting the floor of the next `multiple` ack
//! rise past it) while its reject is still to be sent: the ack would settle
//! a delivery nobody acked — a lost message — and the reject of a tag the
//! broker no longer knows would close the channel.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use switchyard_core::{
    Result,
    driver::{Coalescer, Gathered},
};
use tokio::time::Instant;

/// A delivery's (channel generation, delivery tag).
pub(crate) type Key = (u64, u64);

/// The channel side of settling: queue a frame, without waiting (the broker
/// does not answer acks or rejects).
pub(crate) trait Wire: Clone {
    /// Whether the channel is still open (a closed one returned its
    /// deliveries already).
    fn connected(&self) -> bool;
    /// Queues `basic.ack` (with the `multiple` flag when asked).
    fn ack(&self, tag: u64, multiple: bool) -> Result<()>;
    /// Queues `basic.reject` with requeue.
    fn reject(&self, tag: u64) -> Result<()>;
}

/// What became of an ack.
pub(crate) enum Acked {
    /// Not in the book any more: its ack timeout expired and it was
    /// returned, or the receiver closed.
    Late,
    /// Recorded; sent with the next ones, or at the flush deadline — given
    /// when this ack set it (the reaper must wake for it).
    Deferred(Option<Instant>),
    /// Recorded and sent now, with the ones before it.
    Sent(Result<()>),
}

/// Handed-out deliveries, by key and by deadline, and the coalesced acks.
pub(crate) struct Book<C> {
    /// Handed out, not settled, with the instant their lease expires.
    unsettled: BTreeMap<Key, (Instant, C)>,
    /// The same deliveries by deadline (leases are extended, so key order
    /// is not deadline order).
    deadlines: BTreeSet<(Instant, Key)>,
    /// Acked by the application, `basic.ack` not sent yet (coalesced).
    acked: BTreeSet<Key>,
    /// When `acked` is sent: `flush_every` of them, or a delay after the
    /// first.
    coalescer: Coalescer,
    /// The highest delivery handed out, and its channel: a `multiple` ack
    /// never reaches past it (deliveries not handed out yet are not acked).
    handed: Option<(Key, C)>,
}

impl<C> Book<C> {
    /// An empty book whose acks are sent `flush_every` at a time, or
    /// `flush_delay` after the first.
    pub(crate) fn new(flush_every: usize, flush_delay: Duration) -> Self {
        Self {
            unsettled: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            acked: BTreeSet::new(),
            coalescer: Coalescer::new(flush_every, flush_delay),
            handed: None,
        }
    }
}

impl<C: Wire> Book<C> {
    /// Records a delivery handed out; `true` when the book was empty (the
    /// reaper may be waiting for nothing).
    pub(crate) fn insert(&mut self, key: Key, deadline: Instant, channel: &C) -> bool {
        let was_empty = self.unsettled.is_empty();
        self.unsettled.insert(key, (deadline, channel.clone()));
        self.deadlines.insert((deadline, key));
        match &mut self.handed {
            Some((k, _)) if k.0 == key.0 => *k = key,
            handed => *handed = Some((key, channel.clone())),
        }
        was_empty
    }

    /// How many deliveries are handed out and unsettled.
    pub(crate) fn unsettled(&self) -> usize {
        self.unsettled.len()
    }

    /// Whether nothing is handed out unsettled or acked and not yet sent.
    pub(crate) fn is_settled(&self) -> bool {
        self.unsettled.is_empty() && self.acked.is_empty()
    }

    /// Whether the delivery is handed out and unsettled.
    pub(crate) fn contains(&self, key: Key) -> bool {
        self.unsettled.contains_key(&key)
    }

    /// When the reaper has work next: the first lease to expire, or the
    /// coalesced acks' deadline.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let expiry = self.deadlines.first().map(|(d, _)| *d);
        match (expiry, self.coalescer.due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Moves a delivery's lease deadline (a no-op when it is not unsettled).
    pub(crate) fn extend(&mut self, key: Key, deadline: Instant) {
        if let Some(entry) = self.unsettled.get_mut(&key) {
            self.deadlines.remove(&(entry.0, key));
            entry.0 = deadline;
            self.deadlines.insert((deadline, key));
        }
    }

    fn remove(&mut self, key: Key) -> Option<C> {
        let (deadline, channel) = self.unsettled.remove(&key)?;
        self.deadlines.remove(&(deadline, key));
        Some(channel)
    }

    /// Returns the delivery to the queue (`basic.reject` with requeue),
    /// queued before anything else can be flushed. `Ok(false)` when it is
    /// not in the book (returned already, or the receiver closed).
    ///
    /// # Errors
    ///
    /// When the channel refuses the frame; `Ok(true)` with a closed channel
    /// means the broker returned it already.
    pub(crate) fn reject(&mut self, key: Key) -> Result<bool> {
        let Some(channel) = self.remove(key) else {
            return Ok(false);
        };
        if channel.connected() {
            channel.reject(key.1)?;
        }
        Ok(true)
    }

    /// Records an ack at `now`; sends the batch when it is full.
    pub(crate) fn ack(&mut self, key: Key, now: Instant) -> Acked {
        if self.remove(key).is_none() {
            return Acked::Late;
        }
        self.acked.insert(key);
        match self.coalescer.add(1, now) {
            Gathered::Full => Acked::Sent(self.flush()),
            Gathered::First(due) => Acked::Deferred(Some(due)),
            Gathered::Joined => Acked::Deferred(None),
        }
    }

    /// Sends everything acked on the current channel: one `multiple` ack
    /// for the acked run below the first unsettled delivery, single acks
    /// above it (so a slow delivery never holds back the acks of later
    /// ones).
    pub(crate) fn flush(&mut self) -> Result<()> {
        self.coalescer.take();
        let Some(((generation, handed_tag), channel)) = self.handed.clone() else {
            return Ok(());
        };
        let acked = std::mem::take(&mut self.acked);
        let floor = self
            .unsettled
            .range((generation, 0)..)
            .next()
            .map_or(handed_tag + 1, |((_, tag), _)| *tag);
        let mut multiple_upto = None;
        let mut singles = Vec::new();
        for (g, tag) in acked {
            if g != generation {
                // Its channel is gone; the broker redelivers it.
                continue;
            }
            if tag < floor {
                // The tag of a `multiple` ack must itself be unacked on the
                // broker (RabbitMQ closes the channel on an unknown tag), so
                // it is the highest acked tag below the floor, not the floor.
                multiple_upto = Some(tag);
            } else {
                singles.push(tag);
            }
        }
        if let Some(upto) = multiple_upto {
            channel.ack(upto, true)?;
        }
        for tag in singles {
            channel.ack(tag, false)?;
        }
        Ok(())
    }

    /// Returns every delivery whose lease expired by `now` (rejects queued
    /// first), then sends the coalesced acks when their deadline passed.
    ///
    /// # Errors
    ///
    /// When the channel refuses a frame.
    pub(crate) fn reap(&mut self, now: Instant) -> Result<()> {
        let mut result = Ok(());
        while let Some(&(deadline, key)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            if let Err(e) = self.reject(key) {
                result = Err(e);
            }
        }
        if self.coalescer.is_due(now) {
            result = result.and(self.flush());
        }
        result
    }

    /// Forgets every delivery (the receiver closed: the channel's close
    /// returns them).
    pub(crate) fn clear(&mut self) {
        self.unsettled.clear();
        self.deadlines.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use super::*;

    /// A channel modelled as the broker sees it: the unacked tags, what
    /// became of each, and whether a frame named an unknown tag (which
    /// makes RabbitMQ close the channel with 406 PRECONDITION_FAILED).
    #[derive(Clone, Default)]
    struct Model(Arc<Mutex<ModelState>>);

    #[derive(Default)]
    struct ModelState {
        unacked: BTreeSet<u64>,
        acked: BTreeSet<u64>,
        requeued: BTreeSet<u64>,
        unknown: Vec<String>,
    }

    impl Model {
        /// Delivers tags `1..=n` on channel generation 1, each handed out
        /// into `book` with lease deadline `deadline`.
        fn deliver(&self, book: &mut Book<Model>, n: u64, deadline: Instant) {
            for tag in 1..=n {
                self.0.lock().unwrap().unacked.insert(tag);
                book.insert((1, tag), deadline, self);
            }
        }
    }

    impl Wire for Model {
        fn connected(&self) -> bool {
            true
        }
        fn ack(&self, tag: u64, multiple: bool) -> Result<()> {
            let mut s = self.0.lock().unwrap();
            if !s.unacked.contains(&tag) {
                s.unknown.push(format!("ack {tag}"));
            }
            let covered: Vec<u64> = if multiple {
                s.unacked.range(..=tag).copied().collect()
            } else {
                vec![tag]
            };
            for t in covered {
                s.unacked.remove(&t);
                s.acked.insert(t);
            }
            Ok(())
        }
        fn reject(&self, tag: u64) -> Result<()> {
            let mut s = self.0.lock().unwrap();
            if !s.unacked.remove(&tag) {
                s.unknown.push(format!("reject {tag}"));
            }
            s.requeued.insert(tag);
            Ok(())
        }
    }

    /// Issue: the reaper removed an expired delivery, then flushed the acks
    /// waiting above it as one `multiple` ack (which covered the expired
    /// one: acked although nobody acked it, a lost message), then rejected
    /// it (an unknown tag by then: the channel closed).
    #[test]
    fn an_expired_delivery_is_never_covered_by_a_multiple_ack() {
        let wire = Model::default();
        let t0 = Instant::now();
        let lease = Duration::from_secs(1);
        let mut book = Book::new(100, lease);
        wire.deliver(&mut book, 3, t0 + lease);
        // 2 and 3 acked, deferred; their flush comes due with 1's expiry.
        assert!(matches!(book.ack((1, 2), t0), Acked::Deferred(Some(due)) if due == t0 + lease));
        assert!(matches!(book.ack((1, 3), t0), Acked::Deferred(None)));
        book.reap(t0 + lease).unwrap();
        let s = wire.0.lock().unwrap();
        assert!(
            s.unknown.is_empty(),
            "frames on unknown tags: {:?}",
            s.unknown
        );
        assert_eq!(
            s.requeued,
            BTreeSet::from([1]),
            "the expired delivery goes back"
        );
        assert_eq!(
            s.acked,
            BTreeSet::from([2, 3]),
            "only the acked ones are acked"
        );
    }

    /// A reject and a flush racing: whatever order the two settlements take,
    /// the rejected delivery is requeued, never covered by the ack.
    #[test]
    fn a_rejected_delivery_is_never_covered_by_a_later_multiple_ack() {
        let wire = Model::default();
        let mut book = Book::new(3, Duration::from_secs(30));
        let t0 = Instant::now();
        wire.deliver(&mut book, 4, t0 + Duration::from_secs(30));
        assert!(matches!(book.ack((1, 2), t0), Acked::Deferred(Some(_))));
        assert!(book.reject((1, 1)).unwrap());
        // The next acks reach the flush threshold: one batch for 2..=4.
        assert!(matches!(book.ack((1, 3), t0), Acked::Deferred(None)));
        assert!(matches!(book.ack((1, 4), t0), Acked::Sent(Ok(()))));
        let s = wire.0.lock().unwrap();
        assert!(
            s.unknown.is_empty(),
            "frames on unknown tags: {:?}",
            s.unknown
        );
        assert_eq!(s.requeued, BTreeSet::from([1]));
        assert_eq!(s.acked, BTreeSet::from([2, 3, 4]));
    }

    /// Leases: an extended delivery does not expire at its old deadline,
    /// and does not hold back the expiry of the ones after it.
    #[test]
    fn an_extended_lease_moves_its_deadline_only() {
        let wire = Model::default();
        let mut book = Book::new(100, Duration::from_millis(5));
        let t0 = Instant::now();
        let lease = Duration::from_secs(1);
        wire.deliver(&mut book, 2, t0 + lease);
        book.extend((1, 1), t0 + lease * 3);
        assert_eq!(book.next_due(), Some(t0 + lease));
        book.reap(t0 + lease).unwrap();
        assert!(book.contains((1, 1)), "the extended delivery was returned");
        assert!(!book.contains((1, 2)), "the other one outlived its lease");
        assert_eq!(wire.0.lock().unwrap().requeued, BTreeSet::from([2]));
        assert_eq!(book.next_due(), Some(t0 + lease * 3));
    }
}
