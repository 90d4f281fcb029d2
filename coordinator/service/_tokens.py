"""Lease tokens: opaque to workers, signed by the coordinator, bound to their holder.

A token names the node run and its fencing number (``lease_seq``), and the worker id and
credential that leased it; ``LeaseSigner`` signs it with HMAC-SHA256 under the current key
of the coordinator's ``KeyRing`` (every key of the ring verifies, so keys rotate without
failing leases in flight). A heartbeat, completion or failure must come from the same
worker id and credential: a forged or borrowed token changes nothing (PERMISSION_DENIED).

Form: ``<base64url JSON>.<key id>.<hex MAC>``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from dataclasses import dataclass

from coordinator.errors import InvalidArgument, PermissionDenied
from coordinator.model import LeaseKey, NodeRun
from coordinator.service._identity import KeyRing

_VERSION = 2
_PURPOSE = "lease-token"


@dataclass(frozen=True)
class Holder:
    """Who reports on a lease: the request's worker id and the caller's credential."""

    worker_id: str = ""
    credential: str = ""


@dataclass(frozen=True)
class LeaseToken:
    execution_id: str
    node_id: str
    lease_seq: int
    workflow_name: str
    workflow_version: int
    worker_id: str = ""
    credential: str = ""

    @classmethod
    def of(cls, node: NodeRun, credential: str = "") -> LeaseToken:
        """The token of the lease ``node`` holds now."""
        return cls(
            node.execution_id,
            node.node_id,
            node.lease_seq,
            node.workflow_name,
            node.workflow_version,
            node.worker_id or "",
            credential,
        )

    @property
    def key(self) -> LeaseKey:
        return LeaseKey(self.execution_id, self.node_id, self.lease_seq)


_MALFORMED = "lease_token is malformed; send back the token exactly as PollTasks returned it"


class LeaseSigner:
    def __init__(self, keyring: KeyRing) -> None:
        self._keyring = keyring

    def encode(self, token: LeaseToken) -> str:
        raw = json.dumps(
            [
                _VERSION,
                token.execution_id,
                token.node_id,
                token.lease_seq,
                token.workflow_name,
                token.workflow_version,
                token.worker_id,
                token.credential,
            ],
            separators=(",", ":"),
        ).encode()
        body = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        kid = self._keyring.current
        mac = self._keyring.mac(_PURPOSE, body.encode(), kid)
        return f"{body}.{kid}.{mac}"

    def decode(self, text: str, holder: Holder) -> LeaseToken:
        """The token ``holder`` reports on. InvalidArgument when it is not a token at all;
        PermissionDenied when this coordinator did not sign it or it was leased by another
        worker id or credential."""
        body, sep, rest = text.partition(".")
        kid, sep2, mac = rest.partition(".")
        if not sep or not sep2:
            raise InvalidArgument(_MALFORMED)
        expected = self._keyring.mac(_PURPOSE, body.encode(), kid)
        if expected is None or not hmac.compare_digest(expected, mac):
            raise PermissionDenied(
                "lease_token was not signed by this coordinator (forged, altered, or signed "
                "with a retired key); report only the tokens PollTasks handed you"
            )
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            version, execution_id, node_id, seq, name, wf_version, worker, credential = json.loads(
                raw
            )
            if version != _VERSION:
                raise ValueError(version)
            token = LeaseToken(
                str(execution_id),
                str(node_id),
                int(seq),
                str(name),
                int(wf_version),
                str(worker),
                str(credential),
            )
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise InvalidArgument(_MALFORMED) from exc
        if token.credential != holder.credential or (
            holder.worker_id and token.worker_id and token.worker_id != holder.worker_id
        ):
            raise PermissionDenied(
                "lease_token was leased by another worker; only the worker (worker_id and "
                "credential) that leased a task may heartbeat, complete or fail it"
            )
        return token
