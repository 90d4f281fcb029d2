"""A worker whose handlers use a secret from their node config (``config["key"]``).

``stripe.echo`` records the key it received to $RECORD_FILE and returns it in its output;
``stripe.fail`` fails, non-retryably, with the key in its error message (and so in the
traceback the SDK attaches as details). The coordinator must hand the key over and record
none of it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from worker_sdk import NonRetryableError, TaskContext, Worker, task


class CardDeclined(NonRetryableError):
    pass


def _record(key: str) -> None:
    fd = os.open(os.environ["RECORD_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{key}\n".encode())
    finally:
        os.close(fd)


@task("stripe.echo")
def echo(ctx: TaskContext, data: Any) -> Any:
    key = ctx.config["key"]
    _record(key)
    return {"charged": True, "echo": key}


@task("stripe.fail")
def fail(ctx: TaskContext, data: Any) -> Any:
    key = ctx.config["key"]
    _record(key)
    raise CardDeclined(f"card declined for api key {key}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    Worker(tasks=[echo, fail], address=os.environ["TRELLIS_ADDRESS"]).run()
