"""What the CLI's service command groups share: running one command against a stub, and
reporting a bad command line like a refused call."""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format

from worker_sdk import RpcError
from worker_sdk._channel import open_channel
from worker_sdk._settings import connection_settings

S = TypeVar("S")

Handler = Callable[[argparse.Namespace], Awaitable[int]]


class Usage(RpcError):
    """A bad command line, reported like a refused call (INVALID_ARGUMENT)."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)


def channel_to(address: str) -> grpc.aio.Channel:
    """A channel to the coordinator at ``address`` with the SDK's TLS and credential
    settings (``TRELLIS_API_KEY``, ``TRELLIS_CA_FILE`` ...)."""
    try:
        settings = connection_settings(address)
    except ValueError as exc:
        raise Usage(str(exc)) from None
    return open_channel(settings)


def runner(
    make_stub: Callable[[grpc.aio.Channel], S],
) -> Callable[[Callable[[S, argparse.Namespace], Awaitable[int]]], Handler]:
    """Wraps ``command(stub, args)``: a channel to ``args.address`` for the call, and gRPC
    failures as ``RpcError`` (printed by the CLI as one line)."""

    def wrap(command: Callable[[S, argparse.Namespace], Awaitable[int]]) -> Handler:
        async def run(args: argparse.Namespace) -> int:
            async with channel_to(args.address) as channel:
                try:
                    return await command(make_stub(channel), args)
                except grpc.aio.AioRpcError as exc:
                    raise RpcError(exc.code(), exc.details() or "") from exc

        return run

    return wrap


def doc(message: Any) -> dict[str, Any]:
    """A reply as JSON-ready data (proto field names, every field)."""
    out: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return out


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def output_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", choices=["text", "json"], default="text")
