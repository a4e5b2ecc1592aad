"""The Prometheus endpoint (``--metrics``), scraped over HTTP from a real broker process."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from clients import Client, Forbidden
from test_security import channelbus, keys  # noqa: F401  (keys: the fixture)

pytestmark = pytest.mark.timeout(60)
pytest.importorskip("prometheus_client", reason="the metrics extra (prometheus_client) is not installed")

ENDPOINT_RE = re.compile(r"serving Prometheus metrics on (http://\S+/metrics)")


def metrics_url(broker) -> str:
    deadline = time.monotonic() + 10
    while not (match := ENDPOINT_RE.search(broker.stderr_path.read_text())):
        assert time.monotonic() < deadline, "the broker did not log its metrics endpoint"
        time.sleep(0.05)
    return match.group(1)


def scrape(url: str) -> dict[str, float]:
    """``name{labels}`` -> value, for every sample of the exposition."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_the_metrics_endpoint_shows_counters_gauges_refusals_and_the_batch_histogram(
    keys, broker_process_factory, tmp_path,  # noqa: F811
):
    permissions = tmp_path / "permissions.toml"
    permissions.write_text('[web]\nsend = ["work"]\nreceive = ["work"]\n')
    broker = broker_process_factory(*keys.broker_args("--permissions", str(permissions),
                                                      "--metrics", "127.0.0.1:0"))
    url = metrics_url(broker)
    with Client(broker.url, **keys.client("web"), capacity=2) as bus:
        for n in range(2):
            bus.send("work", {"type": "job", "n": n})
        bus.receive("work", timeout=5)
        bus.send("work", {"type": "job", "n": 2})
        for _ in range(2):
            with pytest.raises(Forbidden):
                bus.send("elsewhere", {"type": "no"})
        samples = scrape(url)
        assert samples["channelbus_received_total"] == 3
        assert samples["channelbus_accepted_total"] == 3
        assert samples["channelbus_clients"] == 1 and samples["channelbus_channels"] >= 1
        assert samples["channelbus_queued"] + samples["channelbus_inflight"] == 2
        assert samples["channelbus_bytes_held"] > 0 and samples["channelbus_max_memory"] == 512 * 1024 * 1024
        assert samples['channelbus_refusals_total{reason="forbidden"}'] == 2
        assert samples['channelbus_forbidden_by_key_total{key="web"}'] == 2
        assert samples["channelbus_batch_seconds_count"] >= 5
        assert samples['channelbus_batch_seconds_bucket{le="+Inf"}'] == samples["channelbus_batch_seconds_count"]
        assert samples["channelbus_uptime_seconds"] > 0


def test_metrics_on_a_taken_port_stop_the_broker_with_a_clear_error():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = channelbus("broker", "--bind", "tcp://127.0.0.1:*", "--pub-bind", "tcp://127.0.0.1:*",
                          "--metrics", f"127.0.0.1:{port}")
    assert done.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in done.stderr
