"""Two settings side by side under open-loop overload: goodput within the objective.

Each round measures C first (batchd without an objective, closed loop, 16 clients), then
serves ResNet-18 at 64x64 with the objective twice, once as the config has it and once
with `--variant`'s keys, the order alternating between rounds, and offers each the same
open-loop schedule at 1.5 C and 3 C. A key is one of [models.batching], or of [server]
written `server.<key>`. This machine's speed moves by tens of percent within minutes
(docs, Overload), so only the pairs measured in the same round are compared:

    python -m loadtest.overload_ab --slo-ms 250 --variant fill_buckets=false --rounds 3
    python -m loadtest.overload_ab --variant server.torch_threads=1,server.preprocess_threads=1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from loadtest.bench import RESULTS, WORKLOADS, ensure_checkpoint, on_device, server, stage
from loadtest.images import photo_jpeg
from loadtest.loadgen import aiohttp_load
from loadtest.openloop import with_batching
from loadtest.overload import closed_loop, measure
from loadtest.servers import config_with

MULTIPLES = (1.5, 3.0)


def parse_variant(text: str) -> dict[str, str]:
    """`key=value,key=value` as [models.batching] keys and their TOML literals (a comma
    inside [] belongs to an array)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    settings: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in parts)):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"{item!r} is not key=value")
        settings[key.strip()] = value.strip()
    if not settings:
        raise argparse.ArgumentTypeError("name at least one key=value")
    return settings


def variant_config(workload: Path, tag: str, objective: dict[str, Any],
                   variant: dict[str, str]) -> Path:
    """The workload's config with the objective and the variant's keys: `server.<key>`
    in [server], the rest in [models.batching]."""
    server_keys = {key.removeprefix("server."): value for key, value in variant.items()
                   if key.startswith("server.")}
    batching = {key: value for key, value in variant.items() if not key.startswith("server.")}
    path = with_batching(workload, tag, **objective, **batching)
    if not server_keys:
        return path
    with_server = config_with(path, "server", f"{tag}-server", **server_keys)
    path.unlink()
    return with_server


def paired(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per multiple of C: the rounds the variant served more in, and the mean of its
    goodput over the baseline's, each round's pair taken together."""
    summary: dict[str, Any] = {}
    for multiple in MULTIPLES:
        key = f"{multiple:g}C"
        pairs = [(row["baseline"][key]["goodput"], row["variant"][key]["goodput"])
                 for row in rows]
        summary[key] = {
            "variant_served_more": sum(1 for base, other in pairs if other > base),
            "rounds": len(pairs),
            "goodput_ratio": (sum(other for _, other in pairs) / sum(base for base, _ in pairs)
                              if any(base for base, _ in pairs) else None),
        }
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slo-ms", type=float, default=250.0)
    parser.add_argument("--variant", type=parse_variant, required=True,
                        help="keys for the second server: key=value,... ([models.batching], "
                             "or [server] as server.key=value)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arrivals", choices=("poisson", "bursty"), default="poisson")
    parser.add_argument("--seconds", type=float, default=10.0, help="per point")
    parser.add_argument("--device", default="", help="serve on this device (e.g. cpu)")
    args = parser.parse_args(argv)
    ensure_checkpoint(WORKLOADS["resnet18-64"])
    workload = on_device(WORKLOADS["resnet18-64"], args.device)
    body = photo_jpeg()
    objective = {"slo_ms": args.slo_ms, "queue_timeout_ms": args.slo_ms, "priority_levels": 2}
    configs = {"baseline": with_batching(workload, "ab-baseline", **objective),
               "variant": variant_config(workload, "ab-variant", objective, args.variant)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stage(f"{os.cpu_count()} cores; objective {args.slo_ms:g} ms; variant {args.variant}; "
          f"{args.rounds} rounds of {args.arrivals} arrivals, {args.seconds:g} s a point")
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        for round_index in range(args.rounds):
            with server("batchd", workload, RESULTS / "overload-ab-c.log") as served:
                aiohttp_load(served.url, body, "image/jpeg", 8, 200)
                capacity = closed_loop(served.url, served.pid, body, 16, args.seconds / 2)["rps"]
            row: dict[str, Any] = {"round": round_index, "capacity": capacity}
            order = ("baseline", "variant") if round_index % 2 == 0 else ("variant", "baseline")
            for name in order:
                row[name] = {}
                with server("batchd", configs[name], RESULTS / f"overload-ab-{name}.log") as served:
                    aiohttp_load(served.url, body, "image/jpeg", 8, 200)
                    for multiple in MULTIPLES:
                        point = measure(served.url, served.pid, body, multiple * capacity,
                                        args.seconds, args.arrivals, round_index,
                                        args.slo_ms / 1000, capacity)
                        row[name][f"{multiple:g}C"] = point
                        stage(f"round {round_index} (C {capacity:.1f}) {name} {multiple:g} C: "
                              f"goodput {point['goodput']:.1f}/s ({point['goodput_of_c']:.2f} "
                              f"C), p99 200s {point['p99_200_ms'] or 0:.0f} ms, late "
                              f"{point['late_200s']}, 504s {point['statuses'].get('504', 0)}, "
                              f"mean batch {point['mean_batch'] or 0:.1f}")
            rows.append(row)
    finally:
        for config in configs.values():
            config.unlink()
    summary = paired(rows)
    print(f"\n## {args.variant} against the config as it is ({args.arrivals}, objective "
          f"{args.slo_ms:g} ms)\n")
    print("| round | C | " + " | ".join(
        f"{multiple:g} C goodput: baseline, variant | mean batch" for multiple in MULTIPLES)
        + " |")
    print("|---:|---:|" + "---|---|" * len(MULTIPLES))
    for row in rows:
        cells = []
        for multiple in MULTIPLES:
            base, other = row["baseline"][f"{multiple:g}C"], row["variant"][f"{multiple:g}C"]
            cells.append(f"{base['goodput']:.0f}, {other['goodput']:.0f} | "
                         f"{base['mean_batch'] or 0:.1f}, {other['mean_batch'] or 0:.1f}")
        print(f"| {row['round']} | {row['capacity']:.0f} | " + " | ".join(cells) + " |")
    for key, result in summary.items():
        ratio = result["goodput_ratio"]
        print(f"\n{key}: the variant served more in {result['variant_served_more']} of "
              f"{result['rounds']} rounds; its goodput over the baseline's: "
              + ("-" if ratio is None else f"{ratio:.3f}"))
    out = RESULTS / "overload_ab.json"
    out.write_text(json.dumps({"variant": args.variant, "arrivals": args.arrivals,
                               "slo_ms": args.slo_ms, "rounds": rows, "summary": summary},
                              indent=2, default=str))
    stage(f"wrote {out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
