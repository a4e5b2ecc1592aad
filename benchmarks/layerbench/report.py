"""The results of the layers benchmark as text: ``summarise`` takes the median of each
scenario's runs per layer, and ``render`` writes the Markdown tables docs/performance.md shows
(medians with ratios and the issue's targets, then details per layer: each run, losses,
duplicates, retries, CPU per unit, host load) followed by the sizes and how to read the CPU
columns. ``fmt`` formats one figure for the tables and the progress log.
"""

from __future__ import annotations

import statistics

from .config import EXPIRY, LAYER_TITLES, SCENARIOS


METRICS = {  # scenario -> (row label, unit, higher is better)
    "p2p": ("p2p messages/s", "msg/s", True),
    "rtt": ("rtt p50", "ms", False),
    "fanout": ("fanout deliveries/s", "deliveries/s", True),
    "many": ("many messages/s", "msg/s", True),
}
TARGETS = {  # scenario -> (layer compared with, comparison, bound, text)
    "p2p": ("core", ">=", 15.0, ">= 15x core"),
    "many": ("core", ">=", 15.0, ">= 15x core"),
    "rtt": ("pubsub", "<=", 0.5, "<= 0.5x pubsub"),
    "fanout": ("pubsub", ">=", 1.2, ">= 1.2x pubsub, no losses"),
}
NOTES = {
    ("pubsub", "p2p"): "no capacity (ChannelFull never raised); at most once, to whoever is subscribed",
    ("pubsub", "many"): "no capacity (ChannelFull never raised); at most once, to whoever is subscribed",
    ("pubsub", "rtt"): "at most once",
    ("pubsub", "fanout"): "no capacity: nothing bounds a slow member's queue",
    **{("floor", s): "no capacity, expiry or acks; at most once: the least one central Python hop costs"
       for s in ("p2p", "rtt", "many")},
    **{("bus-curve", s): "CurveZMQ on both broker sockets; its own broker, with keys" for s in SCENARIOS},
}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(results: dict) -> dict:
    """results[scenario][layer] = list of run dicts (or {"error": ...}) -> medians."""
    summary = {}
    for scenario, by_layer in results.items():
        summary[scenario] = {}
        for kind, runs in by_layer.items():
            ok = [r for r in runs if "error" not in r]
            s = {"runs": len(runs), "ok": len(ok), "values": [r.get("value") for r in ok]}
            for side in ("sender", "receivers", "server"):
                s[f"cpu_{side}"] = median([r.get("cpu_us", {}).get(side) for r in ok])
            busy = [r.get("busy_before") for r in runs if r.get("busy_before") is not None]
            s["busy"] = max(busy) if busy else None
            foreign = [r.get("foreign") for r in ok if r.get("foreign") is not None]
            s["foreign"] = max(foreign) if foreign else None
            s["median"] = median(s["values"])
            if scenario == "rtt":
                s["p99"] = median([r["p99"] for r in ok])
            else:
                s["losses"] = [r["losses"] for r in ok]
                s["dups"] = [r["dups"] for r in ok]
                s["retries"] = [r["retries"] for r in ok]
                s["send_rate"] = median([r.get("send_rate") for r in ok])
            summary[scenario][kind] = s
    return summary


def fmt(value, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "ms":
        return f"{value * 1000:.3f} ms"
    return f"{value:,.0f}"


def _ratio(a, b, higher: bool) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def render(summary: dict, layers: list[str], opts, sizes: dict) -> str:
    lines = []
    head = ["scenario", *(LAYER_TITLES[k] for k in layers)]
    ratio_cols = []
    if "core" in layers:
        ratio_cols += [(k, "core") for k in layers if k != "core"]
    if "pubsub" in layers:
        ratio_cols += [(k, "pubsub") for k in ("bus", "bus-curve", "floor") if k in layers]
    if "bus-curve" in layers and "bus" in layers:
        ratio_cols.append(("bus-curve", "bus"))  # what CURVE costs the layer
    head += [f"{a} / {b}" for a, b in ratio_cols] + ["target", "met"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for scenario in SCENARIOS:
        if scenario not in summary:
            continue
        label, unit, higher = METRICS[scenario]
        by = summary[scenario]
        rows = [(label, "median")] + ([("rtt p99", "p99")] if scenario == "rtt" else [])
        for row_label, field in rows:
            cells = [row_label]
            for k in layers:
                s = by.get(k)
                cells.append("not run" if s is None else fmt(s.get(field), unit) if s["ok"] else "failed")
            for a, b in ratio_cols:
                ra = by.get(a, {}).get(field) if by.get(a, {}).get("ok") else None
                rb = by.get(b, {}).get(field) if by.get(b, {}).get("ok") else None
                r = _ratio(ra, rb, higher)
                cells.append("n/a" if r is None else f"{r:.2f}x")
            target_text, met = "", ""
            if field == "median" and scenario in TARGETS and "bus" in layers:
                other, cmp, bound, target_text = TARGETS[scenario]
                bus = by.get("bus", {})
                ref = by.get(other, {})
                r = _ratio(bus.get("median"), ref.get("median"), higher) if bus.get("ok") and ref.get("ok") else None
                if r is None:
                    met = "n/a"
                else:
                    ok = r >= bound if cmp == ">=" else r <= bound
                    if scenario == "fanout" and any(bus.get("losses") or []):
                        ok = False
                    met = ("yes" if ok else "**no**") + f" ({r:.2f}x)"
            cells += [target_text, met]
            lines.append("| " + " | ".join(cells) + " |")
    out = ["## Medians", "", *lines, "", "## Details per layer", ""]
    out.append("| scenario | layer | runs ok | each run | losses | duplicates | ChannelFull retries | sender alone"
               " | CPU µs per unit: sender / receiver(s) / broker, redis or forwarder | host busy before / others during (max)"
               " | note |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for scenario in SCENARIOS:
        if scenario not in summary:
            continue
        label, unit, _ = METRICS[scenario]
        for k in layers:
            s = summary[scenario].get(k)
            if not s:
                continue
            each = ", ".join(fmt(v, unit) for v in s["values"]) or "-"
            if scenario == "rtt":
                losses = dups = retries = sender = "-"
            else:
                losses = ", ".join(map(str, s["losses"])) or "-"
                dups = ", ".join(map(str, s["dups"])) or "-"
                retries = "n/a (no capacity)" if k in ("pubsub", "floor") else (", ".join(map(str, s["retries"])) or "-")
                per = "group_sends/s" if scenario == "fanout" else "sends/s"
                sender = f"{fmt(s['send_rate'], unit)} {per}" if s["send_rate"] else "-"
            busy = ("?" if s["busy"] is None else f"{s['busy']:.0%}") + " / " + (
                "?" if s["foreign"] is None else f"{s['foreign']:.0%}")
            cpu = " / ".join("?" if s[f"cpu_{side}"] is None else f"{s[f'cpu_{side}']:.0f}"
                             for side in ("sender", "receivers", "server"))
            out.append(f"| {scenario} | {LAYER_TITLES[k]} | {s['ok']}/{s['runs']} | {each} | {losses} | {dups} |"
                       f" {retries} | {sender} | {cpu} | {busy} | {NOTES.get((k, scenario), '')} |")
    out += ["", f"Sizes: p2p {sizes['p2p']:,} messages; rtt {sizes['rtt']:,} round trips;"
            f" fanout {sizes['fanout_procs']} processes x {sizes['fanout_channels']} channels,"
            f" {sizes['fanout_sends']:,} group_sends; many {sizes['many_channels']:,} channels,"
            f" {sizes['many_messages']:,} messages. capacity {opts.capacity:,}, expiry {EXPIRY} s"
            f" (bus and core; pubsub has neither). Medians of {opts.repetitions} repetition(s).",
            "", "CPU per unit: process CPU time of each side during the timed phase divided by the messages"
            " (p2p, many), round trips (rtt: sender = ping side, receiver = pong side) or group_sends (fanout;"
            " receivers summed over all receiver processes); broker (for the CURVE layer, its own broker),"
            " redis-server or the floor's forwarder from /proc."
            " Host busy before: all CPUs, just before the run (the broker and redis idle). Others during:"
            " CPU used by no process of the run during its timed phase, as a share of all CPUs (other"
            " programs on the host; /proc tick granularity makes small values noise)."]
    return "\n".join(out)

