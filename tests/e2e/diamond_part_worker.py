"""The Python diamond worker (examples/diamond_worker.py) serving only some of its task types,
for workflows shared with a worker in another language.

- ``DIAMOND_TASKS``: comma-separated task types to serve (default: all of them).
- ``WORKER_ID``: the worker id to register with (default: assigned by the coordinator).
- ``WORKER_CONCURRENCY`` (default 16), ``TRELLIS_ADDRESS`` (default 127.0.0.1:7400).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import diamond_worker

from worker_sdk import DEFAULT_ADDRESS, Worker

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    names = {n.strip() for n in os.environ.get("DIAMOND_TASKS", "").split(",") if n.strip()}
    unknown = names - {t.name for t in diamond_worker.TASKS}
    if unknown:
        raise SystemExit(f"DIAMOND_TASKS names unknown task types: {sorted(unknown)}")
    Worker(
        tasks=[t for t in diamond_worker.TASKS if not names or t.name in names],
        address=os.environ.get("TRELLIS_ADDRESS", DEFAULT_ADDRESS),
        worker_id=os.environ.get("WORKER_ID") or None,
        concurrency=int(os.environ.get("WORKER_CONCURRENCY", "16")),
    ).run()
