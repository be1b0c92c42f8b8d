//! The conformance cases: one `pub async fn` each, panicking on failure.
//!
//! Every case uses fresh topics and subscriptions ([`Harness::unique`]) and
//! bounded waits ([`Harness::receive_timeout`]).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use switchyard_core::{
    Client, Error, Headers, KeyOrdering, Message, NameKind, Retry, SubscribeOptions, Subscription,
    driver::Broker, headers,
};

use crate::{
    Harness, Outcome,
    util::{
        collect_acked, expect_no_new, expect_nothing, ids, noise, publish_batch_ok, publish_each,
        recv_one,
    },
};

struct Setup {
    client: Client,
    topic: String,
    opts: SubscribeOptions,
}

async fn client(h: &dyn Harness) -> Client {
    h.client()
        .await
        .unwrap_or_else(|e| panic!("connecting to the broker under test failed: {e}"))
}

/// A client, a fresh topic and an ensured subscription on it.
async fn setup(
    h: &dyn Harness,
    case: &str,
    opts: impl FnOnce(SubscribeOptions) -> SubscribeOptions,
) -> Setup {
    let client = client(h).await;
    let topic = h.unique(case);
    let opts = opts(SubscribeOptions::new(h.unique("sub")));
    client
        .ensure_subscription(&topic, &opts)
        .await
        .unwrap_or_else(|e| panic!("ensure_subscription failed: {e}"));
    Setup {
        client,
        topic,
        opts,
    }
}

async fn subscribe(client: &Client, topic: &str, opts: &SubscribeOptions) -> Subscription {
    client
        .subscribe(topic, opts.clone())
        .await
        .unwrap_or_else(|e| panic!("subscribe to {topic} failed: {e}"))
}

async fn dead_letters(client: &Client, topic: &str, opts: &SubscribeOptions) -> Subscription {
    let dlq = opts.dead_letter_topic_for(topic);
    subscribe(client, &dlq, &SubscribeOptions::dead_letters()).await
}

fn numbered(n: usize, prefix: &str) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(format!("{prefix}-{i}")))
        .collect()
}

/// 1. Publish 500 messages, receive exactly that set.
pub async fn publish_and_receive_set(h: &dyn Harness) -> Outcome {
    let s = setup(h, "publish-set", |o| o).await;
    let msgs = numbered(500, "m");
    let expected = ids(&msgs);
    publish_each(&s.client, &s.topic, msgs.clone()).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let got = collect_acked(&mut sub, &expected, h.receive_timeout(), "publish 500").await;
    let by_id: HashMap<_, _> = msgs.iter().map(|m| (m.id(), m)).collect();
    for (m, _) in &got {
        assert_eq!(
            m.payload(),
            by_id[m.id()].payload(),
            "payload of {} changed",
            m.id()
        );
    }
    expect_no_new(
        &mut sub,
        Duration::from_millis(300),
        &expected,
        "after the 500",
    )
    .await;
    Outcome::Passed
}

/// 2. Payloads round-trip byte-exact: empty, 1 byte, all 256 byte values,
///    invalid UTF-8, and one byte under the backend's limit.
pub async fn payload_fidelity(h: &dyn Harness) -> Outcome {
    let s = setup(h, "payloads", |o| o).await;
    let limit = s.client.capabilities().max_payload;
    let payloads: Vec<Vec<u8>> = vec![
        vec![],
        vec![0x42],
        (0..=255u8).collect(),
        vec![0xff, 0xfe, 0xc3, 0x28, 0xa0, 0xa1, 0xe2, 0x28, 0xa1, 0x00],
        b"plain text with \0 nul and \r\n".to_vec(),
        noise(limit - 1, 7),
    ];
    let msgs: Vec<Message> = payloads.iter().map(|p| Message::new(p.clone())).collect();
    publish_each(&s.client, &s.topic, msgs.clone()).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let got = collect_acked(&mut sub, &ids(&msgs), h.receive_timeout(), "payloads").await;
    let sent: HashMap<_, _> = msgs
        .iter()
        .map(|m| (m.id().to_owned(), m.payload().clone()))
        .collect();
    for (m, _) in got {
        let want = &sent[m.id()];
        assert!(
            m.payload() == want,
            "payload of {} bytes came back as {} bytes (or with other content)",
            want.len(),
            m.payload().len()
        );
    }
    Outcome::Passed
}

fn rich_headers() -> Headers {
    let mut h = Headers::new();
    let values = [
        "with spaces",
        "ünïcødé ✓ 漢字 🚀",
        "a=b=c",
        "k:v:w",
        "",
        "  leading and trailing  ",
        "quotes \" and ' and \\ backslash",
        "semi;colon,comma",
        "line\nbreak\ttab",
        "0",
    ];
    for i in 0..58 {
        h.insert(format!("h-{i:02}"), values[i % values.len()]);
    }
    // Header keys are case-sensitive: these are two headers.
    h.insert("Trace-Case", "upper");
    h.insert("trace-case", "lower");
    h
}

/// 3. Sixty headers with awkward values, the key and the id round-trip.
pub async fn header_fidelity(h: &dyn Harness) -> Outcome {
    let s = setup(h, "headers", |o| o).await;
    let headers = rich_headers();
    assert_eq!(headers.len(), 60);
    let id = format!("custom-id/{}:ü", crate::util::short_id());
    let msg = Message::new("h")
        .with_id(id.clone())
        .with_key("key with spaces/ü=:")
        .with_headers(headers.clone());
    let plain = Message::new("no headers");
    publish_each(&s.client, &s.topic, vec![msg, plain.clone()]).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let expected: HashSet<String> = [id.clone(), plain.id().to_owned()].into();
    for (m, _) in collect_acked(&mut sub, &expected, h.receive_timeout(), "headers").await {
        if m.id() == id {
            assert_eq!(m.key(), Some("key with spaces/ü=:"), "key changed");
            for (k, v) in headers.iter() {
                assert_eq!(m.headers().get(k), Some(v), "header {k:?} changed or lost");
            }
            assert_eq!(m.headers(), &headers, "extra headers appeared");
        } else {
            assert_eq!(m.key(), None, "a key appeared");
            assert!(
                m.headers().is_empty(),
                "headers appeared on a message without any"
            );
        }
    }
    Outcome::Passed
}

/// 4. Ids are generated when absent, unique, and kept by the broker.
pub async fn generated_ids(h: &dyn Harness) -> Outcome {
    let s = setup(h, "ids", |o| o).await;
    let msgs = numbered(100, "g");
    let expected = ids(&msgs);
    assert_eq!(expected.len(), 100, "generated ids are not unique");
    assert!(msgs.iter().all(|m| !m.id().is_empty()));
    publish_each(&s.client, &s.topic, msgs).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    collect_acked(&mut sub, &expected, h.receive_timeout(), "generated ids").await;
    Outcome::Passed
}

/// 5. An acked message is not redelivered, even to a new consumer after
///    close and reopen.
pub async fn ack_is_final(h: &dyn Harness) -> Outcome {
    let s = setup(h, "ack-final", |o| o.with_ack_timeout(h.ack_timeout())).await;
    let msgs = numbered(10, "a");
    publish_each(&s.client, &s.topic, msgs.clone()).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    collect_acked(&mut sub, &ids(&msgs), h.receive_timeout(), "first consumer").await;
    sub.close().await.expect("close");
    drop(sub);
    let other = client(h).await;
    let mut again = subscribe(&other, &s.topic, &s.opts).await;
    expect_nothing(
        &mut again,
        h.ack_timeout() + h.slack(),
        "acked messages after reopen",
    )
    .await;
    Outcome::Passed
}

/// 6. Nack redelivers with attempt + 1 and the identical message.
pub async fn nack_redelivers(h: &dyn Harness) -> Outcome {
    let s = setup(h, "nack", |o| o).await;
    let msg = Message::new(noise(300, 3))
        .with_key("k-1")
        .with_header("x-a", "1 = 1")
        .with_header("x-b", "");
    publish_each(&s.client, &s.topic, vec![msg.clone()]).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let first = recv_one(&mut sub, h.receive_timeout(), "first delivery").await;
    assert_eq!(first.attempt(), 1);
    assert_eq!(first.topic(), s.topic);
    assert_eq!(first.subscription(), s.opts.name());
    first.nack(Retry::now()).await.expect("nack");
    let second = recv_one(&mut sub, h.receive_timeout(), "redelivery after nack").await;
    assert_eq!(second.attempt(), 2, "attempt after one nack");
    let m = second.message();
    assert_eq!(m.id(), msg.id());
    assert_eq!(m.key(), msg.key());
    assert_eq!(m.headers(), msg.headers());
    assert_eq!(m.payload(), msg.payload());
    second.ack().await.expect("ack");
    Outcome::Passed
}

/// 7. Nack with a delay: not redelivered before the delay, and within
///    delay + slack.
pub async fn nack_with_delay(h: &dyn Harness) -> Outcome {
    let s = setup(h, "nack-delay", |o| o).await;
    let msg = Message::new("later");
    publish_each(&s.client, &s.topic, vec![msg.clone()]).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let d = recv_one(&mut sub, h.receive_timeout(), "first delivery").await;
    let delay = Duration::from_secs(2);
    let start = Instant::now();
    d.nack(Retry::after(delay)).await.expect("nack with delay");
    let again = recv_one(
        &mut sub,
        delay + h.slack() + h.receive_timeout(),
        "delayed redelivery",
    )
    .await;
    let waited = start.elapsed();
    assert_eq!(again.message().id(), msg.id());
    assert_eq!(again.attempt(), 2);
    assert!(
        waited >= delay,
        "redelivered after {waited:?}, before the {delay:?} delay"
    );
    assert!(
        waited <= delay + h.slack(),
        "redelivered after {waited:?}, later than {delay:?} + {:?}",
        h.slack()
    );
    again.ack().await.expect("ack");
    Outcome::Passed
}

/// 7b. Every attempt counts once, whatever mix of settlements led to it:
///     nack now, nack with a delay, nack now, nack with a delay → attempts
///     1, 2, 3, 4, 5. (Issue: RabbitMQ's delayed copy kept the broker's
///     stale `x-delivery-count`, so "nack now, then nack after 1 s" came
///     back as attempt 4.)
pub async fn attempts_count_each_nack_once(h: &dyn Harness) -> Outcome {
    let s = setup(h, "nack-mix", |o| o.with_max_attempts(10)).await;
    let msg = Message::new("again and again");
    publish_each(&s.client, &s.topic, vec![msg.clone()]).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let delay = Duration::from_millis(500);
    let bound = delay + h.slack() + h.receive_timeout();
    let retries = [
        Retry::now(),
        Retry::after(delay),
        Retry::now(),
        Retry::after(delay),
    ];
    let mut seen = Vec::new();
    for retry in retries {
        let d = recv_one(&mut sub, bound, "a redelivery").await;
        assert_eq!(d.message().id(), msg.id());
        seen.push(d.attempt());
        d.nack(retry).await.expect("nack");
    }
    let last = recv_one(&mut sub, bound, "the last redelivery").await;
    seen.push(last.attempt());
    last.ack().await.expect("ack");
    assert_eq!(
        seen,
        vec![1, 2, 3, 4, 5],
        "attempts after nack now / after {delay:?} / now / after {delay:?}"
    );
    Outcome::Passed
}

/// 8. A delivery dropped unsettled is redelivered after the ack timeout.
pub async fn unsettled_redelivered_after_ack_timeout(h: &dyn Harness) -> Outcome {
    let s = setup(h, "unsettled", |o| o.with_ack_timeout(h.ack_timeout())).await;
    let msg = Message::new("drop me");
    publish_each(&s.client, &s.topic, vec![msg.clone()]).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let d = recv_one(&mut sub, h.receive_timeout(), "first delivery").await;
    let start = Instant::now();
    drop(d);
    let bound = h.ack_timeout() + h.slack();
    let again = recv_one(&mut sub, bound, "redelivery of a dropped delivery").await;
    assert_eq!(again.message().id(), msg.id());
    assert_eq!(again.attempt(), 2);
    assert!(start.elapsed() <= bound);
    again.ack().await.expect("ack");
    Outcome::Passed
}

/// 8a. A delivery held past the ack timeout comes back (attempt 2); the
///     late settlement of the expired copy is harmless: it returns within
///     the receive timeout (`Ok`, or an error saying the lease was lost),
///     the redelivered copy's ack succeeds, the subscription keeps
///     delivering (an AMQP ack of an unknown tag would close the channel),
///     and the acked message does not come back.
pub async fn late_ack_after_ack_timeout_is_harmless(h: &dyn Harness) -> Outcome {
    let s = setup(h, "late-ack", |o| o.with_ack_timeout(h.ack_timeout())).await;
    let msg = Message::new("slow");
    publish_each(&s.client, &s.topic, vec![msg.clone()]).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let held = recv_one(&mut sub, h.receive_timeout(), "first delivery").await;
    let bound = h.ack_timeout() + h.slack();
    let again = recv_one(&mut sub, bound, "redelivery after the ack timeout").await;
    assert_eq!(again.message().id(), msg.id());
    assert_eq!(again.attempt(), 2);
    tokio::time::timeout(h.receive_timeout(), held.ack())
        .await
        .expect("the late ack of the expired copy returns")
        .ok();
    again.ack().await.expect("the ack of the redelivered copy");
    let next = Message::new("next");
    publish_each(&s.client, &s.topic, vec![next.clone()]).await;
    let d = recv_one(
        &mut sub,
        h.receive_timeout(),
        "a delivery after the late ack",
    )
    .await;
    assert_eq!(d.message().id(), next.id(), "the acked message came back");
    assert_eq!(d.attempt(), 1);
    d.ack().await.expect("ack");
    expect_nothing(&mut sub, bound, "after both acks").await;
    Outcome::Passed
}

/// 8b. A delivery whose holder extends its lease ([`Delivery::extend`]
///     every third of the ack timeout) is not redelivered for three ack
///     timeouts, and not after its ack either.
///
/// [`Delivery::extend`]: switchyard_core::Delivery::extend
pub async fn extend_keeps_the_lease(h: &dyn Harness) -> Outcome {
    let s = setup(h, "extend", |o| o.with_ack_timeout(h.ack_timeout())).await;
    let msg = Message::new("held");
    publish_each(&s.client, &s.topic, vec![msg.clone()]).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let d = recv_one(&mut sub, h.receive_timeout(), "first delivery").await;
    assert_eq!(d.message().id(), msg.id());
    let step = h.ack_timeout() / 3;
    for _ in 0..9 {
        d.extend().await.expect("extend");
        expect_nothing(&mut sub, step, "while the lease is extended").await;
    }
    d.ack().await.expect("ack");
    expect_nothing(
        &mut sub,
        h.ack_timeout() + h.slack(),
        "after the ack of an extended delivery",
    )
    .await;
    Outcome::Passed
}

/// 8c. Neither what a receiver prefetched and has not handed out, nor what
///     the application holds and extends, loses its lease when another
///     consumer joins (DESIGN §3.14, §3.15; a rolling deploy). Consumer A
///     holds one delivery, extending it, while consumer B of the same
///     subscription joins and then receives for three ack timeouts: every
///     message reaches the application once, at attempt 1, and none is
///     dead-lettered. (On SQS and NATS A's prefetched copies lapsed and came
///     to B at a raised count while A still handed out its stale copies; on Kafka
///     B's join revoked the held record's partition and B got it again at
///     attempt 2. With a lower `max_attempts`, healthy messages in the
///     dead-letter topic.)
pub async fn prefetched_deliveries_keep_their_lease(h: &dyn Harness) -> Outcome {
    let s = setup(h, "prefetch-lease", |o| {
        o.with_ack_timeout(h.ack_timeout())
            .with_prefetch(4)
            .with_max_attempts(2)
    })
    .await;
    if !s.client.capabilities().competing_consumers {
        return Outcome::Skipped("backend has no competing consumers".into());
    }
    let msgs = numbered(5, "pl");
    publish_each(&s.client, &s.topic, msgs.clone()).await;
    let mut a = subscribe(&s.client, &s.topic, &s.opts).await;
    // A first delivery, settled, opens a receiver that starts one message at
    // a time (after a crash); the next receive fetches the whole prefetch.
    let first = recv_one(&mut a, h.receive_timeout(), "consumer A").await;
    let mut seen: Vec<(String, u32)> = vec![(first.message().id().to_owned(), first.attempt())];
    first.ack().await.expect("ack of the first delivery");
    let held = recv_one(&mut a, h.receive_timeout(), "consumer A").await;
    seen.push((held.message().id().to_owned(), held.attempt()));
    let step = h.ack_timeout() / 3;
    // A works on what it holds (extending it) all along: while B connects
    // and joins (on Kafka a rebalance, which takes the held record's
    // partition from A) and for three ack timeouts after.
    let extending = async {
        loop {
            held.extend().await.expect("extend");
            tokio::time::sleep(step).await;
        }
    };
    let joining = async {
        // Let A prefetch the rest, where it does.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let b_client = client(h).await;
        let b = subscribe(&b_client, &s.topic, &s.opts).await;
        (b_client, b)
    };
    let (_b_client, mut b) = tokio::select! {
        joined = joining => joined,
        () = extending => unreachable!("extends until B joined"),
    };
    for _ in 0..9 {
        held.extend().await.expect("extend");
        let until = tokio::time::Instant::now() + step;
        while let Ok(got) = tokio::time::timeout_at(until, b.recv()).await {
            let d = got.unwrap_or_else(|e| panic!("consumer B: receive failed: {e}"));
            seen.push((d.message().id().to_owned(), d.attempt()));
            d.ack().await.expect("ack by B");
        }
    }
    held.ack().await.expect("ack of the held delivery");
    // A hands out what it prefetched; B takes what A did not.
    let left: HashSet<String> = ids(&msgs)
        .into_iter()
        .filter(|id| !seen.iter().any(|(s, _)| s == id))
        .collect();
    let until = tokio::time::Instant::now() + h.receive_timeout();
    let mut got_left = HashSet::new();
    while got_left.len() < left.len() {
        let d = tokio::select! {
            d = a.recv() => d,
            d = b.recv() => d,
            () = tokio::time::sleep_until(until) => panic!(
                "{} of {} prefetched messages missing: seen {seen:?}",
                left.len() - got_left.len(),
                left.len()
            ),
        }
        .unwrap_or_else(|e| panic!("receive failed: {e}"));
        got_left.insert(d.message().id().to_owned());
        seen.push((d.message().id().to_owned(), d.attempt()));
        d.ack().await.expect("ack");
    }
    // Anything more (a copy taken back and redelivered) within the slack.
    let quiet = tokio::time::Instant::now() + h.slack();
    loop {
        let d = tokio::select! {
            d = a.recv() => d,
            d = b.recv() => d,
            () = tokio::time::sleep_until(quiet) => break,
        }
        .unwrap_or_else(|e| panic!("receive failed: {e}"));
        seen.push((d.message().id().to_owned(), d.attempt()));
        d.ack().await.expect("ack");
    }
    let charged: Vec<&(String, u32)> = seen.iter().filter(|(_, n)| *n != 1).collect();
    assert!(
        charged.is_empty(),
        "prefetched deliveries lost their lease and came back as redeliveries: {seen:?}"
    );
    assert_eq!(
        seen.len(),
        msgs.len(),
        "a message reached the application twice: {seen:?}"
    );
    crate::runtime::expect_no_dead_letters(
        &s.client,
        &s.topic,
        &s.opts,
        h.slack(),
        "prefetched deliveries",
    )
    .await;
    a.close().await.expect("close A");
    b.close().await.expect("close B");
    Outcome::Passed
}

/// 9. Closing a subscription with unsettled deliveries hands them to
///    another consumer.
pub async fn close_hands_over_unsettled(h: &dyn Harness) -> Outcome {
    let s = setup(h, "handover", |o| o.with_ack_timeout(h.ack_timeout())).await;
    if !s.client.capabilities().competing_consumers {
        return Outcome::Skipped("backend has no competing consumers".into());
    }
    let msgs = numbered(3, "h");
    publish_each(&s.client, &s.topic, msgs.clone()).await;
    let mut a = subscribe(&s.client, &s.topic, &s.opts).await;
    let held = recv_one(&mut a, h.receive_timeout(), "consumer A").await;
    let b_client = client(h).await;
    let mut b = subscribe(&b_client, &s.topic, &s.opts).await;
    a.close().await.expect("close A");
    let bound = h.ack_timeout() + h.slack() + h.receive_timeout();
    let got = collect_acked(&mut b, &ids(&msgs), bound, "consumer B").await;
    assert!(got.iter().any(|(m, _)| m.id() == held.message().id()));
    drop(held);
    Outcome::Passed
}

/// Closing a subscription hands back what it held at once — the delivery
/// it handed out and never settled, and whatever it prefetched — well
/// before the ack timeout (30 s here); a delivery the application never saw
/// comes back at attempt 1 where the broker lets it
/// (`!returns_count_attempts`), at 2 at most where it counts every return;
/// the one handed out comes back at attempt 2 (DESIGN §3.12, §3.14).
pub async fn close_returns_held_at_once(h: &dyn Harness) -> Outcome {
    let s = setup(h, "close-returns", |o| {
        o.with_ack_timeout(Duration::from_secs(30))
            .with_prefetch(10)
    })
    .await;
    let msgs = numbered(5, "cr");
    publish_each(&s.client, &s.topic, msgs.clone()).await;
    let mut a = subscribe(&s.client, &s.topic, &s.opts).await;
    let seen = recv_one(&mut a, h.receive_timeout(), "first delivery").await;
    let seen_id = seen.message().id().to_owned();
    // Let the receiver prefetch the rest, where it does.
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.close().await.expect("close");
    drop(seen);
    let started = tokio::time::Instant::now();
    let mut b = subscribe(&s.client, &s.topic, &s.opts).await;
    let bound = crate::runtime::RETURNED_WITHIN;
    let got = collect_acked(&mut b, &ids(&msgs), bound, "after close").await;
    eprintln!(
        "close_returns_held_at_once: all {} back {:?} after the close",
        msgs.len(),
        started.elapsed()
    );
    let counted = s.client.capabilities().returns_count_attempts;
    for (m, attempt) in &got {
        if m.id() == seen_id {
            assert_eq!(*attempt, 2, "the delivery handed out and returned at close");
        } else if counted {
            assert!(*attempt <= 2, "{} came back at attempt {attempt}", m.id());
        } else {
            assert_eq!(*attempt, 1, "{} was never handed out but counted", m.id());
        }
    }
    assert!(started.elapsed() < bound);
    Outcome::Passed
}

/// 10. Nacking past max_attempts dead-letters with all `sy-*` headers, and
///     the source does not deliver it again.
pub async fn nack_past_max_attempts_dead_letters(h: &dyn Harness) -> Outcome {
    let s = setup(h, "max-attempts", |o| {
        o.with_max_attempts(3).with_ack_timeout(h.ack_timeout())
    })
    .await;
    let msg = Message::new("poison").with_key("p");
    publish_each(&s.client, &s.topic, vec![msg.clone()]).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    for attempt in 1..=3 {
        let d = recv_one(&mut sub, h.receive_timeout(), "poison delivery").await;
        assert_eq!(d.attempt(), attempt);
        d.nack(Retry::now()).await.expect("nack");
    }
    expect_nothing(
        &mut sub,
        h.ack_timeout() + h.slack(),
        "source after dead-lettering",
    )
    .await;
    let mut dlq = dead_letters(&s.client, &s.topic, &s.opts).await;
    let dead = recv_one(&mut dlq, h.receive_timeout(), "dead letter").await;
    let m = dead.message();
    assert_eq!(m.id(), msg.id());
    let hd = m.headers();
    assert_eq!(hd.get(headers::ORIGINAL_TOPIC), Some(s.topic.as_str()));
    assert_eq!(hd.get(headers::ORIGINAL_SUBSCRIPTION), Some(s.opts.name()));
    assert_eq!(hd.get(headers::ATTEMPTS), Some("3"));
    let reason = hd
        .get(headers::DEAD_LETTER_REASON)
        .expect("sy-dead-letter-reason");
    assert!(reason.contains("max attempts"), "reason {reason:?}");
    let at = hd
        .get(headers::DEAD_LETTERED_AT)
        .expect("sy-dead-lettered-at");
    humantime::parse_rfc3339(at)
        .unwrap_or_else(|e| panic!("sy-dead-lettered-at {at:?} is not RFC 3339: {e}"));
    dead.ack().await.expect("ack dead letter");
    Outcome::Passed
}

/// 11. `dead_letter(reason)` puts the reason in `sy-dead-letter-reason`.
pub async fn explicit_dead_letter_reason(h: &dyn Harness) -> Outcome {
    let s = setup(h, "explicit-dl", |o| o).await;
    let msg = Message::new("bad order");
    publish_each(&s.client, &s.topic, vec![msg.clone()]).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let d = recv_one(&mut sub, h.receive_timeout(), "delivery").await;
    let reason = "invalid order: missing sku ü=:";
    d.dead_letter(reason).await.expect("dead_letter");
    let mut dlq = dead_letters(&s.client, &s.topic, &s.opts).await;
    let dead = recv_one(&mut dlq, h.receive_timeout(), "dead letter").await;
    assert_eq!(dead.message().id(), msg.id());
    assert_eq!(
        dead.message().headers().get(headers::DEAD_LETTER_REASON),
        Some(reason)
    );
    assert_eq!(dead.message().headers().get(headers::ATTEMPTS), Some("1"));
    dead.ack().await.expect("ack");
    Outcome::Passed
}

/// 12. The dead letter keeps id, key, payload and headers, plus exactly the
///     five `sy-*` headers.
pub async fn dead_letter_keeps_message(h: &dyn Harness) -> Outcome {
    let s = setup(h, "dl-keeps", |o| o).await;
    let mut hs = rich_headers();
    hs.insert("x-extra", "kept");
    let msg = Message::new(noise(1000, 11))
        .with_key("order-9")
        .with_headers(hs.clone());
    publish_each(&s.client, &s.topic, vec![msg.clone()]).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    recv_one(&mut sub, h.receive_timeout(), "delivery")
        .await
        .dead_letter("keep everything")
        .await
        .expect("dead_letter");
    let mut dlq = dead_letters(&s.client, &s.topic, &s.opts).await;
    let dead = recv_one(&mut dlq, h.receive_timeout(), "dead letter").await;
    let m = dead.message();
    assert_eq!(m.id(), msg.id());
    assert_eq!(m.key(), msg.key());
    assert_eq!(m.payload(), msg.payload());
    for (k, v) in hs.iter() {
        assert_eq!(
            m.headers().get(k),
            Some(v),
            "header {k:?} lost in dead-lettering"
        );
    }
    assert_eq!(
        m.headers().len(),
        hs.len() + headers::DEAD_LETTER_HEADERS.len()
    );
    for k in headers::DEAD_LETTER_HEADERS {
        assert!(m.headers().contains_key(k), "{k} missing");
    }
    dead.ack().await.expect("ack");
    Outcome::Passed
}

/// 13. Redrive returns dead letters to the original topic with attempts
///     reset and without the `sy-*` headers.
pub async fn redrive_returns_dead_letters(h: &dyn Harness) -> Outcome {
    let s = setup(h, "redrive", |o| o).await;
    let msgs: Vec<Message> = (0..3)
        .map(|i| Message::new(format!("r{i}")).with_header("x-i", i.to_string()))
        .collect();
    publish_each(&s.client, &s.topic, msgs.clone()).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let mut seen = HashSet::new();
    while seen.len() < 3 {
        let d = recv_one(&mut sub, h.receive_timeout(), "delivery to dead-letter").await;
        seen.insert(d.message().id().to_owned());
        d.dead_letter("to be redriven").await.expect("dead_letter");
    }
    let moved = s
        .client
        .redrive(&s.topic, &s.opts, Some(3), h.receive_timeout())
        .await
        .expect("redrive");
    assert_eq!(moved, 3);
    let back = collect_acked(&mut sub, &ids(&msgs), h.receive_timeout(), "redriven").await;
    let sent: HashMap<_, _> = msgs.iter().map(|m| (m.id(), m)).collect();
    for (m, attempt) in back {
        assert_eq!(attempt, 1, "attempts not reset by redrive");
        assert_eq!(
            m.headers(),
            sent[m.id()].headers(),
            "sy-* headers not removed"
        );
        assert_eq!(m.payload(), sent[m.id()].payload());
    }
    Outcome::Passed
}

/// 14. Attempts survive consumer restarts; a message arriving past
///     max_attempts is dead-lettered without reaching the application.
pub async fn attempts_survive_restart(h: &dyn Harness) -> Outcome {
    let s = setup(h, "restart", |o| {
        o.with_max_attempts(2).with_ack_timeout(h.ack_timeout())
    })
    .await;
    let msg = Message::new("crashes its consumer");
    publish_each(&s.client, &s.topic, vec![msg.clone()]).await;
    let wait = h.ack_timeout() + h.slack() + h.receive_timeout();
    for attempt in 1..=2 {
        // A new connection each time: a restarted process.
        let c = client(h).await;
        let mut sub = subscribe(&c, &s.topic, &s.opts).await;
        let d = recv_one(&mut sub, wait, "delivery before crash").await;
        assert_eq!(d.message().id(), msg.id());
        assert_eq!(d.attempt(), attempt, "attempt count lost across a restart");
        // Crash: neither settle nor close.
        drop(d);
        drop(sub);
        drop(c);
    }
    let c = client(h).await;
    let mut sub = subscribe(&c, &s.topic, &s.opts).await;
    expect_nothing(
        &mut sub,
        h.ack_timeout() + h.slack(),
        "a message past max_attempts",
    )
    .await;
    let mut dlq = dead_letters(&c, &s.topic, &s.opts).await;
    let dead = recv_one(&mut dlq, h.receive_timeout(), "dead letter after restarts").await;
    assert_eq!(dead.message().id(), msg.id());
    assert_eq!(dead.message().headers().get(headers::ATTEMPTS), Some("3"));
    dead.ack().await.expect("ack");
    Outcome::Passed
}

/// 15. Competing consumers: the union is the whole set, and no message goes
///     to both (unless reported as a redelivery).
pub async fn competing_consumers(h: &dyn Harness) -> Outcome {
    let s = setup(h, "compete", |o| o.with_prefetch(10)).await;
    if !s.client.capabilities().competing_consumers {
        return Outcome::Skipped("backend has no competing consumers".into());
    }
    let msgs = numbered(200, "c");
    let expected = ids(&msgs);
    let a = subscribe(&s.client, &s.topic, &s.opts).await;
    let other = client(h).await;
    let b = subscribe(&other, &s.topic, &s.opts).await;
    publish_batch_ok(&s.client, &s.topic, msgs).await;
    let idle = Duration::from_secs(2);
    // Each consumer is its own task and spends a moment on every message,
    // as real workers do.
    let consume = |mut sub: Subscription| {
        tokio::spawn(async move {
            let mut got: Vec<(String, u32)> = Vec::new();
            while let Ok(Ok(d)) = tokio::time::timeout(idle, sub.recv()).await {
                got.push((d.message().id().to_owned(), d.attempt()));
                tokio::time::sleep(Duration::from_millis(1)).await;
                d.ack().await.expect("ack");
            }
            sub.close().await.expect("close");
            got
        })
    };
    let (ta, tb) = (consume(a), consume(b));
    let (ga, gb) = (ta.await.expect("consumer A"), tb.await.expect("consumer B"));
    let first_a: HashSet<_> = ga
        .iter()
        .filter(|(_, n)| *n == 1)
        .map(|(i, _)| i.clone())
        .collect();
    let first_b: HashSet<_> = gb
        .iter()
        .filter(|(_, n)| *n == 1)
        .map(|(i, _)| i.clone())
        .collect();
    let both: Vec<_> = first_a.intersection(&first_b).collect();
    assert!(
        both.is_empty(),
        "{} messages went to both consumers as first deliveries",
        both.len()
    );
    assert!(
        !ga.is_empty() && !gb.is_empty(),
        "consumers did not compete: A got {}, B got {} of {}",
        ga.len(),
        gb.len(),
        expected.len()
    );
    let union: HashSet<String> = ga.into_iter().chain(gb).map(|(i, _)| i).collect();
    assert_eq!(
        union.len(),
        expected.len(),
        "consumers together missed {} messages",
        expected.len() - union.len()
    );
    assert_eq!(union, expected);
    Outcome::Passed
}

/// 16. Fan-out: two subscriptions on one topic each receive every message.
pub async fn fan_out(h: &dyn Harness) -> Outcome {
    let s = setup(h, "fan-out", |o| o).await;
    if !s.client.capabilities().fan_out {
        return Outcome::Skipped("backend has no fan-out (one subscription per topic)".into());
    }
    let second = SubscribeOptions::new(h.unique("sub2"));
    s.client
        .ensure_subscription(&s.topic, &second)
        .await
        .expect("ensure second");
    let msgs = numbered(50, "f");
    publish_each(&s.client, &s.topic, msgs.clone()).await;
    for opts in [&s.opts, &second] {
        let mut sub = subscribe(&s.client, &s.topic, opts).await;
        collect_acked(
            &mut sub,
            &ids(&msgs),
            h.receive_timeout(),
            "fan-out subscription",
        )
        .await;
    }
    Outcome::Passed
}

/// 17. Per-key order: 5 keys × 100 messages through one consumer arrive in
///     publish order per key.
pub async fn per_key_order(h: &dyn Harness) -> Outcome {
    let s = setup(h, "order", |o| o).await;
    match s.client.capabilities().ordering {
        KeyOrdering::PerKey => {}
        other => return Outcome::Skipped(format!("backend ordering is {other:?}")),
    }
    let msgs: Vec<Message> = (0..500)
        .map(|i| Message::new(format!("{}", i / 5)).with_key(format!("key-{}", i % 5)))
        .collect();
    publish_each(&s.client, &s.topic, msgs.clone()).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let got = collect_acked(&mut sub, &ids(&msgs), h.receive_timeout(), "ordered").await;
    let mut last: HashMap<String, i64> = HashMap::new();
    for (m, attempt) in got {
        if attempt > 1 {
            continue;
        }
        let n: i64 = std::str::from_utf8(m.payload())
            .expect("utf8")
            .parse()
            .expect("number");
        let key = m.key().expect("key kept").to_owned();
        let prev = last.insert(key.clone(), n).unwrap_or(-1);
        assert!(n > prev, "key {key}: message {n} arrived after {prev}");
    }
    assert_eq!(last.len(), 5);
    Outcome::Passed
}

/// 18. A consumer never holds more unsettled deliveries than its prefetch,
///     and gets more as it settles.
pub async fn prefetch_bounds_unsettled(h: &dyn Harness) -> Outcome {
    let prefetch = 5;
    let s = setup(h, "prefetch", |o| {
        o.with_prefetch(prefetch)
            .with_ack_timeout(Duration::from_secs(60))
    })
    .await;
    let msgs = numbered(20, "p");
    publish_batch_ok(&s.client, &s.topic, msgs.clone()).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let mut held = Vec::new();
    for _ in 0..prefetch {
        held.push(recv_one(&mut sub, h.receive_timeout(), "within prefetch").await);
    }
    expect_nothing(
        &mut sub,
        Duration::from_secs(1),
        "a delivery beyond prefetch",
    )
    .await;
    // Settling one makes room for exactly one more.
    let first = held.remove(0);
    let mut settled: HashSet<String> = HashSet::from([first.message().id().to_owned()]);
    first.ack().await.expect("ack");
    held.push(recv_one(&mut sub, h.receive_timeout(), "after settling one").await);
    expect_nothing(
        &mut sub,
        Duration::from_millis(500),
        "a delivery beyond prefetch",
    )
    .await;
    for d in held {
        settled.insert(d.message().id().to_owned());
        d.ack().await.expect("ack");
    }
    // The rest flows as deliveries are settled; settled ones never come back.
    let rest: HashSet<String> = ids(&msgs).difference(&settled).cloned().collect();
    collect_acked(&mut sub, &rest, h.receive_timeout(), "rest after settling").await;
    Outcome::Passed
}

/// 19. `ensure_subscription` before publishing: a consumer attaching later
///     gets everything.
pub async fn ensure_subscription_before_publish(h: &dyn Harness) -> Outcome {
    let s = setup(h, "ensure-first", |o| o).await;
    let msgs = numbered(20, "e");
    publish_each(&s.client, &s.topic, msgs.clone()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let later = client(h).await;
    let mut sub = subscribe(&later, &s.topic, &s.opts).await;
    collect_acked(&mut sub, &ids(&msgs), h.receive_timeout(), "late consumer").await;
    Outcome::Passed
}

/// 20. Topics (even ones whose names differ only in `.`, `-` and `_`) and
///     subscriptions do not leak into each other (subscriptions checked
///     where the backend has fan-out).
pub async fn isolation(h: &dyn Harness) -> Outcome {
    let client = client(h).await;
    let base = h.unique("iso");
    let topics = [
        format!("{base}.a.b"),
        format!("{base}-a-b"),
        format!("{base}_a_b"),
        format!("{base}.a-b"),
    ];
    let opts = SubscribeOptions::new(h.unique("sub"));
    let twin = SubscribeOptions::new(format!("{}-twin", opts.name()));
    let twin_dot = SubscribeOptions::new(format!("{}.twin", opts.name()));
    // Subscriptions with similar names are isolated from each other only
    // where a topic has several (fan-out); topics always are.
    let subs: Vec<&SubscribeOptions> = if client.capabilities().fan_out {
        vec![&opts, &twin, &twin_dot]
    } else {
        vec![&opts]
    };
    let mut sent = Vec::new();
    for t in &topics {
        for o in subs.iter().copied() {
            client.ensure_subscription(t, o).await.expect("ensure");
        }
    }
    for t in &topics {
        let msgs = numbered(5, t);
        publish_each(&client, t, msgs.clone()).await;
        sent.push(msgs);
    }
    for (t, msgs) in topics.iter().zip(&sent) {
        // The first subscription acks everything; the twins still get all of it.
        for o in subs.iter().copied() {
            let mut sub = subscribe(&client, t, o).await;
            collect_acked(&mut sub, &ids(msgs), h.receive_timeout(), "isolated topic").await;
            expect_no_new(
                &mut sub,
                Duration::from_millis(300),
                &ids(msgs),
                "messages of another topic",
            )
            .await;
            sub.close().await.expect("close");
        }
    }
    Outcome::Passed
}

/// 21. Eight concurrent publishers × 200 messages, all delivered.
pub async fn concurrent_publishers(h: &dyn Harness) -> Outcome {
    let s = setup(h, "concurrent", |o| o).await;
    let mut tasks = Vec::new();
    let mut expected = HashSet::new();
    for p in 0..8 {
        let msgs = numbered(200, &format!("p{p}"));
        expected.extend(ids(&msgs));
        let client = s.client.clone();
        let topic = s.topic.clone();
        tasks.push(tokio::spawn(async move {
            publish_each(&client, &topic, msgs).await
        }));
    }
    for t in tasks {
        t.await.expect("publisher task panicked");
    }
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    collect_acked(
        &mut sub,
        &expected,
        h.receive_timeout(),
        "concurrent publishers",
    )
    .await;
    Outcome::Passed
}

/// 22. `publish_batch` of 1000: every message confirmed and received.
pub async fn publish_batch_1000(h: &dyn Harness) -> Outcome {
    let s = setup(h, "batch", |o| o).await;
    let msgs = numbered(1000, "b");
    let results = s.client.publish_batch(&s.topic, msgs.clone()).await;
    assert_eq!(results.len(), 1000, "one result per message");
    for (i, r) in results.into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("message {i} not confirmed: {e}"));
    }
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    collect_acked(&mut sub, &ids(&msgs), h.receive_timeout(), "batch").await;
    Outcome::Passed
}

/// 23. A payload over the limit fails with `PayloadTooLarge` before
///     anything is sent; nothing of it is delivered.
pub async fn oversized_payload_rejected(h: &dyn Harness) -> Outcome {
    let s = setup(h, "oversize", |o| o).await;
    let limit = s.client.capabilities().max_payload;
    let big = Message::new(vec![7u8; limit + 1]);
    match s.client.publish(&s.topic, big.clone()).await {
        Err(Error::PayloadTooLarge { size, limit: l }) => {
            assert_eq!(size, limit + 1);
            assert_eq!(l, limit);
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let ok = Message::new("fits");
    let results = s
        .client
        .publish_batch(&s.topic, vec![big.clone(), ok.clone()])
        .await;
    assert!(
        matches!(results[0], Err(Error::PayloadTooLarge { .. })),
        "batch: {:?}",
        results[0]
    );
    assert!(results[1].is_ok(), "batch: {:?}", results[1]);
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let fits = ids(&[ok]);
    collect_acked(
        &mut sub,
        &fits,
        h.receive_timeout(),
        "the message that fits",
    )
    .await;
    expect_no_new(
        &mut sub,
        Duration::from_millis(500),
        &fits,
        "an oversized message",
    )
    .await;
    Outcome::Passed
}

/// 24. Names outside the portable rule fail with `InvalidName` saying which
///     rule; valid but unusual names work.
pub async fn invalid_names_rejected(h: &dyn Harness) -> Outcome {
    let client = client(h).await;
    let long = "x".repeat(201);
    let bad = ["", "a b", "a*", "a>", "a/b", "é", ".", "..", long.as_str()];
    let good_sub = SubscribeOptions::new("s");
    for name in bad {
        let topic_err = |r: switchyard_core::Result<()>, op: &str| match r {
            Err(Error::InvalidName {
                kind: NameKind::Topic,
                name: n,
                reason,
            }) => {
                assert_eq!(n, name);
                assert!(!reason.is_empty());
            }
            other => panic!("{op} with topic {name:?}: expected InvalidName, got {other:?}"),
        };
        topic_err(client.publish(name, Message::new("x")).await, "publish");
        topic_err(client.ensure_topic(name).await, "ensure_topic");
        topic_err(
            client.ensure_subscription(name, &good_sub).await,
            "ensure_subscription",
        );
        topic_err(
            client.subscribe(name, good_sub.clone()).await.map(|_| ()),
            "subscribe",
        );
        match client
            .ensure_subscription(&h.unique("t"), &SubscribeOptions::new(name))
            .await
        {
            Err(Error::InvalidName {
                kind: NameKind::Subscription,
                ..
            }) => {}
            other => panic!("subscription {name:?}: expected InvalidName, got {other:?}"),
        }
    }
    // Valid names every backend must map onto its broker: 200 characters,
    // dots, dashes, underscores, upper case.
    let unique = crate::util::short_id();
    let max_topic = format!("{unique}{}", "T.-_".repeat(50))[..200].to_owned();
    let odd = [
        max_topic,
        format!("Orders.Created_v2-{unique}"),
        format!("...{unique}"),
    ];
    for topic in &odd {
        let opts = SubscribeOptions::new(format!("Sub.-_{}", &unique[..8]));
        client
            .ensure_subscription(topic, &opts)
            .await
            .unwrap_or_else(|e| panic!("valid topic {topic:?} rejected: {e}"));
        let msg = Message::new("ok");
        client
            .publish(topic, msg.clone())
            .await
            .unwrap_or_else(|e| panic!("valid topic {topic:?}: {e}"));
        let mut sub = subscribe(&client, topic, &opts).await;
        collect_acked(
            &mut sub,
            &ids(&[msg]),
            h.receive_timeout(),
            "valid unusual name",
        )
        .await;
    }
    Outcome::Passed
}

/// 25. Use after close returns `Closed`; closing twice is harmless; closing
///     while a cancelled `recv` is parked inside the subscription does not hang.
pub async fn use_after_close(h: &dyn Harness) -> Outcome {
    let s = setup(h, "close", |o| o).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let mut other = subscribe(&s.client, &s.topic, &s.opts).await;
    // Leave a receive in progress inside both subscriptions.
    for sub in [&mut sub, &mut other] {
        let parked = tokio::time::timeout(Duration::from_millis(100), sub.recv()).await;
        assert!(
            parked.is_err(),
            "nothing was published, yet recv returned {parked:?}"
        );
    }
    tokio::time::timeout(Duration::from_secs(10), sub.close())
        .await
        .expect("closing a subscription with a cancelled recv hung")
        .expect("close subscription");
    sub.close().await.expect("close subscription");
    sub.close().await.expect("close subscription twice");
    assert!(
        matches!(sub.recv().await, Err(Error::Closed)),
        "recv after close"
    );
    // `other` still has a receive parked: closing the client must not hang.
    tokio::time::timeout(Duration::from_secs(10), s.client.close())
        .await
        .expect("closing a client with a cancelled recv hung")
        .expect("close client");
    s.client.close().await.expect("close client twice");
    assert!(
        matches!(other.recv().await, Err(Error::Closed)),
        "recv after client close"
    );
    assert!(
        matches!(
            s.client.publish(&s.topic, Message::new("x")).await,
            Err(Error::Closed)
        ),
        "publish after close"
    );
    let batch = s
        .client
        .publish_batch(&s.topic, vec![Message::new("x")])
        .await;
    assert!(
        matches!(batch[0], Err(Error::Closed)),
        "publish_batch after close"
    );
    assert!(
        matches!(
            s.client.subscribe(&s.topic, s.opts.clone()).await,
            Err(Error::Closed)
        ),
        "subscribe after close"
    );
    Outcome::Passed
}

/// Publishes `msgs` from a task, pausing briefly every `every` messages, so
/// receives are in progress when they are cancelled.
fn trickle(
    client: &Client,
    topic: &str,
    msgs: Vec<Message>,
    every: usize,
) -> tokio::task::JoinHandle<()> {
    let (client, topic) = (client.clone(), topic.to_owned());
    tokio::spawn(async move {
        for (i, m) in msgs.into_iter().enumerate() {
            client.publish(&topic, m).await.expect("publish");
            if i % every == 0 {
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
    })
}

/// Bounds a cancel-and-retry receive loop and varies the cancel delay.
struct CancelProbe {
    deadline: Instant,
    tick: u64,
    cancelled: u32,
}

impl CancelProbe {
    fn new(h: &dyn Harness) -> Self {
        Self {
            deadline: Instant::now() + h.receive_timeout() * 2,
            tick: 0,
            cancelled: 0,
        }
    }

    /// The next cancel delay; fails when the bound has passed.
    fn next_wait(&mut self, seen: usize, expected: usize, what: &str) -> Duration {
        assert!(
            Instant::now() < self.deadline,
            "{what}: {} of {expected} messages lost to cancellation",
            expected - seen
        );
        self.tick += 1;
        Duration::from_micros(200 + (self.tick * 7919) % 3000)
    }

    fn assert_cancelled(&self, what: &str) {
        assert!(
            self.cancelled > 0,
            "{what}: no receive was cancelled; the case tested nothing"
        );
    }
}

/// 26. `recv` cancelled inside `tokio::select!` loses nothing, both through
///     `Subscription` and through the backend's own `Receiver` (the driver
///     contract: `Subscription` keeps a parked receive, so the driver future
///     is cancelled directly in the second half).
pub async fn recv_cancel_safe(h: &dyn Harness) -> Outcome {
    let s = setup(h, "cancel", |o| o).await;
    let msgs = numbered(60, "x");
    let expected = ids(&msgs);
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let publisher = trickle(&s.client, &s.topic, msgs, 7);
    let mut seen = HashSet::new();
    let mut probe = CancelProbe::new(h);
    while seen.len() < expected.len() {
        let wait = probe.next_wait(seen.len(), expected.len(), "subscription");
        tokio::select! {
            got = sub.recv() => {
                let d = got.expect("recv");
                assert!(expected.contains(d.message().id()));
                seen.insert(d.message().id().to_owned());
                d.ack().await.expect("ack");
            }
            () = tokio::time::sleep(wait) => probe.cancelled += 1,
        }
    }
    publisher.await.expect("publisher");
    probe.assert_cancelled("subscription");
    sub.close().await.expect("close the first consumer");

    let msgs = numbered(40, "driver");
    let expected = ids(&msgs);
    let receiver = s
        .client
        .broker()
        .receiver(&s.topic, &s.opts)
        .await
        .expect("open a driver receiver");
    let publisher = trickle(&s.client, &s.topic, msgs, 5);
    let mut seen = HashSet::new();
    let mut probe = CancelProbe::new(h);
    while seen.len() < expected.len() {
        let wait = probe.next_wait(seen.len(), expected.len(), "driver receiver");
        tokio::select! {
            got = receiver.recv() => {
                let raw = got.expect("receiver ended").expect("driver recv");
                assert!(expected.contains(raw.message.id()));
                seen.insert(raw.message.id().to_owned());
                raw.acker.ack().await.expect("ack");
            }
            () = tokio::time::sleep(wait) => probe.cancelled += 1,
        }
    }
    publisher.await.expect("publisher");
    probe.assert_cancelled("driver receiver");
    receiver.close().await.expect("close receiver");
    Outcome::Passed
}

/// 27. The whole flow through the URL entry point and `Arc<dyn Broker>`.
pub async fn connect_and_dyn(h: &dyn Harness) -> Outcome {
    let connected = h
        .connect_url()
        .await
        .unwrap_or_else(|e| panic!("connect(url) failed: {e}"));
    let broker: Arc<dyn Broker> = Arc::clone(connected.broker());
    let caps = broker.capabilities();
    assert!(!caps.backend.is_empty());
    assert!(caps.max_payload > 0);
    let client = Client::from_arc(broker);
    let topic = h.unique("dyn");
    let opts = SubscribeOptions::new(h.unique("sub"));
    client
        .ensure_subscription(&topic, &opts)
        .await
        .expect("ensure");
    let msg = Message::new("through dyn").with_key("k");
    client.publish(&topic, msg.clone()).await.expect("publish");
    let mut sub = subscribe(&client, &topic, &opts).await;
    let d = recv_one(&mut sub, h.receive_timeout(), "dyn delivery").await;
    assert_eq!(d.message().id(), msg.id());
    d.nack(Retry::now()).await.expect("nack");
    let d = recv_one(&mut sub, h.receive_timeout(), "dyn redelivery").await;
    assert_eq!(d.attempt(), 2);
    d.ack().await.expect("ack");
    client.close().await.expect("close");
    Outcome::Passed
}

/// 28. Dead letters are kept even though nobody reads the dead-letter topic
///     until later (the `dead-letters` subscription is ensured with the
///     source subscription), and the dead-letter topic is an ordinary topic.
pub async fn dead_letters_kept_without_reader(h: &dyn Harness) -> Outcome {
    let s = setup(h, "dl-kept", |o| {
        o.with_dead_letter_topic(h.unique("custom-dlq"))
    })
    .await;
    let msgs = numbered(5, "k");
    publish_each(&s.client, &s.topic, msgs.clone()).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    for _ in 0..5 {
        recv_one(&mut sub, h.receive_timeout(), "delivery")
            .await
            .dead_letter("kept")
            .await
            .expect("dead_letter");
    }
    sub.close().await.expect("close");
    // Read later, from a new connection, through the ordinary API.
    let later = client(h).await;
    let dlq_topic = s.opts.dead_letter_topic_for(&s.topic);
    let mut dlq = subscribe(&later, &dlq_topic, &SubscribeOptions::dead_letters()).await;
    let got = collect_acked(
        &mut dlq,
        &ids(&msgs),
        h.receive_timeout(),
        "kept dead letters",
    )
    .await;
    for (m, _) in got {
        assert_eq!(
            m.headers().get(headers::ORIGINAL_TOPIC),
            Some(s.topic.as_str())
        );
    }
    Outcome::Passed
}

/// 29. A delayed nack is held by the broker (where capabilities say so): the
///     consumer goes away, a new one gets the message after the delay, not
///     before, with the attempt count kept.
pub async fn delay_survives_consumer_restart(h: &dyn Harness) -> Outcome {
    let s = setup(h, "durable-delay", |o| o).await;
    if !s.client.capabilities().native_delay {
        return Outcome::Skipped("nack delays are held by the consumer, not the broker".into());
    }
    let msg = Message::new("later, elsewhere");
    publish_each(&s.client, &s.topic, vec![msg.clone()]).await;
    let mut sub = subscribe(&s.client, &s.topic, &s.opts).await;
    let d = recv_one(&mut sub, h.receive_timeout(), "first delivery").await;
    let delay = Duration::from_secs(2);
    let start = Instant::now();
    d.nack(Retry::after(delay)).await.expect("nack with delay");
    sub.close().await.expect("close");
    drop(sub);
    s.client.close().await.expect("close client");
    let other = client(h).await;
    let mut again = subscribe(&other, &s.topic, &s.opts).await;
    let d = recv_one(
        &mut again,
        delay + h.slack() + h.receive_timeout(),
        "delayed redelivery to a new consumer",
    )
    .await;
    let waited = start.elapsed();
    assert_eq!(d.message().id(), msg.id());
    assert_eq!(d.attempt(), 2, "attempt count lost across the restart");
    assert!(
        waited >= delay,
        "redelivered after {waited:?}, before the {delay:?} delay"
    );
    d.ack().await.expect("ack");
    Outcome::Passed
}
