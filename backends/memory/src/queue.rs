//! One subscription's queue: ready, delayed and in-flight messages.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use rustc_hash::FxHashMap;
use switchyard_core::Message;
use tokio::{sync::Notify, time::Instant};

/// A message waiting in a subscription, with its delivery count.
#[derive(Debug)]
struct Entry {
    message: Message,
    deliveries: u32,
}

#[derive(Debug)]
struct InFlight {
    seq: u64,
    entry: Entry,
    /// When it expires; `None` while it waits in its consumer's buffer
    /// (its clock starts at hand-out, see [`Queue::restamp`]).
    deadline: Option<Instant>,
    consumer: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Ready messages never handed out, in publish order (sequence
    /// ascending): the common case, pushed and popped at the ends.
    fresh: VecDeque<(u64, Entry)>,
    /// Ready messages that came back (nack, expiry, a closed consumer), by
    /// publish sequence, so they keep their place ahead of later ones.
    returned: BTreeMap<u64, Entry>,
    /// Nacked-with-delay messages by (due, seq).
    delayed: BTreeMap<(Instant, u64), Entry>,
    /// Handed-out deliveries by delivery tag (sequential integers: a
    /// multiplicative hash, not SipHash, which cost more than the rest of
    /// a settlement).
    in_flight: FxHashMap<u64, InFlight>,
    /// Ack deadlines `(deadline, tag)`, earliest first. Lazy: a settled
    /// delivery's entry, or one whose deadline moved, is dropped when it
    /// reaches the top or when stale entries outnumber live ones; the
    /// delivery's own [`InFlight::deadline`] is the truth.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Unsettled deliveries per consumer.
    held: FxHashMap<u64, usize>,
    next_tag: u64,
    /// A consumer found no room in its prefetch: the next settlement wakes
    /// the waiting consumers (otherwise an ack wakes nobody, as nobody
    /// waits for what it frees).
    room_wanted: bool,
    /// Publish sequence of the next message.
    next_seq: u64,
}

impl State {
    /// The ready message with the lowest publish sequence.
    fn pop_ready(&mut self) -> Option<(u64, Entry)> {
        let fresh = self.fresh.front().map(|(seq, _)| *seq);
        let returned = self.returned.first_key_value().map(|(seq, _)| *seq);
        match (fresh, returned) {
            (Some(f), Some(r)) if r < f => self.returned.pop_first(),
            (Some(_), _) => self.fresh.pop_front(),
            (None, _) => self.returned.pop_first(),
        }
    }

    /// Appends a newly published message.
    fn push_fresh(&mut self, message: Message) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.fresh.push_back((
            seq,
            Entry {
                message,
                deliveries: 0,
            },
        ));
    }

    fn release(&mut self, tag: u64) -> Option<InFlight> {
        let f = self.in_flight.remove(&tag)?;
        if let Some(n) = self.held.get_mut(&f.consumer) {
            *n -= 1;
        }
        Some(f)
    }

    /// Moves due delayed messages and expired deliveries back to ready.
    fn promote(&mut self, now: Instant) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, seq), e) = entry.remove_entry();
            self.returned.insert(seq, e);
        }
        // Stale entries at the top go whatever their time, so the top is
        // live afterwards (`next_wake` reads it).
        while let Some(&Reverse((deadline, tag))) = self.deadlines.peek() {
            let live = self.is_live(deadline, tag);
            if live && deadline > now {
                break;
            }
            self.deadlines.pop();
            if live && let Some(f) = self.release(tag) {
                self.returned.insert(f.seq, f.entry);
            }
        }
    }

    /// Whether a deadline entry still stands for its delivery.
    fn is_live(&self, deadline: Instant, tag: u64) -> bool {
        self.in_flight
            .get(&tag)
            .is_some_and(|f| f.deadline == Some(deadline))
    }

    /// Records a delivery's new deadline (its `InFlight::deadline` is
    /// already set). Stale entries are dropped once they outnumber the
    /// deliveries in flight: a delivery held for long at the top no longer
    /// lets everything settled after it pile up behind it.
    fn stamp(&mut self, deadline: Instant, tag: u64) {
        self.deadlines.push(Reverse((deadline, tag)));
        if self.deadlines.len() > 2 * self.in_flight.len() + 64 {
            let mut deadlines = std::mem::take(&mut self.deadlines);
            deadlines.retain(|&Reverse((d, t))| self.is_live(d, t));
            self.deadlines = deadlines;
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let delayed = self.delayed.keys().next().map(|k| k.0);
        let deadline = self.deadlines.peek().map(|k| k.0.0);
        match (delayed, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What a receive attempt found.
pub(crate) enum Take {
    /// Deliveries: (tag, message, attempt).
    Got(Vec<(u64, Message, u32)>),
    /// Nothing now; wake at this instant at the latest.
    Wait(Option<Instant>),
}

/// A subscription's queue, shared by its consumers.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    state: Mutex<State>,
    /// Woken whenever something may have become receivable.
    pub(crate) changed: Notify,
    /// Deleted from its broker ([`MemoryBroker::delete_subscription`](crate::MemoryBroker::delete_subscription)).
    deleted: std::sync::atomic::AtomicBool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state
        // (every mutation is a few map operations); keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the queue deleted and wakes its consumers (who then say so).
    pub(crate) fn delete(&self) {
        self.deleted
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub(crate) fn is_deleted(&self) -> bool {
        self.deleted.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn push(&self, message: Message) {
        self.lock().push_fresh(message);
        self.changed.notify_waiters();
    }

    pub(crate) fn push_many(&self, messages: impl Iterator<Item = Message>) {
        let mut state = self.lock();
        for message in messages {
            state.push_fresh(message);
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Takes up to `max` ready messages for `consumer`, within its prefetch.
    pub(crate) fn take(
        &self,
        consumer: u64,
        prefetch: usize,
        max: usize,
        ack_timeout: Duration,
    ) -> Take {
        let now = Instant::now();
        let mut state = self.lock();
        state.promote(now);
        let held = state.held.get(&consumer).copied().unwrap_or(0);
        if held >= prefetch {
            state.room_wanted = true;
        }
        let room = prefetch.saturating_sub(held).min(max);
        let mut out = Vec::new();
        let deadline = now + ack_timeout;
        while out.len() < room {
            let Some((seq, mut entry)) = state.pop_ready() else {
                break;
            };
            entry.deliveries += 1;
            let tag = state.next_tag;
            state.next_tag += 1;
            // Only the delivery handed out now starts its ack clock; the rest
            // wait in the consumer's buffer without one (like prefetched
            // messages in a real client) until `restamp` hands them out.
            let first = out.is_empty();
            out.push((tag, entry.message.clone(), entry.deliveries));
            state.in_flight.insert(
                tag,
                InFlight {
                    seq,
                    entry,
                    deadline: first.then_some(deadline),
                    consumer,
                },
            );
            if first {
                state.stamp(deadline, tag);
            }
        }
        if out.is_empty() {
            Take::Wait(state.next_wake())
        } else {
            *state.held.entry(consumer).or_insert(0) += out.len();
            Take::Got(out)
        }
    }

    /// Starts the ack clock of a delivery a consumer buffered and now hands
    /// out. False when it is no longer in flight (then the buffered copy must
    /// not be handed out).
    pub(crate) fn restamp(&self, tag: u64, ack_timeout: Duration) -> bool {
        let mut state = self.lock();
        let Some(f) = state.in_flight.get_mut(&tag) else {
            return false;
        };
        let deadline = Instant::now() + ack_timeout;
        f.deadline = Some(deadline);
        state.stamp(deadline, tag);
        true
    }

    /// Settles a delivery for good. An unknown tag already expired and went
    /// back to the queue: nothing to do (at-least-once).
    pub(crate) fn ack(&self, tag: u64) {
        let mut state = self.lock();
        state.release(tag);
        // Room for a consumer waiting at its prefetch, if one is.
        let wake = std::mem::take(&mut state.room_wanted);
        drop(state);
        if wake {
            self.changed.notify_waiters();
        }
    }

    /// Returns a delivery to the queue, now or after `delay`.
    pub(crate) fn nack(&self, tag: u64, delay: Option<Duration>) {
        let mut state = self.lock();
        let Some(f) = state.release(tag) else {
            return;
        };
        match delay {
            Some(d) => {
                state.delayed.insert((Instant::now() + d, f.seq), f.entry);
            }
            None => {
                state.returned.insert(f.seq, f.entry);
            }
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Returns every delivery `consumer` holds (consumer closed or dropped).
    pub(crate) fn requeue_consumer(&self, consumer: u64) {
        let mut state = self.lock();
        let tags: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, f)| f.consumer == consumer)
            .map(|(t, _)| *t)
            .collect();
        for tag in tags {
            if let Some(f) = state.release(tag) {
                state.returned.insert(f.seq, f.entry);
            }
        }
        state.held.remove(&consumer);
        drop(state);
        self.changed.notify_waiters();
    }

    /// Un-takes deliveries a consumer buffered but never handed out: back
    /// to ready with their delivery count restored.
    pub(crate) fn untake(&self, tags: VecDeque<u64>) {
        let mut state = self.lock();
        for tag in tags {
            if let Some(mut f) = state.release(tag) {
                f.entry.deliveries -= 1;
                state.returned.insert(f.seq, f.entry);
            }
        }
        drop(state);
        self.changed.notify_waiters();
    }
}

pub(crate) type SharedQueue = Arc<Queue>;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use switchyard_core::Message;

    use super::{Queue, Take};

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn take_one(q: &Queue, ack_timeout: Duration) -> Option<(u64, u32)> {
        match q.take(1, 1_000, 1, ack_timeout) {
            Take::Got(got) => got.first().map(|(tag, _, attempt)| (*tag, *attempt)),
            Take::Wait(_) => None,
        }
    }

    #[tokio::test]
    async fn settled_deliveries_do_not_pile_up_behind_one_held_for_long() {
        let q = Queue::default();
        q.push(Message::new("held"));
        let (_held, _) = take_one(&q, TIMEOUT).expect("the held delivery");
        for _ in 0..10_000 {
            q.push(Message::new("x"));
            let (tag, _) = take_one(&q, TIMEOUT).expect("a delivery");
            q.ack(tag);
        }
        let state = q.lock();
        assert_eq!(state.in_flight.len(), 1);
        // The held delivery's entry stays at the top all along; the 10,000
        // settled ones behind it are compacted away.
        assert!(
            state.deadlines.len() <= 2 * state.in_flight.len() + 64 + 1,
            "{} deadline entries for 1 delivery in flight",
            state.deadlines.len()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_extended_delivery_expires_at_its_new_deadline_not_its_old_one() {
        let q = Queue::default();
        q.push(Message::new("m"));
        let ack_timeout = Duration::from_secs(10);
        let (tag, attempt) = take_one(&q, ack_timeout).expect("a delivery");
        assert_eq!(attempt, 1);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(q.restamp(tag, ack_timeout), "extended while in flight");
        // Past the first deadline (10 s), before the new one (16 s).
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(take_one(&q, ack_timeout), None);
        tokio::time::advance(Duration::from_secs(5)).await;
        let (_, attempt) = take_one(&q, ack_timeout).expect("redelivered after the new deadline");
        assert_eq!(attempt, 2);
    }
}
