"""The Trellis HTTP gateway: health and readiness for Kubernetes, webhooks and events.

It talks to the coordinator over gRPC only, never to its database.
"""

from gateway.app import create_app
from gateway.config import GatewayConfig

__all__ = ["GatewayConfig", "create_app"]
