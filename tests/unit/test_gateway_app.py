"""Gateway settings for webhooks and events, and the layering it keeps."""

from __future__ import annotations

import pytest

from gateway.config import GatewayConfig, GatewayConfigError


def test_webhook_settings_parse_and_the_token_is_not_shown() -> None:
    config = GatewayConfig.from_env(
        {
            "TRELLIS_GATEWAY_MAX_BODY_BYTES": "2048",
            "TRELLIS_GATEWAY_EVENTS_TOKEN": "tok-tok-tok",
            "TRELLIS_GATEWAY_RPC_TIMEOUT": "500ms",
        }
    )
    assert config.max_body_bytes == 2048
    assert config.rpc_timeout == 0.5
    assert config.events_token == "tok-tok-tok"
    assert "tok-tok-tok" not in repr(config)
    assert GatewayConfig.from_env({}).max_body_bytes == 1024 * 1024


@pytest.mark.parametrize("raw", ["0", "-1", "1MB", "x"])
def test_bad_body_limit_is_refused(raw: str) -> None:
    with pytest.raises(GatewayConfigError, match="TRELLIS_GATEWAY_MAX_BODY_BYTES"):
        GatewayConfig.from_env({"TRELLIS_GATEWAY_MAX_BODY_BYTES": raw})
