"""The race against Redis: the same scenarios through the Django Channels layer API for
``clients.channel_layer.BusChannelLayer``, ``channels_redis.core.RedisChannelLayer`` and
``channels_redis.pubsub.RedisPubSubChannelLayer``, in one invocation.

Usage::

    .venv/bin/python benchmarks/layers.py [--quick] [--repetitions N] [--layers bus,core,pubsub,...]
                                          [--scenarios p2p,rtt,fanout,many] [--capacity N]
                                          [--wait-quiet S] [--redo-noisy N] [--max-others F]
                                          [--scale F] [--timeout S] [--run-timeout S]
                                          [--json FILE] [--profile DIR]

    channelbus bench layers -- [the same options]

It needs ``redis-server`` on the PATH (``apt-get install redis-server``) and channels_redis
(``pip install -e '.[bench]'``). docs/performance.md has results and how to read them.

It starts its own ``redis-server`` (``--port <free port> --bind 127.0.0.1 --save '' --appendonly
no``) and its own broker (``python -m consumers.cli broker`` on loopback with ports ``*``), and
stops both by PID at the end. Every side of every scenario is a process of its own
(``multiprocessing`` with the spawn start method), talking to this one over a pipe; each is
stopped by its PID (SIGTERM, then SIGKILL) when it does not exit on its own. Loops are bounded
in count, each run by ``--run-timeout`` and the whole invocation by ``--timeout``.

Scenarios (message ``{"type": "bench.msg", "seq": i, "payload": <64 chars>}``):

- ``p2p``: one sender process awaiting each ``send`` to a normal channel, one receiver process;
  messages/s from the sender's first send to the receiver's last receive, losses, duplicates,
  ``ChannelFull`` retries (the sender sleeps 1 ms and retries the same message).
- ``rtt``: ping-pong over two normal channels between two processes; p50/p99 of a round trip.
- ``fanout``: 4 receiver processes x 25 channels (``new_channel()``, as consumers have) in one
  group, 1,000 ``group_send`` from a fifth process; deliveries/s and losses.
- ``many``: 1,000 channels (``new_channel()``) in one receiver process, one ``receive`` loop
  each; 20,000 messages sent round robin from another process; messages/s.

``--layers ...,floor`` adds a fourth contender for p2p, rtt and many (see layerbench/floor.py):
a plain Python ZeroMQ forwarder (one ROUTER loop and a table of who receives which channel) and
a bare asyncio client for it, with no capacity, expiry, acknowledgement or groups. It is the
least any layer with one central Python hop can cost here, so it shows which targets the
architecture allows at all.

``--layers ...,bus-curve`` adds the ``BusChannelLayer`` with CurveZMQ: a second broker of its
own, started with ``--secret-key`` and ``--authorized-keys``, and the layer with the CONFIG keys
``secret_key`` and ``server_key`` (every worker with the same client key, as the processes of one
Django project would have). The keys are made for the invocation in its temporary directory and
removed with it. Beside ``bus`` it gives the cost of encryption, in the "bus-curve / bus" column.

Every layer gets the same settings: ``capacity`` (``--capacity``, default 25,000: above any
channel's total in these scenarios, so a sender is not just throttled by ``ChannelFull`` and
``group_send`` never has a reason to skip a member) and ``expiry`` 60 s. The pubsub layer takes
neither: it has no capacity (``ChannelFull`` never happens) and delivers at most once to
whoever is subscribed at that moment; the table says so.

Before each timed phase the sender sends ``bench.probe`` messages until every receiving channel
has seen one (so a subscription that is not yet live costs pubsub nothing it would not cost in
production, and every layer starts warm); receivers ignore probes.

A 2-core host shared with other programs moves every figure, so each run also reports how busy
the CPUs were just before it and the share of CPU that no process of the run used during its
timed phase ("others during"). ``--wait-quiet S`` waits up to S seconds for idle CPUs before
each run; ``--redo-noisy N`` runs a run again (up to N times) when others used more than
``--max-others`` (0.15) of the CPUs, and lists the discarded figures. The details table gives
each side's CPU time per message (sender, receivers, broker or redis-server).

``--profile DIR`` runs every worker under cProfile (``DIR/<scenario>-<layer>-<role>-r<rep>.prof``)
and the broker too (``DIR/broker.prof``, and ``DIR/broker-curve.prof`` for the CURVE broker,
written when it stops).

``main(argv)`` is the entry point; it returns an exit status (0 when every run completed). The
code it runs lives in ``benchmarks/layerbench/``: ``roles`` (each worker process), ``services``
(redis-server, broker, stopping by PID, host CPU), ``run`` (one run of one scenario), ``report``
(medians and tables) and ``config`` (names, sizes, bounds).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time

# The package beside this file, importable both when run as a script and through
# ``channelbus bench`` (runpy); spawned workers inherit this sys.path and import it by name.
BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

from layerbench.config import (  # noqa: E402
    FULL, LAYER_SCENARIOS, LAYER_TITLES, LAYERS, OPTIONAL_LAYERS, QUICK, SCENARIOS,
)
from layerbench.report import METRICS, fmt, render, summarise  # noqa: E402
from layerbench.run import one_run  # noqa: E402
from layerbench.services import RunFailed, Services  # noqa: E402


# -- main -----------------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(prog="benchmarks/layers.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (1 repetition unless -r)")
    parser.add_argument("-r", "--repetitions", type=int, default=None, help="repetitions per run (default 3)")
    parser.add_argument("--layers", default=",".join(LAYERS),
                        help="comma-separated: bus,core,pubsub (default); bus-curve (the bus layer with"
                             " CURVE keys, against a broker of its own with keys) and floor (p2p, rtt,"
                             " many only) when named")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: p2p,rtt,fanout,many")
    parser.add_argument("--capacity", type=int, default=25_000, help="capacity given to every layer that has one")
    parser.add_argument("--timeout", type=float, default=3600.0, help="whole invocation, seconds")
    parser.add_argument("--run-timeout", type=float, default=300.0, help="one run of one scenario, seconds")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="before each run wait up to S seconds until the host's CPUs are idle")
    parser.add_argument("--max-others", type=float, default=0.15, metavar="FRACTION",
                        help="a run during which other programs used more than this share of the CPUs"
                             " is noisy (default 0.15)")
    parser.add_argument("--redo-noisy", type=int, default=0, metavar="N",
                        help="run a noisy run again, up to N times; the last attempt counts (default 0)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the message counts (not processes or channels), e.g. to profile")
    parser.add_argument("--json", metavar="FILE", help="also write every run's raw numbers here")
    parser.add_argument("--profile", metavar="DIR", help="cProfile every worker and the broker into DIR")
    opts = parser.parse_args(argv)
    opts.layers = [k.strip() for k in opts.layers.split(",") if k.strip()]
    opts.scenarios = [s.strip() for s in opts.scenarios.split(",") if s.strip()]
    for k in opts.layers:
        if k not in LAYERS + OPTIONAL_LAYERS:
            parser.error(f"unknown layer {k!r}; choose from {', '.join(LAYERS + OPTIONAL_LAYERS)}")
    for s in opts.scenarios:
        if s not in SCENARIOS:
            parser.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    if opts.repetitions is None:
        opts.repetitions = 1 if opts.quick else 3
    if opts.repetitions < 1:
        parser.error("--repetitions must be at least 1")
    return opts


def main(argv=None) -> int:
    opts = parse(sys.argv[1:] if argv is None else argv)
    sizes = dict(QUICK if opts.quick else FULL)
    if opts.scale != 1:  # message counts only (processes and channels stay), e.g. to profile longer
        for key in ("p2p", "rtt", "fanout_sends", "many_messages"):
            sizes[key] = max(1, int(sizes[key] * opts.scale))
    deadline = time.monotonic() + opts.timeout
    if opts.profile:
        os.makedirs(opts.profile, exist_ok=True)
        opts.profile = os.path.abspath(opts.profile)
    ctx = multiprocessing.get_context("spawn")
    results: dict = {s: {k: [] for k in opts.layers if s in LAYER_SCENARIOS.get(k, SCENARIOS)}
                     for s in opts.scenarios}
    discarded: list[dict] = []  # runs repeated because other programs competed for the CPUs
    failures = 0
    with tempfile.TemporaryDirectory(prefix="channelbus-layers-") as workdir:
        services = Services(workdir, opts.profile, deadline, floor="floor" in opts.layers,
                            curve="bus-curve" in opts.layers)
        log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
        log(f"redis-server pid {services.redis_pid} at {services.env['redis']};"
            f" broker pid {services.pids['broker']} at {services.env['bus']}"
            + (f"; CURVE broker pid {services.pids['broker-curve']} at {services.env['bus-curve']}"
               if "broker-curve" in services.pids else ""))
        try:
            for scenario in opts.scenarios:
                for rep in range(opts.repetitions):
                    for kind in results[scenario]:  # interleaved: drift on the host hits every layer alike
                        for attempt in range(1 + opts.redo_noisy):
                            res = one_run(scenario, kind, rep, opts, sizes, services, ctx, deadline, log)
                            if "error" in res:
                                failures += 1
                            noisy = (res.get("foreign") or 0.0) > opts.max_others
                            if not noisy or attempt == opts.redo_noisy or "error" in res:
                                break
                            res["discarded"] = True
                            discarded.append({"scenario": scenario, "layer": kind, "rep": rep, **res})
                            log(f"  (other programs used {res['foreign']:.0%} of the CPUs during that run:"
                                " running it again)")
                        results[scenario][kind].append(res)
        except RunFailed as exc:
            failures += 1
            log(f"stopped: {exc}")
        finally:
            for name in ("broker", "broker-curve"):
                broker_log = services.log_tail(name) if name in services.pids else "(empty)"
                if broker_log != "(empty)":
                    log(f"the {name.replace('-curve', ' with CURVE')} logged (warnings and errors,"
                        f" last lines):\n{broker_log}")
            services.close()
    summary = summarise(results)
    print(render(summary, opts.layers, opts, sizes))
    if discarded:
        print(f"\n{len(discarded)} run(s) were repeated because other programs used more than"
              f" {opts.max_others:.0%} of the CPUs during them (--max-others); their figures, not in the medians:")
        for d in discarded:
            label, unit, _ = METRICS[d["scenario"]]
            print(f"- {d['scenario']} {LAYER_TITLES[d['layer']]} rep {d['rep'] + 1}: {fmt(d.get('value'), unit)}"
                  f" (others {d['foreign']:.0%})")
    if opts.json:
        with open(opts.json, "w") as handle:
            json.dump({"sizes": sizes, "capacity": opts.capacity, "repetitions": opts.repetitions,
                       "python": platform.python_version(), "cpus": os.cpu_count(),
                       "results": results, "discarded": discarded, "summary": summary}, handle, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
