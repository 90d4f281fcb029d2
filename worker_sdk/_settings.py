"""Where the SDK finds the coordinator: one settings object for the Worker, the Client and
the ``trellis`` CLI, read from the environment.

``TRELLIS_ADDRESS`` (HOST:PORT, default ``127.0.0.1:7400``) is the only setting today;
TLS and credentials join ``ConnectionSettings`` as fields read in ``from_env``, so that
every part of the SDK picks them up together.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

DEFAULT_ADDRESS = "127.0.0.1:7400"
"""Where the SDK looks for the coordinator unless told otherwise."""

ADDRESS_VARIABLE = "TRELLIS_ADDRESS"


@dataclass(frozen=True)
class ConnectionSettings:
    """How to reach the coordinator: ``address`` is its gRPC HOST:PORT."""

    address: str = DEFAULT_ADDRESS

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ConnectionSettings:
        """The settings named by ``TRELLIS_*`` variables (unset or empty: the default)."""
        address = environ.get(ADDRESS_VARIABLE, "").strip()
        return cls(address=address or DEFAULT_ADDRESS)


def connection_settings(address: str | None = None) -> ConnectionSettings:
    """The settings of a Worker or Client: the process environment's, where an explicit
    ``address`` wins over ``TRELLIS_ADDRESS``."""
    settings = ConnectionSettings.from_env(os.environ)
    return settings if address is None else replace(settings, address=address)
