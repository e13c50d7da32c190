"""Where CPU goes: a server's CPU time from /proc, and batchd's stage costs measured alone.

Server CPU is utime + stime of the server process and every descendant (from
/proc/PID/stat and /proc/PID/task/*/children), so threads and child processes count.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are alive now."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:  # a process may exit while it is being listed
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                pending += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and its living descendants."""
    total = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / TICKS


def own_cpu_seconds() -> float:
    """CPU seconds of this process, and of its finished children (a load generator)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def median_cpu_ms(work: Any, runs: int) -> float:
    """Median CPU milliseconds of one call of `work()` on this thread."""
    samples = []
    for _ in range(runs):
        started = time.thread_time()
        work()
        samples.append(time.thread_time() - started)
    return statistics.median(samples) * 1000


def multipart_body(image: bytes) -> tuple[bytes, str]:
    boundary = "batchdbenchboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"photo.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
    body += image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def multipart_cpu_ms(image: bytes, runs: int = 200) -> float:
    """CPU ms for batchd to read one multipart upload (Starlette's form parser)."""
    from starlette.requests import Request

    from batchd.http.payload import read_image_payload

    body, content_type = multipart_body(image)
    scope = {"type": "http", "method": "POST", "path": "/predict", "query_string": b"",
             "headers": [(b"content-type", content_type.encode()),
                         (b"content-length", str(len(body)).encode())]}

    async def one() -> None:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        data = await read_image_payload(Request(scope, receive), len(body) + 1)
        assert data == image

    loop = asyncio.new_event_loop()
    try:
        return median_cpu_ms(lambda: loop.run_until_complete(one()), runs)
    finally:
        loop.close()


def model_cpu_ms_per_image(model: Any, image: bytes, runs: int = 5) -> dict[int, float]:
    """Process CPU ms per image of one batch of each bucket (every OpenMP thread counted)."""
    item = model.preprocessor.load(image)
    per_bucket = {}
    for bucket in model.config.batching.bucket_sizes:
        model.run_batch([item] * bucket, bucket)
        started = time.process_time()
        for _ in range(runs):
            model.run_batch([item] * bucket, bucket)
        per_bucket[bucket] = (time.process_time() - started) / runs / bucket * 1000
    return per_bucket
