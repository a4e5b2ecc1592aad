"""Consumers that tests/test_runner.py runs with ``channelbus run runner_probe:...`` (tests/ is on
the subprocess's PYTHONPATH). Each replies to ``reply_to`` so the test sees what happened."""

from __future__ import annotations

import asyncio
import time

from consumers import AsyncConsumer, Consumer

GROUP = "probes"
WORK = "probe.work"


class Probe(AsyncConsumer):
    groups = [GROUP]
    channels = [WORK]

    async def probe_echo(self, message):
        await self.send(message["reply_to"], {"type": "probe.reply", "channel": self.channel_name,
                                              "tag": message.get("tag")})

    async def probe_fail(self, message):
        raise RuntimeError(f"probe failure {message.get('tag')}")

    async def probe_slow(self, message):
        await self.send(message["reply_to"], {"type": "probe.started", "channel": self.channel_name})
        await asyncio.sleep(message["seconds"])  # the work in hand when the runner is stopped
        await self.send(message["reply_to"], {"type": "probe.finished", "channel": self.channel_name})


class BlockingProbe(Consumer):
    groups = [GROUP]
    channels = [WORK]

    def probe_echo(self, message):
        self.send(message["reply_to"], {"type": "probe.reply", "channel": self.channel_name,
                                        "tag": message.get("tag")})

    def probe_fail(self, message):
        raise RuntimeError(f"probe failure {message.get('tag')}")

    def probe_slow(self, message):
        self.send(message["reply_to"], {"type": "probe.started", "channel": self.channel_name})
        time.sleep(message["seconds"])  # the work in hand when the runner is stopped
        self.send(message["reply_to"], {"type": "probe.finished", "channel": self.channel_name})
