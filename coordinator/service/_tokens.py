"""Lease tokens: opaque to workers, carrying the node run's fencing number (lease_seq)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from coordinator.errors import InvalidArgument
from coordinator.model import LeaseKey, NodeRun

_VERSION = 1


@dataclass(frozen=True)
class LeaseToken:
    execution_id: str
    node_id: str
    lease_seq: int
    workflow_name: str
    workflow_version: int

    @classmethod
    def of(cls, node: NodeRun) -> LeaseToken:
        """The token of the lease ``node`` holds now."""
        return cls(
            node.execution_id,
            node.node_id,
            node.lease_seq,
            node.workflow_name,
            node.workflow_version,
        )

    @property
    def key(self) -> LeaseKey:
        return LeaseKey(self.execution_id, self.node_id, self.lease_seq)

    def encode(self) -> str:
        raw = json.dumps(
            [
                _VERSION,
                self.execution_id,
                self.node_id,
                self.lease_seq,
                self.workflow_name,
                self.workflow_version,
            ],
            separators=(",", ":"),
        )
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> LeaseToken:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            version, execution_id, node_id, seq, name, wf_version = json.loads(raw)
            if version != _VERSION:
                raise ValueError(version)
            return cls(str(execution_id), str(node_id), int(seq), str(name), int(wf_version))
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise InvalidArgument(
                "lease_token is malformed; send back the token exactly as PollTasks returned it"
            ) from exc
