"""One run of one scenario on one layer: ``one_run`` waits for a quiet host, checks the services
and logs the figure; ``run_once`` spawns the scenario's ``Worker`` processes (spawn start method,
entry point ``roles.worker_main``), steps them through ready, probe and go over their pipes,
turns what they report into messages/s or round-trip percentiles plus CPU per unit of each side
and the CPU share other programs used, and stops every worker by PID however the run ends.
"""

from __future__ import annotations

import os
import time

from .report import METRICS, fmt
from .roles import worker_main
from .services import RunFailed, Services, host_busy, host_cpu_seconds, stop_pid, wait_quiet


class Worker:
    """A spawned worker process and the parent's end of its pipe."""

    def __init__(self, ctx, name: str, role: str, kind: str, env: dict, params: dict, profile_dir):
        self.name = name
        self.conn, child = ctx.Pipe()
        profile = os.path.join(profile_dir, f"{name}.prof") if profile_dir else None
        self.proc = ctx.Process(target=worker_main, args=(role, kind, env, params, child, profile),
                                name=name, daemon=True)
        self.proc.start()
        child.close()
        self.backlog: list[tuple[str, dict]] = []

    def send(self, word: str, **data) -> None:
        try:
            self.conn.send((word, data))
        except OSError:
            pass

    def expect(self, word: str, deadline: float) -> dict:
        while True:
            for i, (w, data) in enumerate(self.backlog):
                if w == word:
                    del self.backlog[i]
                    return data
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunFailed(f"{self.name}: no '{word}' before the deadline")
            try:
                if self.conn.poll(min(remaining, 0.2)):
                    w, data = self.conn.recv()
                    if w == "error":
                        raise RunFailed(f"{self.name} failed:\n{data['trace']}")
                    self.backlog.append((w, data))
                elif not self.proc.is_alive():
                    raise RunFailed(f"{self.name} exited with status {self.proc.exitcode} before '{word}'")
            except (EOFError, OSError):
                raise RunFailed(f"{self.name} closed its pipe before '{word}'") from None

    def stop(self, grace: float) -> None:
        self.send("exit")
        stop_pid(self.proc, grace)
        self.conn.close()


def one_run(scenario: str, kind: str, rep: int, opts, sizes: dict, services: "Services", ctx,
            deadline: float, log) -> dict:
    """One run with its bookkeeping: quiet wait, service checks, a log line; never raises
    RunFailed for the run itself (the result has an "error" instead)."""
    if time.monotonic() >= deadline:
        raise RunFailed("the overall --timeout ran out")
    busy = wait_quiet(opts.wait_quiet, deadline, log) if opts.wait_quiet else host_busy()
    run_deadline = min(deadline, time.monotonic() + opts.run_timeout)
    started = time.monotonic()
    try:
        services.check()
        res = run_once(scenario, kind, rep, opts, sizes, services, ctx, run_deadline)
        services.check()
    except RunFailed as exc:
        res = {"error": str(exc)}
        log(f"  {scenario:6} {kind:9} rep {rep + 1}: FAILED: {exc}")
    else:
        label, unit, _ = METRICS[scenario]
        extra = "" if scenario == "rtt" else f", losses {res['losses']}, retries {res['retries']}"
        if res.get("missing"):
            extra += f" (first missing seqs: {res['missing'][:20]})"
        foreign = res.get("foreign")
        log(f"  {scenario:6} {kind:9} rep {rep + 1}: {label} {fmt(res['value'], unit)}"
            f"{extra} ({time.monotonic() - started:.1f} s; host busy before:"
            f" {'?' if busy is None else f'{busy:.0%}'}, others during:"
            f" {'?' if foreign is None else f'{foreign:.0%}'})")
    res["busy_before"] = busy
    return res


def run_once(scenario: str, kind: str, rep: int, opts, sizes: dict, services: Services, ctx,
             deadline: float) -> dict:
    tag = f"{scenario}-{kind}-{rep}-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    base = {"capacity": opts.capacity}
    workers: list[Worker] = []
    server = kind if kind in ("bus", "bus-curve", "floor") else "redis"
    server_cpu, host_cpu, walls = [], [], []

    def mark() -> None:
        server_cpu.append(services.cpu()[server])
        host_cpu.append(host_cpu_seconds())
        walls.append(time.monotonic())

    def with_cpu(result: dict, units: int, send_cpu, recv_cpu) -> dict:
        """CPU microseconds per unit (message, round trip or group_send) of each side."""
        mark()
        served = None if None in server_cpu[-2:] else server_cpu[-1] - server_cpu[-2]
        per = lambda v: None if v is None else v * 1e6 / units  # noqa: E731
        result["cpu_us"] = {"sender": per(send_cpu), "receivers": per(recv_cpu), "server": per(served)}
        # CPU that none of this run's processes used, as a share of the host during the run:
        # other programs (or this parent) competing with the measurement.
        if None not in (served, send_cpu, recv_cpu, *host_cpu[-2:]):
            foreign = (host_cpu[-1] - host_cpu[-2]) - served - send_cpu - recv_cpu
            result["foreign"] = max(0.0, foreign) / max(1e-9, (walls[-1] - walls[-2]) * (os.cpu_count() or 1))
        return result

    def spawn(role: str, name: str, **params) -> Worker:
        w = Worker(ctx, f"{scenario}-{kind}-{name}" + (f"-r{rep}" if opts.profile else ""), role, kind,
                   services.env, {**base, **params}, opts.profile)
        workers.append(w)
        return w

    def stream(send: Worker, recvs: list[Worker], **probe) -> tuple[dict, list[dict]]:
        """The throughput protocol, once the receivers are ready: probe until each receiver saw
        one, then time the sender's stream from "go" to every receiver's "done"."""
        send.expect("ready", deadline)
        send.send("probe", **probe)
        for w in recvs:
            w.expect("probed", deadline)
        mark()
        send.send("go")
        sent = send.expect("sent", deadline)
        for w in recvs:
            w.send("sender_done")
        return sent, [w.expect("done", deadline) for w in recvs]

    try:
        if scenario == "p2p":
            n, channel = sizes["p2p"], f"bench.p2p.{tag}"
            recv = spawn("p2p_recv", "recv", channel=channel, n=n)
            send = spawn("p2p_send", "send", channel=channel, n=n)
            recv.expect("ready", deadline)
            sent, got = stream(send, [recv])
            return with_cpu(_throughput(n, sent, got, n), n, sent["cpu"], got[0]["cpu"])
        if scenario == "rtt":
            n = sizes["rtt"]
            pong = spawn("rtt_pong", "pong", ping=f"bench.ping.{tag}", pong=f"bench.pong.{tag}")
            ping = spawn("rtt_ping", "ping", ping=f"bench.ping.{tag}", pong=f"bench.pong.{tag}", n=n)
            pong.expect("ready", deadline)
            ping.expect("ready", deadline)
            mark()
            pong.send("report")
            pong_cpu0 = pong.expect("cpu", deadline)["cpu"]
            ping.send("go")
            res = ping.expect("done", deadline)
            pong.send("report")
            pong_cpu = pong.expect("cpu", deadline)["cpu"] - pong_cpu0
            result = {"value": res["p50"], "p50": res["p50"], "p99": res["p99"], "mean": res["mean"],
                      "n": res["n"], "losses": 0}
            return with_cpu(result, n, res["cpu"], pong_cpu)  # (sender: ping side, receivers: pong side)
        if scenario == "fanout":
            procs, chans, sends = sizes["fanout_procs"], sizes["fanout_channels"], sizes["fanout_sends"]
            group = f"bench-fan-{tag}"
            recvs = [spawn("fan_recv", f"recv{i}", group=group, channels=chans, sends=sends)
                     for i in range(procs)]
            send = spawn("fan_send", "send", group=group, sends=sends)
            for w in recvs:
                w.expect("ready", deadline)
            sent, got = stream(send, recvs)
            return with_cpu(_throughput(procs * chans * sends, sent, got, sends), sends, sent["cpu"],
                            sum(g["cpu"] for g in got))
        if scenario == "many":
            n, width = sizes["many_messages"], sizes["many_channels"]
            recv = spawn("many_recv", "recv", channels=width, n=n)
            send = spawn("many_send", "send", n=n)
            channels = recv.expect("ready", deadline)["channels"]
            sent, got = stream(send, [recv], channels=channels)
            return with_cpu(_throughput(n, sent, got, n), n, sent["cpu"], got[0]["cpu"])
        raise ValueError(scenario)
    finally:
        for w in workers:
            w.send("exit")
        for w in workers:
            w.stop(grace=max(1.0, min(15.0, deadline - time.monotonic())))


def _throughput(expected: int, sent: dict, got: list[dict], sends: int) -> dict:
    count = sum(g["count"] for g in got)
    lasts = [g["last"] for g in got if g["last"] is not None]
    elapsed = (max(lasts) - sent["t0"]) if lasts else None
    return {
        "value": count / elapsed if elapsed else None,
        "send_rate": sends / max(1e-9, sent["t1"] - sent["t0"]),  # the sender alone, per second
        "send_seconds": sent["t1"] - sent["t0"],
        "elapsed": elapsed, "expected": expected, "count": count, "losses": expected - count,
        "dups": sum(g["dups"] for g in got), "disorder": sum(g["disorder"] for g in got),
        "retries": sent.get("retries", 0),
        "missing": [m for g in got for m in g.get("missing", [])][:50],
    }

