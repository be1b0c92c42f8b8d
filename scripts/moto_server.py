"""moto's server for switchyard's tests, with two performance fixes.

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
Nothing else in moto is changed.

Usage: python3 scripts/moto_server.py -H 127.0.0.1 -p 4566
"""

import sys
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


models.unix_time = _unix_time
models.unix_time_millis = _unix_time_millis
if hasattr(models.SQSBackend, "is_message_valid_based_on_retention_period"):
    models.SQSBackend.is_message_valid_based_on_retention_period = _retained

if __name__ == "__main__":
    main(sys.argv[1:])
