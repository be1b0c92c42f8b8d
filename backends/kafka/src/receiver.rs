//! Receiving: one consumer-group member per subscription handle.
//!
//! A pump task keeps polling the consumer (so the member takes part in
//! rebalances even while the application is busy) and admits records into
//! a small ready queue; [`Receiver::recv`](switchyard_core::driver::Receiver::recv) hands them out within the
//! prefetch limit. Records of the retry topic wait in a heap until due.
//! A committer commits settled offsets shortly after acks; a reaper
//! re-publishes deliveries that outlive the ack timeout. Delivery counts
//! that must survive a crash go to the subscription's journal (see the
//! `offsets` module) before the records they cover are handed out: two
//! consumer groups of their own, `<group>~n` and `<group>~h`, whose
//! committed offsets (on the subscription's own partitions) hold each
//! partition's head and count, and its reservation.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    fmt,
    sync::{Arc, Condvar, Mutex, MutexGuard, Weak},
    time::{Duration, Instant, SystemTime},
};

use async_trait::async_trait;
use futures_util::FutureExt as _;
use rdkafka::{
    Offset, TopicPartitionList,
    client::ClientContext,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    error::{KafkaError, RDKafkaErrorCode},
    message::Message as _,
};
use rustc_hash::FxHashMap;
use switchyard_core::{
    Error, Message, Result, SubscribeOptions,
    driver::{Acker, RawDelivery, ReceiverCore, SharedReceiver},
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{BrokerInner, base_config, blocking, lock},
    codec::{self, Retry},
    error::kafka_error,
    names,
    offsets::{Gate, Journal, Track, Write},
};

/// Pause before a failed expiry re-publish is tried again.
const REAP_RETRY: Duration = Duration::from_secs(1);
/// Most retry records held in memory until due; past it the pump pauses.
const MAX_HELD: usize = 10_000;
/// How long the ready queue stays full before the pump pauses fetching and
/// polls on.
const PAUSE_AFTER: Duration = Duration::from_secs(1);
/// Most records the pump admits at once (those librdkafka already has).
const PUMP_RUN: usize = 64;
/// Fewest records one journal reservation covers (else four prefetches:
/// what a crash can cost one attempt each, handed out one at a time by the
/// next owner; large enough that reserving ahead keeps up with the fastest
/// consumer).
const MIN_RESERVE: usize = 64;
/// Pause before a failed journal write is tried again.
const JOURNAL_RETRY: Duration = Duration::from_millis(200);
/// Time between the metadata readings that confirm the subscription's topic
/// is gone (two readings without it, at least this far apart).
const GONE_CONFIRM: Duration = Duration::from_secs(1);

/// Why [`RecvInner::take`] handed nothing out.
enum Next {
    /// Nothing may go now; the next held record is due then (Unix ms).
    Idle(Option<i64>),
    /// A record of this partition (and assignment) may go after this
    /// journal write.
    Record(Part, u64, Write),
    /// The subscription's topic was deleted ([`Error::NotFound`]).
    Gone(Error),
}

/// A partition of the subscription: the topic's (`false`) or the retry
/// topic's (`true`).
type Part = (bool, i32);

/// A record handed out and not settled yet.
struct Handed {
    part: Part,
    epoch: u64,
    offset: i64,
    message: Message,
    attempt: u32,
    deadline: Instant,
    /// Being re-published (nack or expiry): not touched by anyone else.
    busy: bool,
}

/// An admitted record: ready, or (from the retry topic) waiting until due.
struct Admitted {
    due_ms: i64,
    seq: u64,
    part: Part,
    epoch: u64,
    offset: i64,
    message: Message,
    attempt: u32,
    redeliveries: u32,
}

impl PartialEq for Admitted {
    fn eq(&self, other: &Self) -> bool {
        (self.due_ms, self.seq) == (other.due_ms, other.seq)
    }
}
impl Eq for Admitted {}
impl PartialOrd for Admitted {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Admitted {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due_ms, self.seq).cmp(&(other.due_ms, other.seq))
    }
}

#[derive(Default)]
struct State {
    /// Assigned partitions, each with the epoch of its assignment.
    /// (Fx maps: small integer keys, looked up for every record; SipHash
    /// cost more than the rest of the lookup.)
    tracks: FxHashMap<Part, (u64, Track)>,
    next_epoch: u64,
    /// An assignment (possibly empty) has been received.
    assigned: bool,
    ready: VecDeque<Admitted>,
    held: BinaryHeap<Reverse<Admitted>>,
    next_seq: u64,
    handed: FxHashMap<u64, Handed>,
    next_token: u64,
    closed: bool,
    /// The subscription's topic is gone (deleted): what the broker said.
    /// Every `recv` from then on returns [`Error::NotFound`].
    gone: Option<(String, KafkaError)>,
    /// When settled offsets are next committed: `commit_interval` after the
    /// first settlement since the last commit (offsets, not acks, are
    /// committed, so how many does not change the cost: time alone
    /// decides). `None`: nothing to commit.
    commit_due: Option<tokio::time::Instant>,
}

impl State {
    /// [`Error::NotFound`] once the topic is gone.
    fn gone_error(&self, names: &Names) -> Option<Error> {
        self.gone.as_ref().map(|(message, cause)| {
            Error::not_found(
                "topic",
                names.topic.clone(),
                message.clone(),
                Some(Box::new(cause.clone())),
            )
        })
    }

    fn is_current(&self, part: Part, epoch: u64) -> bool {
        self.tracks.get(&part).is_some_and(|(e, _)| *e == epoch)
    }

    fn settle(&mut self, part: Part, epoch: u64, offset: i64) {
        if let Some((e, t)) = self.tracks.get_mut(&part)
            && *e == epoch
        {
            t.settle(offset);
        }
    }

    /// The offsets to commit: of dirty partitions, or of all of `only`.
    fn commit_list(&mut self, names: &Names, only: Option<&[Part]>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (part, (_, track)) in &mut self.tracks {
            let wanted = match only {
                Some(parts) => parts.contains(part),
                None => track.dirty,
            };
            if !wanted {
                continue;
            }
            track.dirty = false;
            if let Some((offset, meta)) = track.commit_point() {
                let mut e = tpl.add_partition(names.of(part.0), part.1);
                if e.set_offset(Offset::Offset(offset)).is_ok() {
                    e.set_metadata(meta);
                }
            }
        }
        tpl
    }

    /// Registers one fetched record of this subscription (`target`):
    /// ready, or held until due; `false` when it was skipped (settled
    /// before, already tracked, or another subscription's retry).
    fn admit_one(
        &mut self,
        target: &str,
        now_ms: i64,
        part: Part,
        offset: i64,
        decoded: codec::Decoded,
    ) -> bool {
        let Some((epoch, track)) = self.tracks.get_mut(&part) else {
            return false;
        };
        let epoch = *epoch;
        let Some(redeliveries) = track.fetched(offset) else {
            return false;
        };
        let (attempt, due_ms) = if part.0 {
            match decoded.retry {
                Some(r) if r.target == target => (r.attempt.max(1), r.due_ms),
                _ => {
                    // Another subscription's retry (a shared retry topic) or
                    // a foreign record: not ours to deliver.
                    track.settle(offset);
                    return false;
                }
            }
        } else {
            (1, 0)
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let a = Admitted {
            due_ms,
            seq,
            part,
            epoch,
            offset,
            message: decoded.message,
            attempt,
            redeliveries,
        };
        if due_ms > now_ms {
            self.held.push(Reverse(a));
        } else {
            self.ready.push_back(a);
        }
        true
    }

    /// The reservations to give back for `only` (or every) partition.
    fn releases(&self, only: Option<&[Part]>) -> Vec<(Part, i64)> {
        self.tracks
            .iter()
            .filter(|(p, _)| only.is_none_or(|o| o.contains(p)))
            .filter_map(|(p, (_, t))| t.release().map(|h| (*p, h)))
            .collect()
    }

    /// Forgets partitions: their records are fetched again by the next owner.
    fn forget(&mut self, parts: &[Part]) {
        for p in parts {
            self.tracks.remove(p);
        }
        self.ready.retain(|a| !parts.contains(&a.part));
        let held = std::mem::take(&mut self.held);
        self.held = held
            .into_iter()
            .filter(|h| !parts.contains(&h.0.part))
            .collect();
    }
}

/// The two topic names of a subscription.
#[derive(Debug, Clone)]
struct Names {
    topic: String,
    retry: String,
}

impl Names {
    fn of(&self, retry: bool) -> &str {
        if retry { &self.retry } else { &self.topic }
    }

    fn part(&self, topic: &str, partition: i32) -> Option<Part> {
        if topic == self.topic {
            Some((false, partition))
        } else if topic == self.retry {
            Some((true, partition))
        } else {
            None
        }
    }
}

/// What the consumer's callbacks share with the receiver.
struct Shared {
    names: Names,
    state: Mutex<State>,
    request_timeout: Duration,
    journal: JournalGroups,
    /// Records one journal reservation covers.
    reserve: usize,
    /// Signalled when handed-out deliveries are settled (or handed back)
    /// while a revoke waits for them ([`Ctx::drain`]).
    settled: Condvar,
    /// How many revokes wait on `settled`: a settlement signals it only
    /// then (`notify_all` is a system call even with no one waiting).
    draining: std::sync::atomic::AtomicUsize,
    /// Longest a revoke waits for the application to settle what it holds
    /// of the partitions it loses (see [`Ctx::drain`]).
    revoke_grace: Duration,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

/// The two consumer groups whose committed offsets are a subscription's
/// journal: `heads` holds each partition's [`Journal::pack_head`],
/// `highs` its reservation plus one (librdkafka does not commit negative,
/// logical offsets). Neither ever has a member.
struct JournalGroups {
    heads: BaseConsumer,
    highs: BaseConsumer,
}

impl JournalGroups {
    fn open(config: &crate::KafkaConfig, group: &str) -> Result<Self> {
        let make = |suffix: &str| -> Result<BaseConsumer> {
            let mut cc = base_config(config);
            cc.set("group.id", format!("{group}~{suffix}"))
                .set("enable.auto.commit", "false")
                // `heads` also reads the topic's metadata to tell whether it
                // was deleted: that must never create it again.
                .set("allow.auto.create.topics", "false");
            cc.create()
                .map_err(|e| Error::Config(format!("Kafka journal consumer: {e}")))
        };
        Ok(Self {
            heads: make("n")?,
            highs: make("h")?,
        })
    }

    /// The journal of the partitions in `list` (blocking).
    fn read(
        &self,
        names: &Names,
        list: &TopicPartitionList,
        timeout: Duration,
    ) -> std::result::Result<HashMap<Part, Journal>, KafkaError> {
        let mut out: HashMap<Part, Journal> = HashMap::new();
        for (consumer, heads) in [(&self.heads, true), (&self.highs, false)] {
            for e in consumer
                .committed_offsets(list.clone(), timeout)?
                .elements()
            {
                let (Some(part), Offset::Offset(v)) =
                    (names.part(e.topic(), e.partition()), e.offset())
                else {
                    continue;
                };
                let j = out.entry(part).or_default();
                if heads {
                    (j.head, j.n) = Journal::unpack_head(v);
                } else {
                    // Stored one past: a committed offset is never negative.
                    j.high = v - 1;
                }
            }
        }
        Ok(out)
    }

    /// Writes one partition's journal entry and waits for the broker
    /// (blocking).
    fn write(
        &self,
        names: &Names,
        part: Part,
        write: Write,
    ) -> std::result::Result<(), KafkaError> {
        match write {
            Write::Head { offset, n } => {
                let mut tpl = TopicPartitionList::new();
                let value = Journal::pack_head(offset, n);
                tpl.add_partition_offset(names.of(part.0), part.1, Offset::Offset(value))?;
                self.heads.commit(&tpl, CommitMode::Sync)
            }
            Write::High(h) => self.write_highs(names, &[(part, h)]),
        }
    }

    /// Writes several partitions' reservations at once (blocking).
    fn write_highs(
        &self,
        names: &Names,
        highs: &[(Part, i64)],
    ) -> std::result::Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for &(part, h) in highs {
            tpl.add_partition_offset(
                names.of(part.0),
                part.1,
                Offset::Offset(h.saturating_add(1).max(0)),
            )?;
        }
        self.highs.commit(&tpl, CommitMode::Sync)
    }

    /// Gives back the unused reservations of partitions a clean stop or a
    /// revoke lets go (blocking; a failure only costs their records an
    /// attempt).
    fn release(&self, names: &Names, releases: &[(Part, i64)]) {
        if releases.is_empty() {
            return;
        }
        // One commit for all of them, as at assignment.
        if let Err(e) = self.write_highs(names, releases) {
            tracing::debug!(error = %e, "kafka: giving back journal reservations failed");
        }
    }
}

struct Ctx {
    shared: Arc<Shared>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            off_the_runtime(|| self.revoke(consumer, list));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            off_the_runtime(|| self.assign(consumer, list));
        }
    }
}

/// Runs a rebalance callback's blocking broker calls (commits, offset
/// fetches: each up to a request timeout) without stalling the runtime:
/// librdkafka calls it inside the pump's `recv`, on a runtime worker, and
/// two consumers rebalancing at once would otherwise block both workers of
/// a small runtime — every timer and task of the application with them. On
/// a current-thread runtime it runs in place.
fn off_the_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// One revoke waiting for settlements, counted in `Shared::draining` while
/// it lives.
struct Draining<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Draining<'a> {
    fn enter(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Draining<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Ctx {
    fn revoke(&self, consumer: &BaseConsumer<Ctx>, list: &TopicPartitionList) {
        // Let the application finish what it holds of these partitions
        // (within the grace), commit what is settled, then forget the
        // partitions: deliveries still out are delivered again by the new
        // owner (their acks become no-ops), records waiting here are
        // fetched again there.
        let names = &self.shared.names;
        let parts: Vec<Part> = list
            .elements()
            .iter()
            .filter_map(|e| names.part(e.topic(), e.partition()))
            .collect();
        let (tpl, releases) = {
            let mut st = self.drain(self.shared.state(), &parts);
            let tpl = st.commit_list(names, Some(&parts));
            let releases = st.releases(Some(&parts));
            st.forget(&parts);
            (tpl, releases)
        };
        if tpl.count() > 0
            && let Err(e) = consumer.commit(&tpl, CommitMode::Sync)
        {
            tracing::warn!(error = %e, "kafka: commit on revoke failed; settled records may be delivered again");
        }
        self.shared.journal.release(names, &releases);
    }

    /// Waits until the application settled every delivery it holds of
    /// `parts` — a rebalance (a consumer joining or leaving: every rolling
    /// deploy) is no failure of a message the application is working on,
    /// and a record handed out and not settled at the revoke comes to its
    /// next owner at the next attempt. Waits at most the grace (half of
    /// `max.poll.interval.ms`, the group's rebalance timeout), and not for
    /// a delivery whose lease ran out (its holder stopped extending it; the
    /// reaper hands it on). The group waits meanwhile, as it waits for any
    /// member's rebalance callback.
    ///
    /// On a current-thread runtime the callback runs in place (see
    /// [`off_the_runtime`]): nothing could settle while it waited, so it
    /// does not.
    fn drain<'a>(&'a self, mut st: MutexGuard<'a, State>, parts: &[Part]) -> MutexGuard<'a, State> {
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if !multi_thread {
            return st;
        }
        let until = Instant::now() + self.shared.revoke_grace;
        // Counted under the state lock, which a settlement takes before it
        // reads the count: none between this check and the wait is missed.
        let _waiting = Draining::enter(&self.shared.draining);
        loop {
            let now = Instant::now();
            let holding = !st.closed
                && st.handed.values().any(|h| {
                    parts.contains(&h.part)
                        && st.is_current(h.part, h.epoch)
                        && (h.busy || h.deadline > now)
                });
            if !holding || now >= until {
                return st;
            }
            // Wake for settles, and at least every 100 ms to see leases
            // that ran out.
            let wait = (until - now).min(Duration::from_millis(100));
            st = self
                .shared
                .settled
                .wait_timeout(st, wait)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    fn assign(&self, consumer: &BaseConsumer<Ctx>, list: &TopicPartitionList) {
        let names = &self.shared.names;
        let committed = if list.count() == 0 {
            TopicPartitionList::new()
        } else {
            match consumer.committed_offsets((*list).clone(), self.shared.request_timeout) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka: reading committed offsets failed; delivery counts restart");
                    (*list).clone()
                }
            }
        };
        let journal = if list.count() == 0 {
            HashMap::new()
        } else {
            match self
                .shared
                .journal
                .read(names, list, self.shared.request_timeout)
            {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka: reading the delivery journal failed; delivery counts restart");
                    HashMap::new()
                }
            }
        };
        let mut st = self.shared.state();
        for e in committed.elements() {
            let Some(part) = names.part(e.topic(), e.partition()) else {
                continue;
            };
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            let epoch = st.next_epoch;
            st.next_epoch += 1;
            let j = journal.get(&part).copied().unwrap_or_default();
            st.tracks.insert(
                part,
                (
                    epoch,
                    Track::new(offset, e.metadata(), j, self.shared.reserve),
                ),
            );
        }
        // The first reservations, in one write, before anything is fetched.
        let first: Vec<(Part, u64, i64)> = st
            .tracks
            .iter()
            .filter_map(|(p, (e, t))| t.first_reservation().map(|h| (*p, *e, h)))
            .collect();
        drop(st);
        let confirmed = if first.is_empty() {
            Ok(())
        } else {
            let highs: Vec<(Part, i64)> = first.iter().map(|&(p, _, h)| (p, h)).collect();
            self.shared.journal.write_highs(names, &highs)
        };
        if let Err(e) = &confirmed {
            tracing::debug!(error = %e, "kafka: reserving in the delivery journal failed; asked again on fetch");
        }
        let mut st = self.shared.state();
        for (p, epoch, h) in first {
            if let Some((e, t)) = st.tracks.get_mut(&p)
                && *e == epoch
            {
                t.recorded(Write::High(h), confirmed.is_ok());
            }
        }
        st.assigned = true;
    }
}

type KConsumer = StreamConsumer<Ctx>;

pub(crate) struct RecvInner {
    broker: Arc<BrokerInner>,
    shared: Arc<Shared>,
    consumer: Mutex<Option<Arc<KConsumer>>>,
    /// `topic:subscription`, the tag of this subscription's retry records.
    target: String,
    prefetch: usize,
    ack_timeout: Duration,
    /// The closing token; one `recv` at a time.
    core: ReceiverCore<()>,
    /// Signalled when `recv` may have something to do (a record admitted,
    /// a delivery settled).
    wake: Arc<Notify>,
    /// Signalled when the ready queue has room (for the pump).
    space: Arc<Notify>,
    /// Signalled when offsets need committing (see `State::commit_due`).
    commit: Arc<Notify>,
    commit_interval: Duration,
    /// The shutdown ran (or is running).
    shut: std::sync::atomic::AtomicBool,
    /// A [`watch_topic`] task is confirming that the topic is gone.
    watching: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for RecvInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaReceiver")
            .field("subscription", &self.target)
            .field("prefetch", &self.prefetch)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl RecvInner {
    /// A consumer on one subscription: joins the subscription's group and waits (up to the request timeout)
    /// for the first assignment, so a consumer that `subscribe` returned is
    /// a member that receives its share.
    pub(crate) async fn open(
        broker: &Arc<BrokerInner>,
        topic: &str,
        options: &SubscribeOptions,
    ) -> Result<Arc<Self>> {
        let names = Names {
            topic: topic.to_owned(),
            retry: names::retry_topic(topic, options.name()),
        };
        let group = names::group(topic, options.name());
        let config = &broker.config;
        let mut cc = base_config(config);
        cc.set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        for (k, v) in &config.properties {
            cc.set(k, v);
        }
        let shared = Arc::new(Shared {
            names: names.clone(),
            state: Mutex::new(State::default()),
            request_timeout: config.request_timeout,
            journal: JournalGroups::open(config, &group)?,
            reserve: options.prefetch().saturating_mul(4).max(MIN_RESERVE),
            settled: Condvar::new(),
            draining: std::sync::atomic::AtomicUsize::new(0),
            revoke_grace: revoke_grace(config),
        });
        let consumer: KConsumer = cc
            .create_with_context(Ctx {
                shared: Arc::clone(&shared),
            })
            .map_err(|e| Error::Config(format!("Kafka consumer: {e}")))?;
        consumer
            .subscribe(&[&names.topic, &names.retry])
            .map_err(|e| kafka_error("subscribing", e))?;
        let consumer = Arc::new(consumer);
        let inner = Arc::new(RecvInner {
            broker: Arc::clone(broker),
            shared,
            consumer: Mutex::new(Some(Arc::clone(&consumer))),
            target: group,
            prefetch: options.prefetch(),
            ack_timeout: options.ack_timeout(),
            core: ReceiverCore::new(CancellationToken::new(), ()),
            wake: Arc::new(Notify::new()),
            space: Arc::new(Notify::new()),
            commit: Arc::new(Notify::new()),
            commit_interval: config.commit_interval,
            shut: std::sync::atomic::AtomicBool::new(false),
            watching: std::sync::atomic::AtomicBool::new(false),
        });
        tokio::spawn(pump(
            Arc::downgrade(&inner),
            consumer,
            inner.core.token().clone(),
        ));
        tokio::spawn(committer(Arc::downgrade(&inner)));
        tokio::spawn(reaper(Arc::downgrade(&inner)));
        let deadline = tokio::time::Instant::now() + config.request_timeout;
        while !inner.shared.state().assigned && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(inner)
    }
}

/// Polls the consumer, admitting records, while the ready queue has room.
///
/// When the queue stays full (a slow application), the pump pauses the
/// assigned partitions and polls on: the member keeps taking part in
/// rebalances, reports errors, and is not taken for dead once
/// `max.poll.interval.ms` passes without a poll. Records librdkafka had
/// fetched for a paused partition are fetched again on resume (from the
/// last one the pump took).
async fn pump(inner: Weak<RecvInner>, consumer: Arc<KConsumer>, closed: CancellationToken) {
    // What this pump paused, resumed once there is room again. A partition
    // stays paused across a revoke and a new assignment, so everything
    // paused is resumed, assigned or not.
    let mut paused = TopicPartitionList::new();
    let mut full_since: Option<tokio::time::Instant> = None;
    loop {
        let r = {
            let Some(i) = inner.upgrade() else { return };
            let space_signal = Arc::clone(&i.space);
            let space = space_signal.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            let full = {
                let st = i.shared.state();
                st.ready.len() >= i.prefetch || st.held.len() >= MAX_HELD
            };
            drop(i);
            if full {
                let since = *full_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() < PAUSE_AFTER {
                    // Usually the application makes room soon: pausing
                    // would throw away what librdkafka fetched ahead.
                    tokio::select! {
                        () = &mut space => {}
                        () = closed.cancelled() => return,
                        // Held records come due with time, not with a signal.
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    continue;
                }
                pause_assignment(&consumer, &mut paused);
                tokio::select! {
                    biased;
                    () = closed.cancelled() => return,
                    () = &mut space => continue,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    // Rebalances and errors; a record that was already on
                    // its way is admitted all the same.
                    r = consumer.recv() => r,
                }
            } else {
                full_since = None;
                if paused.count() > 0 {
                    if let Err(e) = consumer.resume(&paused) {
                        tracing::warn!(error = %e, "kafka: resuming paused partitions failed");
                    }
                    paused = TopicPartitionList::new();
                }
                tokio::select! {
                    biased;
                    () = closed.cancelled() => return,
                    r = consumer.recv() => r,
                }
            }
        };
        let Some(i) = inner.upgrade() else { return };
        // What librdkafka already has queued comes along without waiting:
        // one lock and one wake-up per run of records, not per record.
        let mut run = Vec::with_capacity(PUMP_RUN);
        let mut next = Some(r);
        while let Some(r) = next.take() {
            match r {
                Ok(record) => {
                    if let Some(part) = i.shared.names.part(record.topic(), record.partition()) {
                        run.push((part, record.offset(), codec::decode(&record, part.0)));
                    }
                }
                Err(e) => {
                    // Transient (a broker restarting, a topic being
                    // created): librdkafka recovers by itself. Except a
                    // subscribed topic the broker does not know (librdkafka
                    // says so once, then revokes its partitions and waits):
                    // deleted, or not visible yet (new, or metadata lagging
                    // on this broker); `watch_topic` tells which.
                    tracing::debug!(error = %e, "kafka: consumer error");
                    if names_a_missing_topic(&e) {
                        i.watch_topic(e.clone());
                    }
                    if matches!(e, KafkaError::MessageConsumptionFatal(_)) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    break;
                }
            }
            if run.len() < PUMP_RUN {
                next = consumer.recv().now_or_never();
            }
        }
        if run.is_empty() {
            continue;
        }
        let (admitted, commit) = i.admit(run);
        if commit {
            i.commit.notify_one();
        }
        if admitted {
            i.wake.notify_one();
        }
    }
}

/// Pauses the assigned partitions not paused yet, adding them to `paused`.
fn pause_assignment(consumer: &KConsumer, paused: &mut TopicPartitionList) {
    let Ok(assigned) = consumer.assignment() else {
        return;
    };
    let mut fresh = TopicPartitionList::new();
    for e in assigned.elements() {
        if paused.find_partition(e.topic(), e.partition()).is_none() {
            fresh.add_partition(e.topic(), e.partition());
        }
    }
    if fresh.count() == 0 {
        return;
    }
    match consumer.pause(&fresh) {
        Ok(()) => {
            for e in fresh.elements() {
                paused.add_partition(e.topic(), e.partition());
            }
        }
        Err(e) => tracing::debug!(error = %e, "kafka: pausing partitions failed"),
    }
}

/// Whether a consumer error says that a topic is unknown to the broker.
fn names_a_missing_topic(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownTopicId
        )
    )
}

/// What one metadata reading said about a topic.
enum Seen {
    Present,
    /// Unknown to the broker: why.
    Missing(String),
}

/// Reads `topic`'s metadata (blocking) with a consumer handle, which never
/// asks the broker to create a topic it does not know (a producer handle
/// would, on a cluster with `auto.create.topics.enable`).
fn look_up(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Result<Seen> {
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| kafka_error("reading topic metadata", e))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(Seen::Missing("not listed".into()));
    };
    match t.error().map(RDKafkaErrorCode::from) {
        Some(
            code @ (RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownTopicId),
        ) => Ok(Seen::Missing(code.to_string())),
        // Known (an error such as no leader yet is about its partitions).
        _ => Ok(Seen::Present),
    }
}

/// Confirms, after the consumer reported the subscription's topic unknown,
/// that it is really gone: two metadata readings without it, at least
/// [`GONE_CONFIRM`] apart (right after a topic is created, or on a broker
/// whose metadata lags, one reading can miss it). A reading that finds the
/// topic ends the watch; one the broker does not answer (restarting,
/// unreachable) starts the confirmation over, so a broker restart or a
/// network cut stays a transient fault. Once confirmed, every `recv` returns
/// [`Error::NotFound`].
async fn watch_topic(inner: Weak<RecvInner>, cause: KafkaError) {
    let mut missing_since: Option<Instant> = None;
    loop {
        let (shared, bound, closed) = {
            let Some(i) = inner.upgrade() else { return };
            (
                Arc::clone(&i.shared),
                i.broker.config.request_timeout,
                i.core.token().clone(),
            )
        };
        if closed.is_cancelled() {
            return;
        }
        let topic = shared.names.topic.clone();
        let reader = Arc::clone(&shared);
        let seen = blocking("reading topic metadata", bound + Duration::from_secs(1), {
            move || look_up(&reader.journal.heads, &topic, bound)
        })
        .await;
        match seen {
            Ok(Seen::Present) => {
                if let Some(i) = inner.upgrade() {
                    i.watching.store(false, std::sync::atomic::Ordering::SeqCst);
                }
                return;
            }
            Ok(Seen::Missing(why)) => match missing_since {
                Some(since) if since.elapsed() >= GONE_CONFIRM => {
                    let Some(i) = inner.upgrade() else { return };
                    tracing::warn!(topic = %shared.names.topic, %why, "kafka: the subscription's topic was deleted");
                    let message =
                        format!("deleted (two metadata readings {GONE_CONFIRM:?} apart: {why})");
                    i.state().gone = Some((message, cause));
                    i.wake.notify_one();
                    return;
                }
                Some(_) => {}
                None => missing_since = Some(Instant::now()),
            },
            Err(e) => {
                tracing::debug!(error = %e, "kafka: checking whether the topic exists failed; trying again");
                missing_since = None;
            }
        }
        tokio::select! {
            () = closed.cancelled() => return,
            () = tokio::time::sleep(GONE_CONFIRM) => {}
        }
    }
}

impl RecvInner {
    /// Starts a [`watch_topic`] unless one runs or the topic is known gone.
    fn watch_topic(self: &Arc<Self>, cause: KafkaError) {
        if self.state().gone.is_some()
            || self
                .watching
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        tokio::spawn(watch_topic(Arc::downgrade(self), cause));
    }

    fn consumer(&self) -> Option<Arc<KConsumer>> {
        lock(&self.consumer).clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }

    /// Registers fetched records under one lock; returns whether any was
    /// admitted and whether the committer must be woken: a skipped record
    /// (settled before) is committed soon.
    fn admit(&self, run: Vec<(Part, i64, codec::Decoded)>) -> (bool, bool) {
        let mut st = self.state();
        let now_ms = codec::unix_ms(SystemTime::now());
        let (mut admitted, mut skipped) = (false, false);
        for (part, offset, decoded) in run {
            if st.admit_one(&self.target, now_ms, part, offset, decoded) {
                admitted = true;
            } else {
                skipped = true;
            }
        }
        let first = skipped && self.commit_soon(&mut st);
        (admitted, first)
    }

    /// Hands out an admitted record (under the state lock) that its gate
    /// let go.
    fn hand_out(self: &Arc<Self>, st: &mut State, a: Admitted) -> RawDelivery {
        if let Some((_, track)) = st.tracks.get_mut(&a.part) {
            track.handed(a.offset, a.redeliveries);
        }
        let token = st.next_token;
        st.next_token += 1;
        let attempt = a.attempt.saturating_add(a.redeliveries);
        st.handed.insert(
            token,
            Handed {
                part: a.part,
                epoch: a.epoch,
                offset: a.offset,
                message: a.message.clone(),
                attempt,
                deadline: Instant::now() + self.ack_timeout,
                busy: false,
            },
        );
        RawDelivery {
            message: a.message,
            attempt,
            acker: Box::new(KafkaAcker {
                inner: Arc::downgrade(self),
                token,
            }),
        }
    }

    /// The next record to hand out, if there is room and one may go (in
    /// each partition's order); else a journal write one needs first, or
    /// nothing (and when the next held record is due).
    fn take(self: &Arc<Self>) -> std::result::Result<RawDelivery, Next> {
        let (d, ahead) = self.take_one()?;
        if let Some((part, epoch, write)) = ahead {
            let inner = Arc::clone(self);
            tokio::spawn(async move {
                if let Err(e) = inner.record(part, epoch, write).await {
                    tracing::debug!(error = %e, "kafka: a journal reservation ahead of need failed");
                }
                inner.wake.notify_one();
            });
        }
        Ok(d)
    }

    /// [`take`](Self::take), and a journal write to start in the background.
    #[allow(clippy::type_complexity)]
    fn take_one(
        self: &Arc<Self>,
    ) -> std::result::Result<(RawDelivery, Option<(Part, u64, Write)>), Next> {
        let mut st = self.state();
        if let Some(e) = st.gone_error(&self.shared.names) {
            return Err(Next::Gone(e));
        }
        if st.closed || st.handed.len() >= self.prefetch {
            return Err(Next::Idle(None));
        }
        // The clock only for held records (retries due later).
        let now_ms = if st.held.is_empty() {
            0
        } else {
            codec::unix_ms(SystemTime::now())
        };
        // Records of stale assignments are dropped on the way.
        let gate = |st: &State, a: &Admitted| {
            st.tracks
                .get(&a.part)
                .filter(|(e, _)| *e == a.epoch)
                .map(|(_, t)| t.gate(a.offset, a.redeliveries))
        };
        while let Some(h) = st.held.peek() {
            if h.0.due_ms > now_ms {
                break;
            }
            match gate(&st, &h.0) {
                None => {
                    st.held.pop();
                }
                Some(Gate::Go) => {
                    let a = st.held.pop().expect("peeked").0;
                    return Ok((self.hand_out(&mut st, a), None));
                }
                Some(Gate::Ahead(w)) => {
                    let a = st.held.pop().expect("peeked").0;
                    return Ok(self.hand_out_ahead(&mut st, a, w));
                }
                Some(Gate::Record(w)) => return Err(Next::Record(h.0.part, h.0.epoch, w)),
                Some(Gate::Wait) => break,
            }
        }
        let mut waiting: Vec<Part> = Vec::new();
        let mut i = 0;
        while i < st.ready.len() {
            let a = &st.ready[i];
            if waiting.contains(&a.part) {
                i += 1;
                continue;
            }
            match gate(&st, a) {
                None => {
                    st.ready.remove(i);
                }
                Some(gate @ (Gate::Go | Gate::Ahead(_))) => {
                    let a = st.ready.remove(i).expect("in range");
                    // The pump refills from half full: one wake-up per half
                    // prefetch of records, not one per record.
                    if st.ready.len() == self.prefetch / 2 {
                        self.space.notify_one();
                    }
                    return Ok(match gate {
                        Gate::Ahead(w) => self.hand_out_ahead(&mut st, a, w),
                        _ => (self.hand_out(&mut st, a), None),
                    });
                }
                Some(Gate::Record(w)) => return Err(Next::Record(a.part, a.epoch, w)),
                Some(Gate::Wait) => {
                    waiting.push(a.part);
                    i += 1;
                }
            }
        }
        Err(Next::Idle(st.held.peek().map(|h| h.0.due_ms)))
    }

    /// Hands out a record whose gate starts a journal write.
    fn hand_out_ahead(
        self: &Arc<Self>,
        st: &mut State,
        a: Admitted,
        write: Write,
    ) -> (RawDelivery, Option<(Part, u64, Write)>) {
        let (part, epoch) = (a.part, a.epoch);
        if let Some((_, track)) = st.tracks.get_mut(&part) {
            track.recording(write);
        }
        (self.hand_out(st, a), Some((part, epoch, write)))
    }

    /// Writes a journal entry (and, before a suspect, the partition's
    /// settled offsets), then lets the gate know.
    async fn record(self: &Arc<Self>, part: Part, epoch: u64, write: Write) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        let consumer = self.consumer();
        let bound = self.broker.config.request_timeout;
        let done = blocking("writing the delivery journal", bound, move || {
            if let (Write::Head { .. }, Some(c)) = (write, consumer) {
                let tpl = shared.state().commit_list(&shared.names, Some(&[part]));
                if tpl.count() > 0 {
                    c.commit(&tpl, CommitMode::Sync)
                        .map_err(|e| kafka_error("committing before a redelivery", e))?;
                }
            }
            shared
                .journal
                .write(&shared.names, part, write)
                .map_err(|e| kafka_error("writing the delivery journal", e))
        })
        .await;
        if let Some((e, track)) = self.state().tracks.get_mut(&part)
            && *e == epoch
        {
            track.recorded(write, done.is_ok());
        }
        done
    }

    async fn recv(self: &Arc<Self>) -> Option<Result<RawDelivery>> {
        let _one = self.core.enter().await?;
        loop {
            if self.core.is_closed() {
                return None;
            }
            let wake = self.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let next_due = match self.take() {
                Ok(d) => return Some(Ok(d)),
                Err(Next::Gone(e)) => return Some(Err(e)),
                Err(Next::Record(part, epoch, write)) => {
                    if let Err(e) = self.record(part, epoch, write).await {
                        if !e.is_retryable() {
                            // Denied, say: the application must know.
                            return Some(Err(e));
                        }
                        // The records wait (their counts must be durable
                        // first); the broker is probably restarting.
                        tracing::warn!(error = %e, "kafka: writing the delivery journal failed; retrying");
                        if !self.core.pause(JOURNAL_RETRY).await {
                            return None;
                        }
                    }
                    continue;
                }
                Err(Next::Idle(due)) => due,
            };
            let sleep = async {
                match next_due {
                    Some(due) => {
                        let wait = due - codec::unix_ms(SystemTime::now());
                        let wait = u64::try_from(wait.max(1)).unwrap_or(1);
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.core.token().cancelled() => return None,
                () = &mut wake => {}
                () = sleep => {}
            }
        }
    }

    /// A record ready now, without waiting (the hot path of `recv`; a
    /// record that needs a journal write first is left to `recv`).
    fn try_recv(self: &Arc<Self>) -> Option<Result<RawDelivery>> {
        // A `recv` in progress owns the hand-out; it will see the record.
        let _one = self.core.try_enter()?;
        match self.take() {
            Ok(d) => Some(Ok(d)),
            Err(Next::Gone(e)) => Some(Err(e)),
            Err(_) => None,
        }
    }

    /// Arms the next commit for a settlement (under the state lock);
    /// `true` for the first since the last commit, whose committer must be
    /// woken (once the lock is released).
    fn commit_soon(&self, st: &mut State) -> bool {
        if st.commit_due.is_some() {
            return false;
        }
        st.commit_due = Some(tokio::time::Instant::now() + self.commit_interval);
        true
    }

    /// Settles a handed-out delivery for good.
    fn settle(&self, token: u64) -> Result<()> {
        let st = self.state();
        if st.closed {
            return Err(Error::Closed);
        }
        // Gone: expired (re-published by the reaper) or its partition was
        // revoked (the new owner delivers it). Nothing left to do.
        self.release(st, &[token]);
        Ok(())
    }

    /// Settles handed-out deliveries: frees their prefetch slots, advances
    /// their partitions' offsets, and wakes `recv` and the committer.
    fn release(&self, mut st: MutexGuard<'_, State>, tokens: &[u64]) {
        let mut any = false;
        for token in tokens {
            if let Some(h) = st.handed.remove(token) {
                st.settle(h.part, h.epoch, h.offset);
                any = true;
            }
        }
        let first = any && self.commit_soon(&mut st);
        drop(st);
        if any {
            if self
                .shared
                .draining
                .load(std::sync::atomic::Ordering::SeqCst)
                > 0
            {
                self.shared.settled.notify_all();
            }
            self.wake.notify_one();
        }
        if first {
            self.commit.notify_one();
        }
    }

    /// Re-publishes a delivery to the retry topic with the next attempt,
    /// due after `delay`, then settles the original.
    async fn requeue(&self, token: u64, delay: Duration) -> Result<()> {
        let (message, attempt) = {
            let mut st = self.state();
            if st.closed {
                return Err(Error::Closed);
            }
            match st.handed.get_mut(&token) {
                Some(h) if !h.busy => {
                    h.busy = true;
                    (h.message.clone(), h.attempt)
                }
                _ => return Ok(()),
            }
        };
        match self.publish_retry(&message, attempt, delay).await {
            Ok(()) => {
                self.release(self.state(), &[token]);
                Ok(())
            }
            Err(e) => {
                if let Some(h) = self.state().handed.get_mut(&token) {
                    h.busy = false;
                }
                Err(e)
            }
        }
    }

    async fn publish_retry(&self, message: &Message, attempt: u32, delay: Duration) -> Result<()> {
        retry(
            &self.broker,
            &self.shared.names.retry,
            &self.target,
            message,
            attempt,
            delay,
        )
        .await
    }

    /// Stops fetching, hands what is still out back to the subscription
    /// (re-published with the next attempt), commits and leaves the group.
    pub(crate) async fn hand_back(&self) -> Result<()> {
        if self.shut.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        // A pending `recv` sees the token and returns `None`; one parked
        // (not being polled) does when next polled.
        self.core.close();
        let consumer = lock(&self.consumer).take();
        finish(
            Arc::clone(&self.broker),
            Arc::clone(&self.shared),
            self.target.clone(),
            consumer,
        )
        .await
    }
}

async fn retry(
    broker: &BrokerInner,
    retry_topic: &str,
    target: &str,
    message: &Message,
    attempt: u32,
    delay: Duration,
) -> Result<()> {
    let retry = Retry {
        target: target.to_owned(),
        attempt: attempt.saturating_add(1),
        due_ms: codec::due_ms(SystemTime::now() + delay),
    };
    broker.publish_retry(retry_topic, message, retry).await
}

/// The end of a receiver: unsettled deliveries go back to the subscription
/// as retry records (next attempt, due now), settled offsets are committed,
/// and the consumer leaves the group. Later acks of those deliveries fail
/// with [`Error::Closed`].
async fn finish(
    broker: Arc<BrokerInner>,
    shared: Arc<Shared>,
    target: String,
    consumer: Option<Arc<KConsumer>>,
) -> Result<()> {
    let out: Vec<Handed> = {
        let mut st = shared.state();
        st.closed = true;
        st.ready.clear();
        st.held.clear();
        let out: Vec<Handed> = st.handed.drain().map(|(_, h)| h).collect();
        shared.settled.notify_all();
        out.into_iter()
            .filter(|h| !h.busy && st.is_current(h.part, h.epoch))
            .collect()
    };
    let bound = broker.config.publish_timeout;
    let returned = tokio::time::timeout(
        bound,
        futures_util::future::join_all(out.iter().map(|h| {
            retry(
                &broker,
                &shared.names.retry,
                &target,
                &h.message,
                h.attempt,
                Duration::ZERO,
            )
        })),
    )
    .await
    .unwrap_or_default();
    {
        // Settle what went back; anything else stays unsettled and the next
        // owner delivers it again.
        let mut st = shared.state();
        for (h, r) in out.iter().zip(returned.iter()) {
            if r.is_ok() {
                st.settle(h.part, h.epoch, h.offset);
            }
        }
    }
    let Some(consumer) = consumer else {
        return Ok(());
    };
    // The commits and the leave share one request timeout: on a dead
    // network a close returns after `publish_timeout + request_timeout`
    // (what was not committed is delivered again to the next owner; the
    // consumer leaves the group in the background).
    let bound = broker.config.request_timeout;
    blocking("closing a Kafka consumer", bound, move || {
        let (tpl, releases) = {
            let mut st = shared.state();
            let parts: Vec<Part> = st.tracks.keys().copied().collect();
            let tpl = st.commit_list(&shared.names, Some(&parts));
            let releases = st.releases(None);
            st.tracks.clear();
            (tpl, releases)
        };
        shared.journal.release(&shared.names, &releases);
        let committed = if tpl.count() > 0 {
            consumer
                .commit(&tpl, CommitMode::Sync)
                .map_err(|e| kafka_error("committing on close", e))
        } else {
            Ok(())
        };
        close_consumer(consumer);
        committed
    })
    .await
}

/// How long a revoke waits for the application's deliveries (see
/// [`Ctx::drain`]): half of the consumer's `max.poll.interval.ms`
/// (librdkafka's default 300 s), which is also the time the group gives a
/// member to rejoin.
fn revoke_grace(config: &crate::KafkaConfig) -> Duration {
    let interval_ms = config
        .properties
        .get("max.poll.interval.ms")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(300_000);
    Duration::from_millis(interval_ms / 2)
}

/// Drops the last handle on a consumer (which leaves the group), waiting
/// briefly for tasks that still hold a clone.
fn close_consumer(mut consumer: Arc<KConsumer>) {
    for _ in 0..1000 {
        match Arc::try_unwrap(consumer) {
            Ok(c) => {
                drop(c);
                return;
            }
            Err(c) => {
                consumer = c;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

impl Drop for RecvInner {
    fn drop(&mut self) {
        self.core.close();
        if self.shut.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let consumer = self
            .consumer
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let work = finish(
            Arc::clone(&self.broker),
            Arc::clone(&self.shared),
            self.target.clone(),
            consumer,
        );
        // Dropped without close: the same hand-back, in the background.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = work.await {
                    tracing::warn!(error = %e, "kafka: closing a dropped receiver failed");
                }
            });
        }
    }
}

/// Commits settled offsets shortly after acks, coalescing them (see
/// `State::commit_due`).
async fn committer(inner: Weak<RecvInner>) {
    loop {
        let (signal, closed, due) = {
            let Some(i) = inner.upgrade() else { return };
            (
                Arc::clone(&i.commit),
                i.core.token().clone(),
                i.state().commit_due,
            )
        };
        let Some(due) = due else {
            // Nothing waits: until the first settlement (its `notify_one`
            // is kept for this wait if it comes first).
            if closed
                .run_until_cancelled(signal.notified())
                .await
                .is_none()
            {
                return;
            }
            continue;
        };
        if closed
            .run_until_cancelled(tokio::time::sleep_until(due))
            .await
            .is_none()
        {
            return;
        }
        let Some(i) = inner.upgrade() else { return };
        let Some(consumer) = i.consumer() else { return };
        let mut st = i.state();
        st.commit_due = None;
        let tpl = st.commit_list(&i.shared.names, None);
        if tpl.count() > 0 {
            // Under the lock: a revoke's synchronous commit never overtakes it.
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(error = %e, "kafka: commit failed");
            }
        }
    }
}

/// Re-publishes deliveries that outlived the ack timeout (with the next
/// attempt) and settles the originals; a late ack of one is a no-op.
async fn reaper(inner: Weak<RecvInner>) {
    let (tick, closed) = match inner.upgrade() {
        Some(i) => (
            (i.ack_timeout / 10).clamp(Duration::from_millis(5), Duration::from_secs(1)),
            i.core.token().clone(),
        ),
        None => return,
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = closed.cancelled() => return,
        }
        let Some(i) = inner.upgrade() else { return };
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut revoked = Vec::new();
        {
            let mut st = i.state();
            let stale: Vec<u64> = st
                .handed
                .iter()
                .filter(|(_, h)| !h.busy && h.deadline <= now)
                .map(|(t, _)| *t)
                .collect();
            for token in stale {
                let current = {
                    let h = &st.handed[&token];
                    st.is_current(h.part, h.epoch)
                };
                if current {
                    if let Some(h) = st.handed.get_mut(&token) {
                        h.busy = true;
                        expired.push((token, h.message.clone(), h.attempt));
                    }
                } else {
                    // Revoked: the new owner delivers it; free the slot.
                    revoked.push(token);
                }
            }
            i.release(st, &revoked);
        }
        let results = futures_util::future::join_all(
            expired
                .iter()
                .map(|(_, m, attempt)| i.publish_retry(m, *attempt, Duration::ZERO)),
        )
        .await;
        let mut st = i.state();
        let mut returned = Vec::with_capacity(expired.len());
        for ((token, _, _), r) in expired.into_iter().zip(results) {
            match r {
                Ok(()) => returned.push(token),
                Err(e) => {
                    tracing::warn!(error = %e, "kafka: re-publishing an expired delivery failed");
                    if let Some(h) = st.handed.get_mut(&token) {
                        h.busy = false;
                        h.deadline = Instant::now() + REAP_RETRY;
                    }
                }
            }
        }
        i.release(st, &returned);
    }
}

#[async_trait]
impl SharedReceiver for RecvInner {
    async fn recv(this: &Arc<Self>) -> Option<Result<RawDelivery>> {
        this.recv().await
    }

    fn try_recv(this: &Arc<Self>) -> Option<Result<RawDelivery>> {
        this.try_recv()
    }

    async fn shutdown(&self) -> Result<()> {
        self.hand_back().await
    }

    /// Stops receiving; the hand-back runs when the last handle on the
    /// receiver goes (see its `Drop`).
    fn dropped(&self) {
        self.core.close();
    }
}

struct KafkaAcker {
    inner: Weak<RecvInner>,
    token: u64,
}

impl fmt::Debug for KafkaAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaAcker")
            .field("token", &self.token)
            .finish()
    }
}

impl KafkaAcker {
    fn settle(&self) -> Result<()> {
        self.inner
            .upgrade()
            .ok_or(Error::Closed)?
            .settle(self.token)
    }
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(&self) -> Result<()> {
        self.settle()
    }

    /// Settling is bookkeeping under the state lock (the committer commits
    /// the offsets later): done in place.
    fn ack_now(&self) -> Option<Result<()>> {
        Some(self.settle())
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        let inner = self.inner.upgrade().ok_or(Error::Closed)?;
        inner
            .requeue(self.token, delay.unwrap_or(Duration::ZERO))
            .await
    }

    /// Moves the reaper's deadline for the record to an ack timeout from now
    /// (one already being re-published is not revived).
    async fn extend(&self) -> Result<()> {
        let inner = self.inner.upgrade().ok_or(Error::Closed)?;
        let mut st = inner.state();
        if st.closed {
            return Err(Error::Closed);
        }
        if let Some(h) = st.handed.get_mut(&self.token)
            && !h.busy
        {
            h.deadline = Instant::now() + inner.ack_timeout;
        }
        Ok(())
    }
}
