"""The worker: a blocking consumer of ``workers.jobs``; run it with

    channelbus run examples.workers.worker:Worker --instances 4 [--broker URL]

in as many processes (and on as many hosts) as you like: every instance competes for the jobs
and each job goes to one of them. A job is ``{"type": "job.run", "id": 7, "data": b"...",
"rounds": 100, "reply_to": CHANNEL}``; the result goes to ``reply_to`` as ``{"type":
"job.result", "id": 7, "digest": "...", "worker": "HOST:PID"}``.
"""

from __future__ import annotations

import os
import socket

from consumers import Consumer

from . import JOBS
from .jobs import digest

WORKER = f"{socket.gethostname()}:{os.getpid()}"


class Worker(Consumer):
    channels = [JOBS]

    def job_run(self, job: dict) -> None:
        self.send(job["reply_to"], {
            "type": "job.result", "id": job["id"], "digest": digest(job["data"], job["rounds"]),
            "worker": WORKER,
        })
