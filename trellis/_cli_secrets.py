"""``trellis secrets set|list|delete|rotate-key|new-key``: the tenant's secret store from
the shell (docs/security.md, "Secrets"). Values go in, never come back. Hooked into
``trellis.cli`` by ``add_parser``."""

from __future__ import annotations

import argparse
import base64
import os
import sys
from typing import TYPE_CHECKING, Any

from trellis._cli_rpc import Usage, doc, output_flag, print_json, runner, table
from trellis.v1 import secret_service_pb2 as spb
from trellis.v1 import secret_service_pb2_grpc as sgrpc

TIMEOUT = 30.0
# Rotation re-encrypts every tenant's values: give it time.
ROTATE_TIMEOUT = 600.0
MAX_VALUE_BYTES = 64 * 1024

if TYPE_CHECKING:
    Stub = sgrpc.SecretServiceAsyncStub

_run = runner(sgrpc.SecretServiceStub)


def _value(a: argparse.Namespace) -> str:
    """The value from --value, --from-file, or standard input (one trailing newline of a
    typed or piped value is dropped; a file is taken as it is)."""
    if a.value is not None and a.from_file is not None:
        raise Usage("give --value or --from-file, not both")
    if a.value is not None:
        return str(a.value)
    if a.from_file is not None:
        try:
            with open(a.from_file, "rb") as f:
                raw = f.read(MAX_VALUE_BYTES + 1)
        except OSError as exc:
            raise Usage(f"--from-file {a.from_file!r}: {exc.strerror}") from None
    else:
        if sys.stdin.isatty():
            print(f"value of secret {a.name} (end with Ctrl-D):", file=sys.stderr)
        raw = sys.stdin.buffer.read(MAX_VALUE_BYTES + 2)
        raw = raw.removesuffix(b"\n")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Usage("the secret value must be UTF-8 text (base64-encode binary data)") from None


async def _set(stub: Stub, a: argparse.Namespace) -> int:
    reply = await stub.SetSecret(
        spb.SetSecretRequest(name=a.name, value=_value(a)), timeout=TIMEOUT
    )
    if a.output == "json":
        print_json(doc(reply))
    else:
        print(f"secret {reply.secret.name} {'created' if reply.created else 'replaced'}")
    return 0


async def _list(stub: Stub, a: argparse.Namespace) -> int:
    reply = await stub.ListSecrets(spb.ListSecretsRequest(), timeout=TIMEOUT)
    if a.output == "json":
        print_json([doc(s) for s in reply.secrets])
        return 0
    table(
        ("NAME", "SIZE", "CREATED", "UPDATED"),
        [
            (
                s.name,
                str(s.size),
                s.create_time.ToJsonString(),
                s.update_time.ToJsonString(),
            )
            for s in reply.secrets
        ],
    )
    return 0


async def _delete(stub: Stub, a: argparse.Namespace) -> int:
    await stub.DeleteSecret(spb.DeleteSecretRequest(name=a.name), timeout=TIMEOUT)
    print(f"secret {a.name} deleted")
    return 0


async def _rotate(stub: Stub, a: argparse.Namespace) -> int:
    reply = await stub.RotateKey(spb.RotateKeyRequest(), timeout=ROTATE_TIMEOUT)
    if a.output == "json":
        print_json(doc(reply))
        return 0
    counts = ", ".join(f"{k} {v}" for k, v in sorted(reply.reencrypted.items()))
    print(f"re-encrypted under key {reply.key_id}: {counts}")
    return 0


async def _new_key(a: argparse.Namespace) -> int:
    print(f"{a.kid}:{base64.b64encode(os.urandom(32)).decode()}")
    return 0


def _command(sub: Any, name: str, help: str, func: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    output_flag(p)
    p.set_defaults(func=_run(func))
    return p


def add_parser(sub: Any) -> None:
    """Add the secret-store commands to the CLI's subcommands."""
    secrets = sub.add_parser(
        "secrets", help="the tenant's secret store (values are write-only; ${secret:NAME})"
    )
    s = secrets.add_subparsers(dest="secrets_command", required=True, metavar="ACTION")
    put = _command(s, "set", "create or replace a secret", _set)
    put.add_argument("name")
    put.add_argument("--value", help="the value (visible in your shell history; prefer stdin)")
    put.add_argument("--from-file", metavar="FILE", help="read the value from FILE")
    _command(s, "list", "the names of the tenant's secrets (never values)", _list)
    delete = _command(s, "delete", "delete a secret", _delete)
    delete.add_argument("name")
    _command(
        s,
        "rotate-key",
        "re-encrypt every stored secret under the current key (system tenant admins)",
        _rotate,
    )
    new = s.add_parser("new-key", help="print a fresh kid:base64key for TRELLIS_ENCRYPTION_KEYS")
    new.add_argument("--kid", default="k1", help="the key id (default k1)")
    new.set_defaults(func=_new_key)
