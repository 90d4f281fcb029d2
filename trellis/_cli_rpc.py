"""What the CLI's service command groups share: running one command against a stub, and
reporting a bad command line like a refused call."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from worker_sdk import RpcError

S = TypeVar("S")

Handler = Callable[[argparse.Namespace], Awaitable[int]]


class Usage(RpcError):
    """A bad command line, reported like a refused call (INVALID_ARGUMENT)."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)


def runner(
    make_stub: Callable[[grpc.aio.Channel], S],
) -> Callable[[Callable[[S, argparse.Namespace], Awaitable[int]]], Handler]:
    """Wraps ``command(stub, args)``: a channel to ``args.address`` for the call, and gRPC
    failures as ``RpcError`` (printed by the CLI as one line)."""

    def wrap(command: Callable[[S, argparse.Namespace], Awaitable[int]]) -> Handler:
        async def run(args: argparse.Namespace) -> int:
            async with grpc.aio.insecure_channel(args.address) as channel:
                try:
                    return await command(make_stub(channel), args)
                except grpc.aio.AioRpcError as exc:
                    raise RpcError(exc.code(), exc.details() or "") from exc

        return run

    return wrap
