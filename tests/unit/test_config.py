"""TRELLIS_* settings are parsed once; bad values fail fast with the variable named."""

from __future__ import annotations

from datetime import timedelta

import pytest

from coordinator.config import ConfigError, CoordinatorConfig


def test_defaults_without_environment() -> None:
    config = CoordinatorConfig.from_env({})
    assert config == CoordinatorConfig()
    assert config.listen == "127.0.0.1:7400"
    assert config.database_url.startswith("sqlite:///")


def test_values_are_parsed_by_type() -> None:
    config = CoordinatorConfig.from_env(
        {
            "TRELLIS_LISTEN": "0.0.0.0:9000",
            "TRELLIS_DATABASE_URL": "postgresql://db/trellis",
            "TRELLIS_AUTO_MIGRATE": "false",
            "TRELLIS_MAX_PAYLOAD_BYTES": "2048",
            "TRELLIS_POLL_MAX_WAIT": "250ms",
            "TRELLIS_HEARTBEAT_INTERVAL": "2",
            "TRELLIS_SHUTDOWN_GRACE": "1m",
            "TRELLIS_LOG_FORMAT": "json",
            "HOME": "/ignored",
        }
    )
    assert config.listen == "0.0.0.0:9000"
    assert config.auto_migrate is False
    assert config.max_payload_bytes == 2048
    assert config.poll_max_wait == timedelta(milliseconds=250)
    assert config.heartbeat_interval == timedelta(seconds=2)
    assert config.shutdown_grace == timedelta(minutes=1)
    assert config.log_format == "json"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        (
            {"TRELLIS_MAX_PAYLOAD_BYTES": "lots"},
            "TRELLIS_MAX_PAYLOAD_BYTES='lots' is not an integer",
        ),
        ({"TRELLIS_MAX_PAYLOAD_BYTES": "0"}, "must be at least 1"),
        ({"TRELLIS_POLL_MAX_WAIT": "soon"}, "TRELLIS_POLL_MAX_WAIT='soon' is not a duration"),
        ({"TRELLIS_AUTO_MIGRATE": "maybe"}, "TRELLIS_AUTO_MIGRATE='maybe' is not a boolean"),
        ({"TRELLIS_LOG_FORMAT": "xml"}, "TRELLIS_LOG_FORMAT"),
        ({"TRELLIS_LISTEN": "7400"}, "HOST:PORT"),
        ({"TRELLIS_DATABSE_URL": "x"}, "unknown setting TRELLIS_DATABSE_URL"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        CoordinatorConfig.from_env(env)
    assert fragment in str(info.value)


def test_gateway_settings_are_left_to_the_gateway() -> None:
    from gateway.config import GatewayConfig, GatewayConfigError

    shared = {"TRELLIS_GATEWAY_LISTEN": "0.0.0.0:8080", "TRELLIS_LISTEN": "0.0.0.0:7400"}
    assert CoordinatorConfig.from_env(shared).listen == "0.0.0.0:7400"
    gateway = GatewayConfig.from_env({**shared, "TRELLIS_GATEWAY_READY_TIMEOUT": "250ms"})
    assert gateway.host_port == ("0.0.0.0", 8080)
    assert gateway.ready_timeout == 0.25
    with pytest.raises(GatewayConfigError, match="unknown setting TRELLIS_GATEWAY_PORT"):
        GatewayConfig.from_env({"TRELLIS_GATEWAY_PORT": "1"})
    with pytest.raises(GatewayConfigError, match="HOST:PORT"):
        GatewayConfig.from_env({"TRELLIS_GATEWAY_COORDINATOR_ADDRESS": "coordinator"})
