"""Checks that scripts/moto_server.py receives atomically, as SQS does.

Starts the launcher on a spare loopback port with the interpreter switching
threads every microsecond (which makes moto's own race, two concurrent
ReceiveMessage calls both taking one message, frequent: 4 duplicates and 11
messages missing in three runs of this check without the fix), queues 600
messages and receives them with 16 concurrent receivers, each message held
for 60 s. Fails when a message is received twice within its visibility
timeout or not at all, or when the whole check outlasts 120 s (every call
is bounded too). About 8 s.

Usage: python3 scripts/check_moto.py
"""

import collections
import os
import socket
import subprocess
import sys
import threading
import time

import boto3
from botocore.config import Config

MESSAGES = 600
RECEIVERS = 16
BOUND = 120  # seconds for the whole check
CALLS = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2})
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moto_server.py")
SERVE = (
    "import runpy, sys; sys.setswitchinterval(1e-6); "
    "sys.argv = [sys.argv[1]] + sys.argv[2:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def spare_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    started = time.time()
    port = spare_port()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE, LAUNCHER, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.time() > deadline:
                    sys.exit("check_moto: the launcher did not listen within 20 s")
                time.sleep(0.1)

        def client():
            return boto3.client(
                "sqs",
                region_name="us-east-1",
                endpoint_url=f"http://127.0.0.1:{port}",
                aws_access_key_id="test",
                aws_secret_access_key="test",
                config=CALLS,
            )

        sqs = client()
        url = sqs.create_queue(QueueName="check-moto")["QueueUrl"]
        for i in range(0, MESSAGES, 10):
            entries = [{"Id": str(j), "MessageBody": f"m{i + j}"} for j in range(10)]
            sqs.send_message_batch(QueueUrl=url, Entries=entries)

        got = collections.defaultdict(list)
        lock = threading.Lock()

        def receive():
            own, empty = client(), 0
            while empty < 3 and time.time() - started < BOUND:
                answer = own.receive_message(
                    QueueUrl=url,
                    MaxNumberOfMessages=10,
                    VisibilityTimeout=60,
                    WaitTimeSeconds=1,
                    AttributeNames=["ApproximateReceiveCount"],
                )
                messages = answer.get("Messages", [])
                if not messages:
                    empty += 1
                    continue
                with lock:
                    for m in messages:
                        count = int(m["Attributes"]["ApproximateReceiveCount"])
                        got[m["Body"]].append(count)

        threads = [threading.Thread(target=receive, daemon=True) for _ in range(RECEIVERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, BOUND - (time.time() - started)) + 15)
        if any(t.is_alive() for t in threads) or time.time() - started > BOUND:
            sys.exit(f"check_moto: the check did not finish within {BOUND} s")
    finally:
        server.terminate()
        server.wait()

    twice = {body: counts for body, counts in got.items() if len(counts) > 1}
    missing = MESSAGES - len(got)
    print(
        f"check_moto: {len(got)} of {MESSAGES} received by {RECEIVERS} receivers, "
        f"{len(twice)} twice within the visibility timeout, {missing} missing"
    )
    if twice or missing:
        sys.exit(f"check_moto: moto's receive is not atomic: {dict(list(twice.items())[:5])}")


if __name__ == "__main__":
    main()
