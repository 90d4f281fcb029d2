"""SecretService: secrets as listed (never a value) and key rotation reports."""

from __future__ import annotations

from collections.abc import Mapping

from coordinator.grpc.convert._common import timestamp_to_proto as _ts
from coordinator.service import SecretInfo
from trellis.v1 import secret_service_pb2 as spb


def secret_to_proto(info: SecretInfo) -> spb.Secret:
    return spb.Secret(
        name=info.name,
        create_time=_ts(info.created_at),
        update_time=_ts(info.updated_at),
        size=info.size,
    )


def rotation_to_proto(kid: str, counts: Mapping[str, int]) -> spb.RotateKeyResponse:
    return spb.RotateKeyResponse(key_id=kid, reencrypted=dict(counts))
