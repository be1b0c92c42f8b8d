"""moto's server for switchyard's tests, with two performance fixes and one
for atomic receives.

moto 5.x answers SQS calls in time linear in the queue's length with a large
constant: every visibility check reads the clock through datetime
arithmetic (about 17 us a call), and each message ReceiveMessage returns is
checked against the retention period by computing *every* queue attribute
(three of which scan the whole queue). With 1,600 messages queued, one
ReceiveMessage of 10 took 2.5-4 s on a 2-core machine, so the conformance
cases that queue 1,000+ messages could not finish within their bounds.

The fixes keep moto's rules and change only their cost:
- the SQS model reads the clock with time.time() (the same Unix epoch value,
  without the datetime round trip);
- the retention check reads the queue's MessageRetentionPeriod directly (the
  same rule: a message older than the period is not returned).

moto's ReceiveMessage is not atomic across its server threads: two
concurrent receives can both find a message visible before either marks it
received, so one message goes to both within its visibility timeout, and
the copy answered later may carry the lower ApproximateReceiveCount (seen:
counts 2 then 1, once in 1,800 messages received by 16 concurrent
receivers). Real SQS never hands one message to two receives within its
visibility timeout. So each pass over a queue (find the visible messages,
mark them received) runs alone per queue; a long poll waits between passes
without holding the queue, as moto's own loop does.

Nothing else in moto is changed.

Usage: python3 scripts/moto_server.py -H 127.0.0.1 -p 4566
"""

import sys
import threading
import time

from moto.core import utils
from moto.server import main
from moto.sqs import models


def _unix_time(dt=None):
    return time.time() if dt is None else utils.unix_time(dt)


def _unix_time_millis(dt=None):
    return time.time() * 1000.0 if dt is None else utils.unix_time_millis(dt)


def _retained(self, queue_name, message):
    queue = self.get_queue(queue_name)
    retain_until = int(queue.message_retention_period) + message.sent_timestamp / 1000
    return retain_until > _unix_time()


_receive = models.SQSBackend.receive_message
_queues_guard = threading.Lock()
_queue_locks = {}


def _queue_lock(queue_name):
    with _queues_guard:
        return _queue_locks.setdefault(queue_name, threading.Lock())


def _receive_atomically(
    self,
    queue_name,
    count,
    wait_seconds_timeout,
    visibility_timeout,
    message_attribute_names=None,
):
    deadline = _unix_time() + wait_seconds_timeout
    lock = _queue_lock(queue_name)
    while True:
        with lock:
            # One pass without waiting (moto's loop ends after a pass that
            # found nothing when the wait is 0).
            result = _receive(
                self, queue_name, count, 0, visibility_timeout, message_attribute_names
            )
        left = deadline - _unix_time()
        if result or left <= 0:
            return result
        started = _unix_time()
        self.get_queue(queue_name).wait_for_messages(min(1.0, left))
        if _unix_time() - started < 0.005:
            # Visible messages none of which may go now (FIFO groups in
            # flight): do not spin.
            time.sleep(0.02)


models.unix_time = _unix_time
models.unix_time_millis = _unix_time_millis
if hasattr(models.SQSBackend, "is_message_valid_based_on_retention_period"):
    models.SQSBackend.is_message_valid_based_on_retention_period = _retained

models.SQSBackend.receive_message = _receive_atomically

if __name__ == "__main__":
    main(sys.argv[1:])
