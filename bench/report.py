#!/usr/bin/env python3
"""Markdown table, parley relay vs Go reference relay, from relayload results.

    report.py RESULTS.jsonl [--meta RUNS.jsonl] [--out FILE.md] [--repo DIR] ...

RESULTS.jsonl holds relayload's JSON result lines, one per run, labelled
``<relay>/<config>/r<rep>`` (relay: go or parley) by bench/run. Figures are
medians over the repetitions; losses and errors are the worst repetition.
The table (figure | Go | parley | parley/Go | target | met?) goes to stdout
and, with --out, to that file, under a header describing the machine.

bench/run also calls ``report.py --record-run ...`` after every run: it scans
the relay's log for crashes and warnings and prints one JSON line for
RUNS.jsonl (what relayload itself cannot see: a Python traceback, the relay's
exit status).

Standard library only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

RELAYS = ("go", "parley")

# ---------------------------------------------------------------- record-run

CRASH_RE = re.compile(
    rb"^.*(?:Traceback \(most recent call last\)|^panic:|fatal error|concurrent map|DATA RACE"
    rb"|out of memory|MemoryError| CRITICAL | ERROR ).*$",
    re.MULTILINE,
)
WARNING_RE = re.compile(rb"^.* WARNING .*$", re.MULTILINE)


def _samples(regex: re.Pattern[bytes], data: bytes, limit: int) -> tuple[int, list[str]]:
    count, samples = 0, []
    for m in regex.finditer(data):
        count += 1
        if len(samples) < limit:
            samples.append(m.group(0).decode("utf-8", "replace")[:300])
    return count, samples


def record_run(a: argparse.Namespace) -> None:
    out: dict = {
        "label": a.label,
        "relay": a.relay,
        "config": a.config,
        "rep": a.rep,
        "mode": a.mode,
        "args": a.args,
        "started": a.started == "1",
        "relayload_status": _int_or_none(a.relayload_status),
        "alive_before_stop": a.alive_before_stop == "1",
        "exit_status": _int_or_none(a.exit_status),
    }
    try:
        data = Path(a.relay_log).read_bytes()
    except OSError:
        data = b""
    out["log_bytes"] = len(data)
    out["crash_count"], out["crash_lines"] = _samples(CRASH_RE, data, 8)
    out["warning_count"], out["warning_lines"] = _samples(WARNING_RE, data, 3)
    print(json.dumps(out))


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "") else None
    except ValueError:
        return None


# ---------------------------------------------------------------- loading


def load_jsonl(path: str | None) -> list[dict]:
    rows: list[dict] = []
    if not path:
        return rows
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                print(f"report.py: {path}:{n}: skipped a line that is not JSON ({exc})", file=sys.stderr)
    return rows


def parse_label(label: str) -> tuple[str, str, int] | None:
    parts = (label or "").split("/")
    if len(parts) != 3 or parts[0] not in RELAYS or not re.fullmatch(r"r\d+", parts[2]):
        return None
    return parts[0], parts[1], int(parts[2][1:])


def get(r: dict | None, path: str, default=None):
    cur = r
    for k in path.split("."):
        if isinstance(cur, list):
            try:
                cur = cur[int(k)]
            except (ValueError, IndexError):
                return default
            continue
        if not isinstance(cur, dict) or k not in cur:
            return default
        cur = cur[k]
    return cur


# ---------------------------------------------------------------- aggregation


def median(values):
    vals = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(vals) if vals else None


def worst(values):
    vals = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return max(vals) if vals else None


def fnum(v, digits: int = 0) -> str:
    if v is None:
        return "–"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def fratio(go, parley) -> str:
    if go is None or parley is None or go == 0:
        return "–"
    r = parley / go
    if abs(r) < 0.1:
        return f"{r:.2g}×"
    return f"{r:.2f}×" if abs(r) < 100 else f"{r:,.0f}×"


class Figure:
    """One row: a number per relay (median over runs, or worst), its ratio and a target."""

    def __init__(self, name, extract, digits=0, agg=median, ratio=True, target=None, fmt=None):
        self.name = name
        self.extract = extract  # run -> number (or text when fmt is given)
        self.digits = digits
        self.agg = agg
        self.ratio = ratio
        self.target = target  # (text, check(go_value, parley_value) -> bool | None)
        self.fmt = fmt  # runs -> text, for compound cells


def ratio_at_least(k):
    return (f"≥ {k:g}× Go", lambda g, p: None if g in (None, 0) or p is None else p / g >= k)


def ratio_at_most(k):
    return (f"≤ {k:g}× Go", lambda g, p: None if g in (None, 0) or p is None else p / g <= k)


def at_most(k, unit=""):
    return (f"≤ {k:g}{unit}", lambda g, p: None if p is None else p <= k)


def at_least(k, unit=""):
    return (f"≥ {k:g}{unit}", lambda g, p: None if p is None else p >= k)


def equals_zero(text="0"):
    return (text, lambda g, p: None if p is None else p == 0)


def met_text(ok) -> str:
    return "–" if ok is None else ("yes" if ok else "**NO**")


def mb(kb):
    return None if kb is None else kb / 1024


# ---------------------------------------------------------------- figures per suite


def tp_errors(r):
    e = r.get("errors") or {}
    return (e.get("lost", 0) or 0), (e.get("delivered_failed", 0) or 0), (e.get("acks_missing", 0) or 0)


def throughput_figures(config: str) -> list[Figure]:
    m = re.fullmatch(r"tp-S(\d+)-W(\d+)", config)
    s, w = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    tp_target = p99_target = loss_target = None
    if (s, w) == (100, 1):
        tp_target, p99_target = ratio_at_least(0.5), ratio_at_most(2)
    elif (s, w) == (100, 16):
        tp_target, p99_target = ratio_at_least(0.6), ratio_at_most(0.5)
    elif (s, w) == (1000, 16):
        loss_target = (
            "0 lost, 0 missing acks",
            lambda g, p: None if p is None else (p[0] == 0 and p[2] == 0),
        )
    return [
        Figure("relayed msgs/s", lambda r: r.get("relayed_per_s"), target=tp_target),
        Figure("latency p50 ms", lambda r: get(r, "latency_ms.p50"), digits=2),
        Figure("latency p99 ms", lambda r: get(r, "latency_ms.p99"), digits=2, target=p99_target),
        Figure(
            "lost / DELIVERED_FAILED / missing acks (worst run)",
            tp_errors,
            agg=lambda vals: tuple(max(v[i] for v in vals) for i in range(3)) if vals else None,
            ratio=False,
            target=loss_target,
            fmt=lambda v: " / ".join(fnum(x) for x in v),
        ),
        Figure("relay CPU % of a core", lambda r: r.get("relay_cpu_pct"), ratio=False),
    ]


def idle_cycles(r):
    return r.get("cycles_detail") or []


def idle_held_mb(r):
    cyc = idle_cycles(r)
    start = get(r, "relay_mem_start.rss_kb") or (cyc[0].get("rss_before_kb") if cyc else None)
    if not cyc or start is None or cyc[-1].get("rss_after_close_kb") is None:
        return None
    return (cyc[-1]["rss_after_close_kb"] - start) / 1024


def idle_given_back_pct(r):
    cyc = idle_cycles(r)
    if not cyc:
        return None
    before, opened = cyc[0].get("rss_before_kb"), cyc[0].get("rss_open_kb")
    after = cyc[-1].get("rss_after_close_kb")
    if None in (before, opened, after) or opened <= before:
        return None
    return 100.0 * (opened - after) / (opened - before)


def idle_rss_path(r):
    cyc = idle_cycles(r)
    if not cyc:
        return None
    pts = [mb(cyc[0].get("rss_before_kb")), mb(cyc[0].get("rss_open_kb"))]
    pts += [mb(c.get("rss_after_close_kb")) for c in cyc]
    return tuple(pts)


def idle_errors(r):
    n = 0
    for c in idle_cycles(r):
        n += sum((c.get("errors") or {}).values()) + (c.get("dropped_by_relay_while_idle") or 0)
        if c.get("opened") is not None and r.get("conns") is not None:
            n += max(0, r["conns"] - c["opened"])
    return n


def idle_figures(config: str) -> list[Figure]:
    m = re.fullmatch(r"idle-N(\d+)", config)
    n = int(m.group(1)) if m else 0
    return [
        Figure(
            "kB per idle connection (cycle 1)",
            lambda r: get(r, "cycles_detail.0.rss_per_conn_kb"),
            digits=1,
            target=at_most(16, " kB") if n == 10000 else None,
        ),
        Figure(
            "RSS MB: before → open → after close of each cycle",
            idle_rss_path,
            agg=lambda vals: tuple(median([v[i] for v in vals]) for i in range(min(len(v) for v in vals)))
            if vals
            else None,
            ratio=False,
            fmt=lambda v: " → ".join(fnum(x, 1) for x in v),
        ),
        Figure("RSS held after the last close, MB above start", idle_held_mb, digits=1),
        Figure("memory given back after close, % of cycle-1 growth", idle_given_back_pct, digits=0, ratio=False),
        Figure("open N connections, s (cycle 1)", lambda r: get(r, "cycles_detail.0.open_s"), digits=2),
        Figure("release after close, s (cycle 1)", lambda r: get(r, "cycles_detail.0.release_s"), digits=2),
        Figure("errors + drops while idle (worst run)", idle_errors, agg=worst, ratio=False),
    ]


def slow_extra(r):
    ex = get(r, "stalled.extra_session") or {}
    sent = ex.get("sent")
    if sent is None:
        return None
    ok, failed = ex.get("acks_delivered", 0) or 0, ex.get("acks_delivered_failed", 0) or 0
    return (sent, ok, failed, sent - ok - failed)


def slow_figures(config: str) -> list[Figure]:
    return [
        Figure("others' msgs/s, control phase", lambda r: get(r, "control.relayed_per_s")),
        Figure("others' msgs/s, one receiver stalled", lambda r: get(r, "stalled.relayed_per_s")),
        Figure(
            "others' throughput, stalled / control",
            lambda r: r.get("throughput_ratio_stalled_vs_control"),
            digits=3,
            ratio=False,
            target=at_least(0.95),
        ),
        Figure("others' p99 ms, stalled phase", lambda r: get(r, "stalled.latency_ms.p99"), digits=2),
        Figure(
            "others' p99, stalled / control",
            lambda r: r.get("p99_ratio_stalled_vs_control"),
            digits=2,
            ratio=False,
        ),
        Figure(
            "others' frames lost, stalled phase (worst run)",
            lambda r: (get(r, "stalled.errors.lost", 0) or 0) + (get(r, "stalled.errors.delivered_failed", 0) or 0),
            agg=worst,
            ratio=False,
        ),
        Figure(
            "stalled session: sent / DELIVERED / DELIVERED_FAILED / no ack",
            slow_extra,
            agg=lambda vals: tuple(median([v[i] for v in vals]) for i in range(4)) if vals else None,
            ratio=False,
            fmt=lambda v: " / ".join(fnum(x) for x in v),
        ),
        Figure(
            "stalled session's frames lost: DELIVERED_FAILED (worst run)",
            lambda r: get(r, "stalled.extra_session.acks_delivered_failed"),
            agg=worst,
            ratio=False,
            target=equals_zero(),
        ),
    ]


def churn_alive(r):
    return 1 if r.get("relay_alive") else 0


def churn_settled_delta(r):
    a, b = get(r, "relay_mem_start.rss_kb"), get(r, "relay_mem_settled.rss_kb")
    return None if a is None or b is None else (b - a) / 1024


def churn_rss_path(r):
    pts = [mb(get(r, "relay_mem_start.rss_kb")), mb(get(r, "relay_mem_end.rss_kb")), mb(get(r, "relay_mem_settled.rss_kb"))]
    return None if None in pts else tuple(pts)


def churn_failures(r):
    return (sum((r.get("churn_failures") or {}).values()), r.get("connect_errors", 0) or 0)


def churn_figures(config: str) -> list[Figure]:
    return [
        Figure(
            "relay alive at the end (runs)",
            churn_alive,
            agg=lambda vals: (sum(vals), len(vals)) if vals else None,
            ratio=False,
            target=("alive", lambda g, p: None if p is None else p[0] == p[1]),
            fmt=lambda v: f"{v[0]}/{v[1]}",
        ),
        Figure("churn iterations/s", lambda r: r.get("churn_iterations_per_s"), digits=0),
        Figure(
            "churn failures / connect errors (worst run)",
            churn_failures,
            agg=lambda vals: tuple(max(v[i] for v in vals) for i in range(2)) if vals else None,
            ratio=False,
            fmt=lambda v: " / ".join(fnum(x) for x in v),
        ),
        Figure("sessions created", lambda r: r.get("sessions_created_approx")),
        Figure(
            "steady-pair frames lost (worst run)",
            lambda r: (r.get("steady_lost", 0) or 0) + (get(r, "steady.acks_delivered_failed", 0) or 0),
            agg=worst,
            ratio=False,
            target=equals_zero(),
        ),
        Figure("steady-pair p99 ms", lambda r: get(r, "steady_latency_ms.p99"), digits=2),
        Figure(
            "relay RSS MB: start → end of churn → settled",
            churn_rss_path,
            agg=lambda vals: tuple(median([v[i] for v in vals]) for i in range(3)) if vals else None,
            ratio=False,
            fmt=lambda v: " → ".join(fnum(x, 1) for x in v),
        ),
        Figure(
            "RSS settled − start, MB",
            churn_settled_delta,
            digits=1,
            ratio=False,
            target=at_most(10, " MB"),
        ),
    ]


SUITES = OrderedDict(
    [
        ("throughput", ("throughput", "tp-", throughput_figures)),
        ("idle", ("idle", "idle-", idle_figures)),
        ("slow", ("slow consumer", "slow-", slow_figures)),
        ("churn", ("churn", "churn-", churn_figures)),
    ]
)


# config name pattern -> its description from the match
_CONFIGS = [
    (r"tp-S(\d+)-W(\d+)", lambda m: f"S={int(m.group(1)):,} W={m.group(2)}"),
    (r"idle-N(\d+)", lambda m: f"N={int(m.group(1)):,}"),
    (r"slow-S(\d+)-W(\d+)", lambda m: f"S={m.group(1)} W={m.group(2)} (closed loop)"),
    (r"slow-S(\d+)-rate(\d+)", lambda m: f"S={m.group(1)}, {m.group(2)} msgs/s per sender, W=16"),
    (r"churn-K(\d+)-(\d+)s(-noreattach)?", lambda m: f"K={m.group(1)}, {m.group(2)} s" + (
        ", mix without reattach, parley retention 10 s" if m.group(3) else ", default mix")),
]


def describe_config(config: str) -> str:
    for pattern, describe in _CONFIGS:
        m = re.fullmatch(pattern, config)
        if m:
            return describe(m)
    return config


def cell(fig: Figure, value) -> str:
    if value is None:
        return "–"
    if fig.fmt:
        return fig.fmt(value)
    return fnum(value, fig.digits)


def build_tables(runs: dict) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    """Markdown lines and (config, figure, met) for every row with a target."""
    lines: list[str] = []
    verdicts: list[tuple[str, str, bool | None]] = []
    for suite, (title, prefix, figures_for) in SUITES.items():
        configs = [c for c in runs if c.startswith(prefix)]
        if not configs:
            continue
        lines += [f"### {title}", "", "| load | figure | Go | parley | parley/Go | target | met? |",
                  "|---|---|---:|---:|---:|---|---|"]
        for config in configs:
            by_relay = runs[config]
            load = name = describe_config(config)
            reps = "/".join(str(len(by_relay.get(rl, []))) for rl in RELAYS)
            for fig in figures_for(config):
                vals = {}
                for rl in RELAYS:
                    rs = by_relay.get(rl, [])
                    extracted = [fig.extract(r) for r in rs]
                    extracted = [x for x in extracted if x is not None]
                    vals[rl] = fig.agg(extracted) if extracted else None
                g, p = vals["go"], vals["parley"]
                ratio = fratio(g, p) if fig.ratio and not fig.fmt else "–"
                if fig.target:
                    ttext, check = fig.target
                    ok = check(g, p)
                    verdicts.append((name, fig.name, ok))
                    tcell, mcell = ttext, met_text(ok)
                else:
                    tcell = mcell = ""
                lines.append(f"| {load} | {fig.name} | {cell(fig, g)} | {cell(fig, p)} | {ratio} | {tcell} | {mcell} |")
                load = ""  # the load is named on its first row only
            if reps not in ("1/1",):
                lines.append(f"| | runs (Go/parley) | | | | | {reps} |")
        lines.append("")
    return lines, verdicts


# ---------------------------------------------------------------- anomalies


def anomalies(results: list[dict], meta: list[dict]) -> list[str]:
    notes: list[str] = []
    seen_labels = {r.get("label") for r in results}
    for m in meta:
        lab = m.get("label")
        if not m.get("started"):
            notes.append(f"`{lab}`: the relay did not start (see bench/run's output).")
            continue
        if m.get("relayload_status") not in (0, None):
            notes.append(f"`{lab}`: relayload exited with status {m['relayload_status']}"
                         + ("" if lab in seen_labels else " and wrote no result") + ".")
        if not m.get("alive_before_stop"):
            notes.append(f"`{lab}`: **the relay process was gone when the run ended** "
                         f"(exit status {m.get('exit_status')}).")
        elif m.get("exit_status") not in (0, 143, None):
            notes.append(f"`{lab}`: the relay exited with status {m.get('exit_status')} on SIGTERM.")
        if m.get("crash_count"):
            lines = "; ".join(f"`{x.strip()[:160]}`" for x in m.get("crash_lines", [])[:3])
            notes.append(f"`{lab}`: {m['crash_count']} error/crash line(s) in the relay log, e.g. {lines}.")
        if m.get("warning_count"):
            lines = "; ".join(f"`{x.strip()[:160]}`" for x in m.get("warning_lines", [])[:2])
            notes.append(f"`{lab}`: {m['warning_count']} warning line(s) in the relay log, e.g. {lines}.")
    for r in results:
        lab = r.get("label")
        mode = r.get("mode")
        for line in r.get("relay_log_crash_lines") or []:
            notes.append(f"`{lab}`: relayload found a crash line in the relay log: `{line[:160]}`.")
        if r.get("relay_alive") is False or r.get("relay_alive_at_exit") is False:
            notes.append(f"`{lab}`: relayload saw the relay die"
                         + (f" at {r['relay_died_at_s']:.2f} s" if (r.get("relay_died_at_s") or -1) >= 0 else "")
                         + ".")
        if mode == "throughput":
            errs = {k: v for k, v in (r.get("errors") or {}).items() if v}
            if errs:
                notes.append(f"`{lab}`: errors {json.dumps(errs)}"
                             + (f"; setup: {json.dumps(r.get('setup_errors'))}" if r.get("setup_errors") else "") + ".")
            if r.get("drained") is False:
                notes.append(f"`{lab}`: in-flight messages had not drained {r.get('drain_s')} s after sending stopped.")
        elif mode == "slow":
            for ph in ("control", "stalled"):
                errs = {k: v for k, v in (get(r, ph + ".errors") or {}).items() if v}
                if errs:
                    notes.append(f"`{lab}` ({ph} phase): others' errors {json.dumps(errs)}.")
            ex = get(r, "stalled.extra_session") or {}
            if ex:
                notes.append(
                    f"`{lab}`: stalled session sent {ex.get('sent')}, the stalled reader read "
                    f"{ex.get('received_by_peer')}, DELIVERED {ex.get('acks_delivered')}, "
                    f"DELIVERED_FAILED {ex.get('acks_delivered_failed')}, unanswered {ex.get('acks_pending')}"
                    + (f"; first DELIVERED_FAILED at {ex['first_failed_ack_at_s']} s" if "first_failed_ack_at_s" in ex else "")
                    + "."
                )
        elif mode == "idle":
            for c in r.get("cycles_detail") or []:
                errs = {k: v for k, v in (c.get("errors") or {}).items() if v}
                if errs or c.get("dropped_by_relay_while_idle"):
                    notes.append(f"`{lab}` cycle {c.get('cycle')}: open errors {json.dumps(errs)}, "
                                 f"dropped by the relay while idle: {c.get('dropped_by_relay_while_idle')}"
                                 + (f", e.g. {c['error_samples'][0]!r}" if c.get("error_samples") else "") + ".")
        elif mode == "churn":
            fails = r.get("churn_failures") or {}
            if fails or r.get("connect_errors"):
                samples = sorted(set(r.get("churn_failure_samples") or []))[:2]
                notes.append(f"`{lab}`: churn failures {json.dumps(fails)}, connect errors {r.get('connect_errors', 0)}"
                             + (f"; e.g. {'; '.join(repr(s) for s in samples)}" if samples else "") + ".")
            if r.get("steady_setup_errors"):
                notes.append(f"`{lab}`: steady pairs' setup errors {json.dumps(r['steady_setup_errors'])}.")
            st = r.get("steady") or {}
            errs = {k: st.get(k) for k in ("lost", "seq_gaps", "dup_or_reordered", "acks_delivered_failed",
                                           "acks_missing", "error_frames", "unexpected_disconnects") if st.get(k)}
            if errs:
                notes.append(f"`{lab}`: steady pairs {json.dumps(errs)}.")
        gen = r.get("gen_cpu_pct")
        if isinstance(gen, (int, float)) and gen >= 90:
            notes.append(f"`{lab}`: the generator used {gen:.0f}% of its core: it may have limited the load.")
    return notes


def explanations(results: list[dict]) -> list[str]:
    """Notes on how relayload's counters read against parley, shown when they apply."""
    out: list[str] = []
    reattach_timeouts = [
        r.get("label") for r in results
        if r.get("mode") == "churn" and (r.get("churn_failures") or {}).get("reattach:ack")
    ]
    if reattach_timeouts:
        out.append(
            "churn, default mix: relayload's `reattach` scenario REATTACHes a stale SID alone, sends one MSG and "
            "waits `-step-timeout` (5 s) for DELIVERED or DELIVERED_FAILED. A relay that stores the frame and "
            "answers QUEUED (parley, PROTOCOL 2.4) never sends either, so each such iteration ends as a "
            "`reattach:ack` failure after 5 s and holds up its worker: churn iterations/s is then not "
            f"comparable between the relays (runs: {', '.join(f'`{x}`' for x in reattach_timeouts)})."
            + (" The `mix without reattach` rows load both relays with the same scenarios."
               if any("noreattach" in (r.get("label") or "") for r in results) else "")
        )
    if any("noreattach" in (r.get("label") or "") for r in results):
        out.append(
            "churn, mix without reattach: parley keeps an unused invite code and an empty session for 10 "
            "minutes by default (PROTOCOL 2.3: codes expire; 2.4: empty sessions are freed after a TTL), so "
            "right after 60 s of churn its RSS holds those sessions on purpose (about 0.4-0.6 kB each). This "
            "run shortens both to 10 s (PARLEY_RELAY_CODE_TTL, PARLEY_RELAY_SESSION_TTL) so that the 30 s "
            "settle window tells a leak from retention; the Go relay frees nothing either way. The default-mix "
            "rows run parley with its defaults."
        )
    if any(r.get("mode") == "slow" for r in results):
        out.append(
            "slow consumer: the stalled receiver never reads, so relayload can only count what the sender was "
            "told. DELIVERED_FAILED is a frame the relay dropped and said so; \"no ack\" is a frame answered with "
            "neither DELIVERED nor DELIVERED_FAILED (e.g. QUEUED, or nothing). A frame answered DELIVERED to a "
            "legacy (side-less) receiver whose connection the relay later drops is lost without any counter "
            "showing it."
        )
    return out


# ---------------------------------------------------------------- per-run appendix


def appendix(results: list[dict]) -> list[str]:
    lines = ["### every run", "", "| run | mode | headline | relay CPU % | gen CPU % | relay RSS end MB |",
             "|---|---|---|---:|---:|---:|"]
    for r in results:
        mode = r.get("mode")
        if mode == "throughput":
            head = (f"{fnum(r.get('relayed_per_s'))} msgs/s, p99 {fnum(get(r, 'latency_ms.p99'), 2)} ms, "
                    f"max {fnum(get(r, 'latency_ms.max'), 1)} ms, setup {fnum(r.get('setup_s'), 2)} s")
            cpu, gen, rss = r.get("relay_cpu_pct"), r.get("gen_cpu_pct"), mb(get(r, "relay_mem_end.rss_kb"))
        elif mode == "slow":
            head = (f"control {fnum(get(r, 'control.relayed_per_s'))} → stalled {fnum(get(r, 'stalled.relayed_per_s'))} "
                    f"msgs/s, p99 {fnum(get(r, 'control.latency_ms.p99'), 2)} → {fnum(get(r, 'stalled.latency_ms.p99'), 2)} ms")
            cpu, gen, rss = get(r, "stalled.relay_cpu_pct"), get(r, "stalled.gen_cpu_pct"), mb(get(r, "stalled.relay_mem_end.rss_kb"))
        elif mode == "idle":
            cyc = r.get("cycles_detail") or []
            head = "; ".join(
                f"c{c.get('cycle')}: {fnum(c.get('rss_per_conn_kb'), 1)} kB/conn, open {fnum(c.get('open_s'), 2)} s, "
                f"after close {fnum(mb(c.get('rss_after_close_kb')), 1)} MB" for c in cyc)
            cpu, gen, rss = None, None, mb(get(r, "relay_mem_end.rss_kb"))
        elif mode == "churn":
            head = (f"{fnum(r.get('churn_iterations_per_s'))} iter/s, {fnum(r.get('sessions_created_approx'))} sessions, "
                    f"steady lost {r.get('steady_lost')}, steady p99 {fnum(get(r, 'steady_latency_ms.p99'), 2)} ms, "
                    f"settled {fnum(mb(get(r, 'relay_mem_settled.rss_kb')), 1)} MB")
            cpu, gen, rss = r.get("relay_cpu_pct"), r.get("gen_cpu_pct"), mb(get(r, "relay_mem_end.rss_kb"))
        else:
            continue
        lines.append(f"| `{r.get('label')}` | {mode} | {head} | {fnum(cpu)} | {fnum(gen)} | {fnum(rss, 1)} |")
    lines.append("")
    return lines


# ---------------------------------------------------------------- header


def _cmd(args: list[str], cwd: str | None = None) -> str:
    try:
        p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=20)
        return p.stdout.strip() if p.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def sources_digest(folder: str | None) -> str:
    if not folder or not os.path.isdir(folder):
        return ""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".go"):
            h.update(name.encode() + b"\0" + Path(folder, name).read_bytes())
    return h.hexdigest()[:12]


def header(a: argparse.Namespace, results: list[dict]) -> list[str]:
    repo = a.repo or str(Path(__file__).resolve().parent.parent)
    commit = _cmd(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo) or "unknown"
    dirty = [ln[3:] for ln in _cmd(["git", "status", "--porcelain"], cwd=repo).splitlines()
             if ln[3:] and not ln[3:].startswith("bench/")]
    go = _cmd([shutil.which("go") or "go", "version"]) or "unknown"
    now = dt.datetime.now(dt.timezone.utc)
    times = sorted(r["time"] for r in results if isinstance(r.get("time"), str))
    when = f"{now:%Y-%m-%d %H:%M} UTC (report)"
    if times:
        try:
            t0 = dt.datetime.fromisoformat(times[0].replace("Z", "+00:00"))
            t1 = dt.datetime.fromisoformat(times[-1].replace("Z", "+00:00"))
            now = t0
            when = f"{t0:%Y-%m-%d %H:%M}–{t1:%H:%M} UTC (first to last run)"
        except ValueError:
            pass
    elapsed = int(a.elapsed) if a.elapsed else None
    kind = "quick smoke run (short durations, fewer loads): not for comparison" if a.quick == "1" else "full suite"
    lines = [
        f"# parley relay vs Go reference relay ({now:%Y-%m-%d})",
        "",
        f"- date: {when}; {kind}"
        + (f"; all runs took {elapsed // 60} min {elapsed % 60} s" if elapsed is not None else ""),
        f"- machine: {a.machine or platform.node()}; nproc {os.cpu_count()}; CPU {cpu_model()}; "
        f"{mem_total_gib()}; kernel {platform.system()} {platform.release()} {platform.machine()}",
        f"- pinning: relay on CPU {a.relay_cpus}, relayload on CPU {a.gen_cpus} (taskset); loopback 127.0.0.1 only; "
        "a fresh relay process per run",
        f"- parley: commit {commit}"
        + (f" (**{a.commit_at_start} when the runs started: the checkout changed during the run**)"
           if a.commit_at_start and a.commit_at_start not in ("unknown", commit) else "")
        + (f" with uncommitted changes to {', '.join(dirty[:6])}" if dirty else "")
        + f"; Python {platform.python_version()}; relay settings "
        "PARLEY_RELAY_STORE=" + os.environ.get("PARLEY_RELAY_STORE", ":memory:")
        + ", PARLEY_RELAY_JOINS_PER_ADDRESS=" + os.environ.get("PARLEY_RELAY_JOINS_PER_ADDRESS", "1000000")
        + ", PARLEY_RELAY_LOG_LEVEL=" + os.environ.get("PARLEY_RELAY_LOG_LEVEL", "warning"),
        f"- Go: {go}; Go reference relay: conformance/go-relay at the same commit (it logs a line per frame, "
        "to a file here, which costs it CPU that parley, at log level warning, does not spend)",
        f"- relayload: sources {a.relayload_src or '?'}"
        + (f" (sha256 of *.go: {sources_digest(a.relayload_src)})" if sources_digest(a.relayload_src) else "")
        + "; payloads of 256 hex chars (-msg-bytes 100)",
        f"- repetitions: {a.reps} per load (figures are medians; losses and errors the worst run); suites: {a.suites or 'all'}",
        "",
        "Targets apply to parley. \"parley/Go\" divides parley's figure by Go's (higher is better for msgs/s, "
        "lower for latency and memory). S = session pairs, W = messages in flight per sender, N = idle "
        "connections, K = churn workers.",
        "",
    ]
    return lines


# ---------------------------------------------------------------- main


def report(a: argparse.Namespace) -> int:
    results = load_jsonl(a.results)
    meta = load_jsonl(a.meta)
    runs: dict[str, dict[str, list[dict]]] = OrderedDict()
    for r in results:
        parsed = parse_label(r.get("label", ""))
        if not parsed:
            print(f"report.py: skipped a result with label {r.get('label')!r}", file=sys.stderr)
            continue
        relay, config, _rep = parsed
        runs.setdefault(config, {}).setdefault(relay, []).append(r)
    # make every config that a run was attempted for appear, even with no result
    for m in meta:
        runs.setdefault(m.get("config", "?"), {})
    tables, verdicts = build_tables(runs)
    out = header(a, results)
    checked = [v for v in verdicts if v[2] is not None]
    missed = [v for v in checked if not v[2]]
    out += [
        f"**Targets: {len(checked) - len(missed)} of {len(checked)} met**"
        + (" (not met: " + "; ".join(f"{l}: {f}" for l, f, _ in missed) + ")" if missed else "")
        + (f"; {len(verdicts) - len(checked)} could not be judged" if len(verdicts) > len(checked) else ""),
        "",
    ]
    out += tables
    notes = anomalies(results, meta)
    out += ["### what the runs showed besides the figures", ""]
    out += [f"- {n}" for n in notes] or ["- nothing: no crash, error line, loss or failure in any run"]
    out.append("")
    expl = explanations(results)
    if expl:
        out += ["### how to read some figures", ""] + [f"- {e}" for e in expl] + [""]
    out += appendix(results)
    text = "\n".join(out).rstrip() + "\n"
    sys.stdout.write(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", help="relayload JSONL results")
    p.add_argument("--meta", help="bench/run's per-run records (JSONL)")
    p.add_argument("--out", help="also write the markdown here")
    p.add_argument("--repo")
    p.add_argument("--reps", default="1")
    p.add_argument("--quick", default="0")
    p.add_argument("--elapsed")
    p.add_argument("--relay-cpus", default="0")
    p.add_argument("--gen-cpus", default="1")
    p.add_argument("--machine")
    p.add_argument("--relayload-src")
    p.add_argument("--suites")
    p.add_argument("--commit-at-start")
    # --record-run: one JSON line about a finished run
    p.add_argument("--record-run", action="store_true")
    for flag in ("label", "relay", "config", "rep", "mode", "started", "relayload-status",
                 "alive-before-stop", "exit-status", "relay-log", "args"):
        p.add_argument("--" + flag)
    a = p.parse_args(argv)
    if a.record_run:
        record_run(a)
        return 0
    if not a.results:
        p.error("RESULTS.jsonl is required")
    return report(a)


if __name__ == "__main__":
    sys.exit(main())
