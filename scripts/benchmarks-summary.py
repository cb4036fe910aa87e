#!/usr/bin/env python3
"""Prints the markdown tables of docs/BENCHMARKS.md from a scripts/benchmarks result folder:
medians over repetitions, one row per server, and ratios to the floor."""
import glob
import json
import os
import statistics
import sys

out = sys.argv[1]


def load(pattern):
    runs = []
    for path in sorted(glob.glob(os.path.join(out, pattern))):
        with open(path) as f:
            runs.append(json.load(f)["results"])
    return runs


def median_rows(runs, keys):
    """{target: {key: median}} over runs (each a list of per-target results)."""
    table = {}
    for results in runs:
        for r in results:
            row = table.setdefault(r["target"], {k: [] for k in keys})
            for k in keys:
                if r.get(k) is not None:
                    row[k].append(r[k])
    return {t: {k: (statistics.median(v) if v else None) for k, v in row.items()} for t, row in table.items()}


def fmt(v, digits=2):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(title, rows, columns, floor_ratio=()):
    print(f"\n#### {title}\n")
    print("| server | " + " | ".join(c[1] for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    floor = rows.get("tidings-floor", {})
    for target in ["tidings", "tidings-floor", "tidings-naive"]:
        if target not in rows:
            continue
        row = rows[target]
        cells = []
        for key, _ in columns:
            cell = fmt(row.get(key))
            if key in floor_ratio and floor.get(key) and row.get(key) is not None and target != "tidings-floor":
                cell += f" ({row[key] / floor[key]:.2f}x)"
            cells.append(cell)
        print(f"| {target} | " + " | ".join(cells) + " |")


IDLE_COLUMNS = [
    ("bytes_per_conn", "bytes per connection"),
    ("connect_s", "connect s"),
    ("rss_before_mib", "RSS before MiB"),
    ("rss_connected_mib", "RSS connected MiB"),
]
FANOUT_COLUMNS = [
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("p999_ms", "p99.9 ms"),
    ("lost", "lost"),
    ("duplicates", "dup"),
    ("user_us_per_delivery", "user µs/delivery"),
    ("total_us_per_delivery", "total µs/delivery"),
]

for n in (1000, 10000):
    runs = load(f"idle-{n}-*.json")
    if runs:
        rows = median_rows(runs, [key for key, _ in IDLE_COLUMNS])
        table(f"Idle: {n:,} connections (median of {len(runs)})", rows, IDLE_COLUMNS)

for n in (1000, 10000):
    runs = load(f"fanout-{n}-*.json")
    if runs:
        rows = median_rows(runs, [key for key, _ in FANOUT_COLUMNS])
        table(f"Fan-out: {n:,} subscribers, 10 publications/s, 256 B (median of {len(runs)})", rows, FANOUT_COLUMNS, floor_ratio=("p99_ms", "total_us_per_delivery"))

SSE_ORDER = ["tidings", "tidings (sse)", "tidings-floor", "tidings-floor (sse)"]


def sse_table(title, rows, columns, ratio_keys):
    """WebSocket and SSE rows of the same runs: each SSE row's ratio to the same server's
    WebSocket row, and each tidings row's ratio to the floor over the same transport."""
    print(f"\n#### {title}\n")
    print("| server | " + " | ".join(c[1] for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for target in SSE_ORDER:
        if target not in rows:
            continue
        row = rows[target]
        is_sse = target.endswith(" (sse)")
        same_ws = rows.get(target[: -len(" (sse)")], {}) if is_sse else {}
        floor = rows.get("tidings-floor (sse)" if is_sse else "tidings-floor", {})
        cells = []
        for key, _ in columns:
            cell = fmt(row.get(key))
            notes = []
            if key in ratio_keys and row.get(key) is not None:
                if same_ws.get(key):
                    notes.append(f"{row[key] / same_ws[key]:.2f}x ws")
                if target.startswith("tidings ") or target == "tidings":
                    if floor.get(key):
                        notes.append(f"{row[key] / floor[key]:.2f}x floor")
            if notes:
                cell += " (" + ", ".join(notes) + ")"
            cells.append(cell)
        print(f"| {target} | " + " | ".join(cells) + " |")


runs = load("sse-idle-10000-*.json")
if runs:
    rows = median_rows(runs, [key for key, _ in IDLE_COLUMNS])
    sse_table(f"Idle, WebSocket and SSE: 10,000 connections (median of {len(runs)})", rows, IDLE_COLUMNS, ())

for n in (1000, 10000):
    runs = load(f"sse-fanout-{n}-*.json")
    if runs:
        rows = median_rows(runs, [key for key, _ in FANOUT_COLUMNS])
        sse_table(f"Fan-out, WebSocket and SSE: {n:,} subscribers, 10 publications/s, 256 B (median of {len(runs)})", rows, FANOUT_COLUMNS, ("p99_ms", "total_us_per_delivery"))

polls = []
for path in sorted(glob.glob(os.path.join(out, "longpoll-*.json"))):
    with open(path) as f:
        polls.append((os.path.basename(path)[:-5], json.load(f)))
if polls:
    print("\n#### Long-poll: waiting pollers on empty topics\n")
    print("| run | pollers | gateway settings | held by the gateway | answered at once | /healthz while waiting | bytes per held poller |")
    print("|---|---|---|---|---|---|---|")
    for name, r in polls:
        env = ", ".join(f"{k}={v}" for k, v in r["env"].items()) or "defaults"
        early = ", ".join(f"{k}: {v}" for k, v in sorted(r["answered_early"].items())) or "none"
        hz = "timed out (3 s)" if r["healthz_ms_while_waiting"] is None else f'{r["healthz_ms_while_waiting"]} ms'
        print(f'| {name} | {r["pollers"]:,} | {env} | {r["held_by_gateway"]:,} | {early} | {hz} | {fmt(r["bytes_per_held_poller"])} |')

limits = []
for path in glob.glob(os.path.join(out, "limit-*.json")):
    n = int(path.rsplit("-", 1)[1].split(".")[0])
    with open(path) as f:
        for r in json.load(f)["results"]:
            limits.append((n, r["target"], r.get("p99_ms"), r.get("lost")))
if limits:
    print("\n#### p99 by subscriber count (15 s each)\n")
    print("| subscribers | tidings p99 ms | floor p99 ms |")
    print("|---|---|---|")
    for n in sorted({l[0] for l in limits}):
        t = next((l[2] for l in limits if l[0] == n and l[1] == "tidings"), None)
        f = next((l[2] for l in limits if l[0] == n and l[1] == "tidings-floor"), None)
        print(f"| {n:,} | {fmt(t)} | {fmt(f)} |")

for name, title, keys in [
    ("churn", "Churn: 1,000 steady subscribers, 500 connects/s", ["churn_ok", "churn_failed", "lost", "p99_ms", "rss_baseline_mib", "rss_after_churn_mib", "rss_returned"]),
    ("slow", "10% slow subscribers: 1,000, 10/s, 256 B", ["p99_ms", "lost", "slow_total", "slow_closed", "max_growth_per_slow", "rss_max_mib"]),
    ("slow-heavy", "10% slow subscribers: 300, 50/s, 16 KiB", ["p99_ms", "lost", "slow_total", "slow_closed", "max_growth_per_slow", "rss_max_mib"]),
]:
    runs = load(f"{name}.json")
    if runs:
        rows = median_rows(runs, keys)
        table(title, rows, [(k, k) for k in keys])
