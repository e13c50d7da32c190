"""Soak test: mixed load against a real batchd, then check that the books balance.

Normal requests, bad inputs, clients that disconnect mid-request and requests whose
deadline is too short to make, for a bounded time, from several concurrent clients. At
the end it checks, from /metrics, that every request the batcher accepted was settled
exactly once, that only requests that reached a batch were computed, that queue depth and
in-flight counts returned to 0, that no answer was a surprise (a 500 for bad input, say),
and that the server's resident memory stayed flat after warm-up.

    python -m loadtest.soak --minutes 2                 # starts its own server (default config)
    python -m loadtest.soak --seconds 30 --url http://127.0.0.1:8000

Exits 0 when everything balances, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.servers import batchd_command, free_port, serving

# What each kind of request may be answered with; anything else is a surprise.
EXPECTED = {
    "normal": {200, 503},  # 503 only as queue_full under overload
    "bad_input": {400},
    "deadline": {503, 504, 200},  # usually expires queued; may just make it
    "disconnect": set(),  # no answer is read
}
MIX = (("normal", 0.6), ("bad_input", 0.15), ("deadline", 0.15), ("disconnect", 0.1))
RSS_GROWTH_LIMIT_BYTES = 64 * 1024 * 1024


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)
    surprises: list[str] = field(default_factory=list)
    rss_samples: list[tuple[float, float]] = field(default_factory=list)


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def total(snapshot: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return sum(value for (sample, sample_labels), value in snapshot.items()
               if sample == name and all((k, v) in sample_labels for k, v in labels.items()))


def digit_pngs(count: int) -> list[bytes]:
    from batchd.digits import digit_images

    images, _ = digit_images("held_out")
    bodies = []
    for image in images[:count]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    return bodies


async def disconnect_midway(host: str, port: int, body: bytes, rng: random.Random) -> None:
    """Send a whole request, then hang up without reading the answer."""
    _, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /predict HTTP/1.1\r\nHost: soak\r\nContent-Type: image/png\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    await asyncio.sleep(rng.uniform(0, 0.005))
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def client_loop(url: str, end: float, bodies: list[bytes], tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*MIX, strict=True)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while time.monotonic() < end:
            kind = rng.choices(kinds, weights)[0]
            body = rng.choice(bodies)
            tally.sent[kind] += 1
            headers = {"content-type": "image/png"}
            if kind == "disconnect":
                await disconnect_midway(host, int(port), body, rng)
                continue
            if kind == "bad_input":
                body = rng.randbytes(rng.randint(1, 2000))
            if kind == "deadline":
                headers["X-Request-Timeout-Ms"] = "0.01"
            response = await client.post("/predict", content=body, headers=headers)
            tally.answers[(kind, response.status_code)] += 1
            if response.status_code not in EXPECTED[kind]:
                tally.surprises.append(f"{kind}: {response.status_code} {response.text[:120]}")
            elif kind == "normal" and response.status_code == 503 and \
                    response.json().get("reason") != "queue_full":
                tally.surprises.append(f"normal: 503 {response.text[:120]}")


async def sample_rss(url: str, end: float, tally: Tally, every_s: float) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while time.monotonic() < end:
            response = await client.get("/metrics")
            for family in text_string_to_metric_families(response.text):
                if family.name == "process_resident_memory_bytes":
                    tally.rss_samples.append((time.monotonic(), family.samples[0].value))
            await asyncio.sleep(every_s)


def wait_settled(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snapshot = metrics(url)
        if total(snapshot, "batchd_in_flight_requests") == 0 and \
                total(snapshot, "batchd_queue_depth") == 0:
            return
        time.sleep(0.1)


def check_books(before: dict, after: dict, tally: Tally) -> list[str]:  # type: ignore[type-arg]
    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    problems = []
    accepted = delta("batchd_batcher_accepted_total")
    settled = sum(delta("batchd_batcher_requests_total", outcome=outcome) for outcome in
                  ("succeeded", "failed", "cancelled", "expired", "deadline_exceeded"))
    never_ran = (delta("batchd_batcher_cancelled_queued_total")
                 + delta("batchd_batcher_requests_total", outcome="expired")
                 + delta("batchd_batcher_failed_unrun_total"))
    computed = delta("batchd_items_computed_total")
    print(f"accepted {accepted:.0f} = settled {settled:.0f}; computed {computed:.0f} = "
          f"accepted - never ran {never_ran:.0f}")
    if accepted != settled:
        problems.append(f"accepted {accepted} != settled {settled}")
    if computed != accepted - never_ran:
        problems.append(f"computed {computed} != accepted {accepted} - never ran {never_ran}")
    for gauge in ("batchd_queue_depth", "batchd_in_flight_requests"):
        if total(after, gauge) != 0:
            problems.append(f"{gauge} is {total(after, gauge)} after the load stopped")
    answered_ok = sum(n for (kind, code), n in tally.answers.items() if code == 200)
    if delta("batchd_requests_total", outcome="success") < answered_ok:
        problems.append("the server counted fewer successes than the clients received")
    bad = tally.answers[("bad_input", 400)]
    if delta("batchd_requests_total", outcome="bad_input") != bad:
        problems.append(f"bad_input counted {delta('batchd_requests_total', outcome='bad_input')}"
                        f" but clients got {bad} 400s")
    return problems


def check_rss(tally: Tally, warm_until: float) -> list[str]:
    steady = [rss for at, rss in tally.rss_samples if at >= warm_until]
    if len(steady) < 2:
        return []
    growth = steady[-1] - steady[0]
    print(f"RSS after warm-up: first {steady[0] / 2**20:.1f} MiB, last {steady[-1] / 2**20:.1f} "
          f"MiB, max {max(steady) / 2**20:.1f} MiB ({growth / 2**20:+.1f} MiB)")
    if growth > RSS_GROWTH_LIMIT_BYTES:
        return [f"RSS grew by {growth / 2**20:.1f} MiB after warm-up"]
    return []


def run(url: str, seconds: float, concurrency: int) -> int:
    bodies = digit_pngs(64)
    before = metrics(url)
    tally = Tally()
    started = time.monotonic()
    end = started + seconds

    async def load() -> None:
        await asyncio.gather(sample_rss(url, end, tally, max(seconds / 30, 0.5)),
                             *(client_loop(url, end, bodies, tally, seed)
                               for seed in range(concurrency)))

    print(f"soak: {concurrency} clients for {seconds:.0f}s against {url}", flush=True)
    asyncio.run(load())
    wait_settled(url)
    after = metrics(url)
    print("sent:", dict(tally.sent))
    print("answers:", {f"{kind} {code}": n for (kind, code), n in sorted(tally.answers.items())})
    problems = check_books(before, after, tally)
    problems += check_rss(tally, warm_until=started + seconds * 0.2)
    problems += [f"surprise: {s}" for s in tally.surprises[:10]]
    if problems:
        print("PROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    print("books balance; memory flat; no surprises")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float)
    length.add_argument("--seconds", type=float)
    parser.add_argument("--url", help="a running batchd; default: start one")
    parser.add_argument("--config", type=Path, default=Path("config/default.toml"))
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (args.minutes or 1.0) * 60
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.url:
        sys.exit(run(args.url.rstrip("/"), seconds, args.concurrency))
    port = free_port()
    with serving(batchd_command(args.config, port), f"http://127.0.0.1:{port}",
                 ready_timeout_s=300) as served:
        code = run(served.url, seconds, args.concurrency)
    sys.exit(code)


if __name__ == "__main__":
    main()
