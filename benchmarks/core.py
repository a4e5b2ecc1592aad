"""Core benchmark: the bus against a raw pyzmq reference, sender and receiver in separate processes.

Usage::

    .venv/bin/python benchmarks/core.py [--messages N] [--rtt N] [--window W] [--timeout S]
                                        [--repeat N] [--no-floor] [--no-curve] [--busy-poll US,...]
                                        [--json] [--profile DIR]

One invocation runs six set-ups (by default) with the same 64-byte payload (a msgpack map
``{"type": "bench", "seq": <8 bytes>, "pad": <bytes>}`` that serialises to exactly 64 bytes):

(a) reference: a plain-Python forwarder process (ROUTER, ``ROUTER_MANDATORY``) that passes each
    message from the sender's DEALER to the receiver's DEALER by routing id, the receiver a
    DEALER in a third process, both blocking. Throughput: N messages, timed from the sender's
    first send to the receiver's last receive. Round trip: ping-pong through the forwarder.
(b) asyncio floor: the same forwarder and the same DEALERs, read from an asyncio loop through
    their FDs with nothing else (``corebench.reference.AsyncDealer``): what an asyncio client
    costs on this hop before it does any work of the bus's. Skip it with ``--no-floor``.
(c) bus: a real broker (``python -m consumers.cli broker`` on 127.0.0.1 with ports ``*`` and
    otherwise its defaults: no ``CHANNELBUS_*`` variable of the calling shell is passed on) and an
    ``AsyncClient`` in each of two processes. Throughput: N ``send`` calls to a normal channel of
    capacity ``--capacity`` from ``--window`` concurrent send loops (default 1: an awaiting
    sender, which the client pipelines with reserved slots; ``ChannelFull`` is retried with
    backoff while later sends wait), received and checked for order by the other process.
    Round trip: ping-pong over two normal channels.
(d) busy-poll bus: the same with the broker's ``--busy-poll`` set, one set-up for each value
    given to ``--busy-poll`` (default 200 µs; ``none`` for no such set-up): the broker polls for
    the next command that long before it sleeps, which spares wake-ups for a busy CPU
    (docs/configuration.md, "Busy polling").
(e) CURVE: (a) and (c) again with CurveZMQ on, each shown beside its plain row. The forwarder
    gets a secret key and its DEALERs key pairs and its public key (no ZAP handler: libzmq lets
    any key in); the broker runs with ``--secret-key`` and ``--authorized-keys`` (its ZAP handler
    checks each client's key once, at the handshake) and each ``AsyncClient`` with
    ``secret_key`` and ``server_key``. The reference pair shows what encryption costs libzmq on
    this hop, the bus pair what it costs the bus; the keys are made for the run in a temporary
    directory, removed at the end. Skip both with ``--no-curve``.

The table also shows the CPU time (user + system, all threads, from /proc) each process spent per
message during the throughput phase and per round trip during the latency phase: on a busy host
they are steadier than the rates. "others" is the share of all CPUs that no process of the
set-up used during its two phases (other programs on the host; the largest of the runs with
``--repeat``): where it is high, the rates of that row are not the set-up's alone. The code each process runs is in ``corebench/``.

Every child is a subprocess of this one (``sys.executable`` running this file with ``--role``
or the broker CLI); each is stopped by its PID (SIGTERM, then SIGKILL) when it does not exit on
its own. Every loop is bounded in count and in time (``--timeout``). ``--profile DIR`` runs every
child under cProfile and writes ``DIR/<role>.prof``.

``main(argv)`` is the entry point for ``channelbus bench``; it returns an exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

HERE = os.path.abspath(__file__)
BENCHMARKS = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCHMARKS)
# The package beside this file and the checkout's own broker and clients, importable both when
# run as a script and through ``channelbus bench`` (runpy); the children run this file again.
for _path in (ROOT, BENCHMARKS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import shutil  # noqa: E402
import tempfile  # noqa: E402

from corebench import bus, reference  # noqa: E402
from corebench.children import Child, cpu_seconds  # noqa: E402
from corebench.common import HOST, PAYLOAD_SIZE  # noqa: E402
from layerbench.services import host_cpu_seconds  # noqa: E402

ROLES = {
    "forwarder": reference.role_forwarder, "ref-receiver": reference.role_ref_receiver,
    "ref-sender": reference.role_ref_sender, "floor-receiver": reference.role_floor_receiver,
    "floor-sender": reference.role_floor_sender, "bus-receiver": bus.role_bus_receiver,
    "bus-sender": bus.role_bus_sender,
}


# -- parent side ------------------------------------------------------------------------------

def _role_argv(role: str, endpoint: str, opts, keys: tuple[str, str] | None = None) -> list[str]:
    """A client child's arguments; ``keys``: (its secret key file, the server's public key file)."""
    return [
        HERE, "--role", role, "--endpoint", endpoint, "--messages", str(opts.messages),
        "--rtt", str(opts.rtt), "--warmup", str(opts.warmup), "--window", str(opts.window),
        "--capacity", str(opts.capacity), "--timeout", str(opts.timeout),
        *(() if keys is None else ("--secret-key", keys[0], "--server-key", keys[1])),
    ]


class CurveKeys:
    """Key pairs for the CURVE set-ups, made in a temporary directory (mode 0700) that
    ``remove()`` deletes: the server's (broker or forwarder), one per client role, and a
    directory holding only the clients' public keys (the broker's ``--authorized-keys``)."""

    CLIENTS = ("sender", "receiver")

    def __init__(self) -> None:
        import zmq.auth

        self.directory = tempfile.mkdtemp(prefix="channelbus-core-keys-")
        try:
            self.authorized = os.path.join(self.directory, "authorized")
            os.mkdir(self.authorized)
            self.server_public, self.server_secret = zmq.auth.create_certificates(self.directory, "server")
            for name in self.CLIENTS:
                public, _ = zmq.auth.create_certificates(self.directory, name)
                shutil.copy(public, self.authorized)
        except BaseException:
            self.remove()
            raise

    def client(self, role: str) -> tuple[str, str]:
        """(the role's secret key file, the server's public key file)."""
        return os.path.join(self.directory, f"{role}.key_secret"), self.server_public

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _others(host0, ours0: dict, wall0: float, roles: dict) -> float | None:
    """The share of all CPUs that none of the set-up's processes used since ``host0`` (other
    programs on the host, and this parent, which only waits), or None if unknown."""
    host1, wall1 = host_cpu_seconds(), time.monotonic()
    ours1 = [cpu_seconds(child.proc.pid) for child in roles.values()]
    if host0 is None or host1 is None or None in ours1 or None in ours0.values():
        return None
    foreign = (host1 - host0) - (sum(ours1) - sum(ours0.values()))
    return max(0.0, foreign) / max(1e-9, (wall1 - wall0) * (os.cpu_count() or 1))


def _cpu_now(roles: dict, main_thread: bool = False) -> dict:
    return {role: cpu_seconds(child.proc.pid, main_thread) for role, child in roles.items()}


def _cpu_per(roles: dict, before: dict, units: int, main_thread: bool = False) -> dict:
    """CPU µs each process (or its main thread) spent per unit since ``before`` (None where
    /proc is not there)."""
    out = {}
    for role, now in _cpu_now(roles, main_thread).items():
        out[role] = None if now is None or before[role] is None else (now - before[role]) * 1e6 / max(1, units)
    return out


def _run_pair(prefix: str, endpoint: str, opts, deadline: float, children: list, env: dict,
              keys: CurveKeys | None = None) -> dict:
    tag = "-curve" if keys else ""  # (the children's names: profile files)
    for side in ("receiver", "sender"):
        children.append(Child(f"{prefix}{tag}-{side}", _role_argv(
            f"{prefix}-{side}", endpoint, opts, keys and keys.client(side)), env, opts.profile))
    receiver, sender = children[-2:]
    receiver.expect(deadline, "ready")
    sender.expect(deadline, "ready")
    middle = children[0]  # the forwarder or the broker
    roles = {"sender": sender, "middle": middle, "receiver": receiver}
    # CPU time per message and per round trip: steadier than the rates on a busy host.
    # The main threads' share (Python, and libzmq's calls made from it) apart from the I/O
    # threads' (where libzmq moves, and with CURVE encrypts, every frame): the JSON's main_us_*.
    before, before_main = _cpu_now(roles), _cpu_now(roles, True)
    host0, ours0, wall0 = host_cpu_seconds(), dict(before), time.monotonic()
    sender.tell("go")
    sent = sender.expect(deadline, "t0")
    got = receiver.expect(deadline, "received")
    cpu_msg = _cpu_per(roles, before, got["received"])
    main_msg = _cpu_per(roles, before_main, got["received"], True)
    before, before_main = _cpu_now(roles), _cpu_now(roles, True)
    sender.tell("go")
    rtt = sender.expect(deadline, "rtt")["rtt"]
    receiver.expect(deadline, "answered")
    cpu_rt = _cpu_per(roles, before, opts.rtt + opts.warmup)
    main_rt = _cpu_per(roles, before_main, opts.rtt + opts.warmup, True)
    others = _others(host0, ours0, wall0, roles)
    elapsed = got["t_end"] - sent["t0"]
    complete = got["received"] == opts.messages
    return {
        "messages": got["received"], "sent": sent["sent"], "seconds": elapsed,
        "msgs_per_s": got["received"] / elapsed if elapsed > 0 and complete else None,
        "in_order": got["disorder"] == 0, "disorder": got["disorder"], "retries": sent.get("retries", 0),
        "rtt_n": rtt["n"], "p50_us": _us(rtt["p50"]), "p99_us": _us(rtt["p99"]),
        "cpu_us_per_msg": cpu_msg, "cpu_us_per_rt": cpu_rt, "others": others,
        "main_us_per_msg": main_msg, "main_us_per_rt": main_rt,
    }


def _us(seconds):
    return None if seconds is None else seconds * 1e6


BROKER_LINE = re.compile(r"channelbus broker listening on (\S+), publishing on (\S+)")


def _stop_all(children: list) -> None:
    """The clients (which exit on their own) first, then the middle (children[0]) at once."""
    for child in reversed(children):
        child.stop(grace=0.0 if child is children[0] else 5.0)


def _run_forwarded(prefix: str, opts, deadline: float, env: dict, keys: CurveKeys | None = None) -> dict:
    """The reference forwarder with the ``prefix`` clients (ref: blocking, floor: asyncio);
    with ``keys``, CURVE on the forwarder and its clients."""
    children: list[Child] = []
    try:
        secret = ("--secret-key", keys.server_secret) if keys else ()
        forwarder = Child("forwarder-curve" if keys else "forwarder",
                          [HERE, "--role", "forwarder", "--timeout", str(opts.timeout), *secret], env, opts.profile)
        children.append(forwarder)
        endpoint = forwarder.expect(deadline, "endpoint")["endpoint"]
        return _run_pair(prefix, endpoint, opts, deadline, children, env, keys)
    finally:
        _stop_all(children)


def run_reference(opts, deadline: float, env: dict, keys: CurveKeys | None = None) -> dict:
    return _run_forwarded("ref", opts, deadline, env, keys)


def run_floor(opts, deadline: float, env: dict) -> dict:
    return _run_forwarded("floor", opts, deadline, env)


def run_bus(opts, deadline: float, env: dict, busy_poll: int | None = None, keys: CurveKeys | None = None) -> dict:
    """The bus: a broker with its defaults (or ``--busy-poll busy_poll``) and two AsyncClients;
    with ``keys``, a broker with ``--secret-key`` and ``--authorized-keys`` and clients with keys."""
    children: list[Child] = []
    try:
        curve = ("--secret-key", keys.server_secret, "--authorized-keys", keys.authorized) if keys else ()
        broker = Child("broker-curve" if keys else "broker", [
            "-m", "consumers.cli", "broker", "--bind", f"tcp://{HOST}:*",
            "--pub-bind", f"tcp://{HOST}:*", "--log-level", "WARNING",
            *(() if busy_poll is None else ("--busy-poll", str(busy_poll))), *curve,
        ], env, opts.profile)
        children.append(broker)
        endpoint = broker.expect(deadline, pattern=BROKER_LINE).group(1)
        return _run_pair("bus", endpoint, opts, deadline, children, env, keys)
    finally:
        _stop_all(children)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a, b):
    return a / b if a is not None and b else None


def setups(opts) -> list[tuple]:
    """(key, row label, runner) of each set-up, in the order they run and are shown. A runner
    takes (opts, deadline, env, keys): ``keys`` is the invocation's CurveKeys (None without the
    CURVE set-ups), which only the CURVE set-ups use."""
    def plain(run, **extra):
        return lambda opts, deadline, env, keys: run(opts, deadline, env, **extra)

    found = [("reference", "reference (pyzmq forwarder)", plain(run_reference))]
    if opts.curve:
        found.append(("reference-curve", "reference, CURVE", run_reference))
    if opts.floor:
        found.append(("floor", "asyncio floor (same, asyncio)", plain(run_floor)))
    found.append(("bus", "bus (AsyncClient + broker)", plain(run_bus)))
    if opts.curve:
        found.append(("bus-curve", "bus, CURVE", lambda opts, deadline, env, keys: run_bus(opts, deadline, env, keys=keys)))
    for value in opts.busy_poll:
        found.append((f"busy{value}", f"bus, broker --busy-poll {value}", plain(run_bus, busy_poll=value)))
    return found


def report(results: dict, opts) -> str:
    """The table: throughput and round trip per set-up, CPU per message and per round trip,
    and the ratios the issue's targets are about."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = [
        f"channelbus core benchmark: {opts.messages} messages, {opts.rtt} round trips,"
        f" {PAYLOAD_SIZE}-byte payload, bus window {opts.window}, capacity {opts.capacity}"
        + (f", median of {opts.repeat} runs" if opts.repeat > 1 else "")
        + (f"; {os.cpu_count()} CPUs, load {load:.1f}" if load is not None else ""),
        f"{'':30}{'msgs/s':>9}{'p50 us':>8}{'p99 us':>8}  CPU us/msg send/mid/recv"
        "  CPU us/rt send/mid/recv  others  notes",
    ]
    for key, name, _ in setups(opts):
        r = results.get(key)
        if r is None:
            continue
        notes = [] if r["in_order"] else [f"OUT OF ORDER ({r['disorder']} jumps)"]
        if r["messages"] != opts.messages:
            notes.append(f"only {r['messages']} received")
        if r.get("retries"):
            notes.append(f"{r['retries']} ChannelFull retries")
        cpu = [_fmt((r.get(per) or {}).get(role), spec) for per, spec in
               (("cpu_us_per_msg", ".1f"), ("cpu_us_per_rt", ".0f")) for role in ("sender", "middle", "receiver")]
        rows.append(
            f"{name:30}{_fmt(r['msgs_per_s'], ',.0f'):>9}{_fmt(r['p50_us'], '.0f'):>8}"
            f"{_fmt(r['p99_us'], '.0f'):>8}  {'/'.join(cpu[:3]):>24}  {'/'.join(cpu[3:]):>23}"
            f"  {_fmt(r.get('others'), '.0%'):>6}  {', '.join(notes)}"
        )
    ref, floor = results["reference"], results.get("floor")
    compared = [("bus / reference", results["bus"],
                 "(throughput share, target >= 40%; p50 multiple, target <= 2x)")]
    compared += [(f"--busy-poll {value} / reference", results[f"busy{value}"],
                  "(the same with the broker's --busy-poll set)") for value in opts.busy_poll]
    for label, r, note in compared:
        if r is not None:
            rows.append(
                f"{label:30}{_fmt(_ratio(r['msgs_per_s'], ref['msgs_per_s']), '.1%'):>9}"
                f"{_fmt(_ratio(r['p50_us'], ref['p50_us']), '.2f') + 'x':>8}          {note}"
            )
    if floor is not None:
        rows.append(
            f"{'asyncio floor / reference':30}{'':9}{_fmt(_ratio(floor['p50_us'], ref['p50_us']), '.2f') + 'x':>8}"
            "          (what an asyncio client costs on this hop before any bus work)"
        )
    curve = [("reference CURVE / plain", results.get("reference-curve"), ref, "libzmq's encryption alone"),
             ("bus CURVE / plain", results.get("bus-curve"), results["bus"], "what it costs the bus"),
             ("bus CURVE / reference CURVE", results.get("bus-curve"), results.get("reference-curve"),
              "the bus's ratios with CURVE on both")]
    for label, r, plain, note in curve:
        if r is not None and plain is not None:
            rows.append(
                f"{label:30}{_fmt(_ratio(r['msgs_per_s'], plain['msgs_per_s']), '.1%'):>9}"
                f"{_fmt(_ratio(r['p50_us'], plain['p50_us']), '.2f') + 'x':>8}          ({note})"
            )
    costs = [(name, results.get(f"{key}-curve"), results.get(key)) for key, name in (("reference", "reference"), ("bus", "bus"))]
    if any(r is not None for _, r, _ in costs):
        rows.append(f"{'what CURVE added':30}{'p50 us':>9}  {'CPU us/msg all (main)':>22}  {'CPU us/rt all (main)':>21}")
        for name, r, plain in costs:
            if r is not None and plain is not None:
                rows.append(f"{name:30}{_delta(r, plain, 'p50'):>9}  {_cost(r, plain, 'msg', '+.1f'):>22}"
                            f"  {_cost(r, plain, 'rt', '+.0f'):>21}")
        rows.append("(CPU: the 3 processes together; main: their main threads, where Python runs; the rest"
                    " ran in libzmq's I/O threads, which move every frame and with CURVE encrypt it)")
    return "\n".join(rows)


def _cpu_total(r: dict, per: str):
    """CPU µs per unit of the three processes together (None if any is unknown)."""
    values = [(r.get(per) or {}).get(role) for role in ("sender", "middle", "receiver")]
    return None if None in values else sum(values)


def _delta(curve: dict, plain: dict, per: str, spec: str = "+.0f") -> str:
    """CURVE's row minus the plain one: ``per`` is "p50" or a CPU figure summed over the roles."""
    a, b = (curve["p50_us"], plain["p50_us"]) if per == "p50" else (_cpu_total(curve, per), _cpu_total(plain, per))
    return "?" if a is None or b is None else format(a - b, spec)


def _cost(curve: dict, plain: dict, unit: str, spec: str) -> str:
    """What CURVE added to the CPU per ``unit`` ("msg" or "rt"): all threads (main threads)."""
    return f"{_delta(curve, plain, f'cpu_us_per_{unit}', spec)} ({_delta(curve, plain, f'main_us_per_{unit}', spec)})"


def _microseconds_list(text: str) -> list[int]:
    """``"0,200"`` -> [0, 200]; ``"none"`` -> []: values of the broker's --busy-poll."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole numbers such as 0,200") from None
    if not all(0 <= value <= 10_000 for value in values) or len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: each value once, from 0 to 10000 (the broker's limit)")
    return values


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="messages for throughput (default 20000)")
    parser.add_argument("--rtt", type=int, default=2000, help="round trips for latency (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured round trips first (default 200)")
    parser.add_argument("--window", type=int, default=1, help="bus send() calls awaited concurrently (default 1: one awaiting sender, which the client pipelines with reserved slots)")
    parser.add_argument("--capacity", type=int, default=10000, help="bus channel capacity (default 10000)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="overall limit in seconds (default 120 per repetition)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each set-up; medians are shown (default 1)")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the asyncio floor (the reference forwarder with bare asyncio clients)")
    parser.add_argument("--no-curve", dest="curve", action="store_false",
                        help="skip the two CURVE set-ups (the reference and the bus again with CurveZMQ"
                             " encryption, keys made for the run)")
    parser.add_argument("--busy-poll", type=_microseconds_list, default=[200], metavar="US[,US...]",
                        help="also run the bus with its broker's --busy-poll at each of these"
                             " microseconds, a set-up each (default 200; 'none': no such set-up)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--profile", metavar="DIR", help="run each process under cProfile into DIR")
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--secret-key", help=argparse.SUPPRESS)  # (a child's own key file, CURVE)
    parser.add_argument("--server-key", help=argparse.SUPPRESS)  # (a client child's: the server's public key file)
    opts = parser.parse_args(argv)
    for name in ("messages", "rtt", "window", "capacity", "repeat"):
        if getattr(opts, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if opts.timeout is None:  # (six set-ups of the default sizes take about 20 s a repetition)
        opts.timeout = 120.0 * opts.repeat
    if opts.warmup < 0 or opts.timeout <= 0:
        parser.error("--warmup must be >= 0 and --timeout above 0")
    return opts


def main(argv=None) -> int:
    opts = parse(sys.argv[1:] if argv is None else list(argv))
    if opts.role:
        ROLES[opts.role](opts)
        return 0
    if opts.profile:
        opts.profile = os.path.abspath(opts.profile)
        os.makedirs(opts.profile, exist_ok=True)
    env = {name: value for name, value in os.environ.items() if not name.startswith("CHANNELBUS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    # (no CHANNELBUS_* setting of this shell reaches the broker: the bus row is its defaults)
    deadline = time.monotonic() + opts.timeout
    runs: dict[str, list[dict]] = {key: [] for key, _, _ in setups(opts)}
    keys = CurveKeys() if opts.curve else None
    try:
        for _ in range(opts.repeat):  # alternate, so a noisy neighbour hits every set-up alike
            for key, _, runner in setups(opts):
                runs[key].append(runner(opts, deadline, env, keys))
    except TimeoutError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if keys is not None:
            keys.remove()
    results = {key: combine(found) for key, found in runs.items()}
    print(report(results, opts))
    if opts.json:
        print(json.dumps({**results, "runs": runs}, indent=2))
    complete = all(r["messages"] == opts.messages and r["in_order"] for found in runs.values() for r in found)
    return 0 if complete else 1


def combine(runs: list[dict]) -> dict:
    """One row from repeated runs: medians of the figures, the worst of the checks."""
    def median(key):
        values = sorted(r[key] for r in runs if r[key] is not None)
        return values[len(values) // 2] if len(values) == len(runs) else None

    return {
        "messages": min(r["messages"] for r in runs), "sent": min(r["sent"] for r in runs),
        "seconds": median("seconds"), "msgs_per_s": median("msgs_per_s"),
        "in_order": all(r["in_order"] for r in runs), "disorder": sum(r["disorder"] for r in runs),
        "retries": sum(r["retries"] for r in runs),
        "rtt_n": min(r["rtt_n"] for r in runs), "p50_us": median("p50_us"), "p99_us": median("p99_us"),
        "others": None if any(r.get("others") is None for r in runs) else max(r["others"] for r in runs),
        **{per: {role: _median([r[per][role] for r in runs]) for role in ("sender", "middle", "receiver")}
           for per in ("cpu_us_per_msg", "cpu_us_per_rt", "main_us_per_msg", "main_us_per_rt")},
    }


def _median(values):
    if any(v is None for v in values):
        return None
    values = sorted(values)
    return values[len(values) // 2]


if __name__ == "__main__":
    sys.exit(main())
