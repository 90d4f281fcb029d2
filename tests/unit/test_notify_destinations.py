"""Where notifications may go (no SSRF): which addresses are forbidden, what the allow
settings open, the refusal of forbidden IP literals when a channel is created, and the
network backend's resolve-check-connect (with a scripted resolver and connector: no
network here; tests/integration/test_notify_destinations.py uses real sockets)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import httpcore
import pytest

from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.errors import InvalidArgument
from coordinator.model import ChannelKind
from coordinator.notify import (
    DestinationRefused,
    Destinations,
    forbidden_reason,
    guarded_client,
    validate_channel,
)
from coordinator.notify._network import GuardedBackend

FORBIDDEN = {
    "127.0.0.1": "loopback",
    "127.255.0.9": "loopback",
    "::1": "loopback",
    "0.0.0.0": "unspecified",
    "::": "unspecified",
    "10.1.2.3": "RFC 1918",
    "172.16.0.1": "RFC 1918",
    "172.31.255.254": "RFC 1918",
    "192.168.1.1": "RFC 1918",
    "fd12:3456::1": "RFC 4193",
    "fc00::1": "RFC 4193",
    "169.254.1.1": "link-local",
    "fe80::1": "link-local",
    "169.254.169.254": "metadata",
    "fd00:ec2::254": "metadata",
    "100.64.0.1": "carrier-grade NAT",
    "100.127.255.254": "carrier-grade NAT",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "ff02::1": "multicast",
    "198.18.0.1": "benchmarking",
    "192.0.2.10": "documentation",
    "2001:db8::1": "documentation",
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",
    "::ffff:127.0.0.1": "loopback address (as an IPv6 address)",
    "::ffff:169.254.169.254": "metadata address (as an IPv6 address)",
    "::ffff:10.0.0.1": "RFC 1918) (as an IPv6 address",
    "::127.0.0.1": "loopback address (as an IPv6 address)",
    "2002:7f00:1::1": "loopback address (as an IPv6 address)",  # 6to4 of 127.0.0.1
    "64:ff9b::a00:1": "RFC 1918) (as an IPv6 address",  # NAT64 of 10.0.0.1
}
PUBLIC = ["8.8.8.8", "93.184.216.34", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize(("address", "reason"), sorted(FORBIDDEN.items()))
def test_non_public_addresses_are_forbidden_with_their_reason(address: str, reason: str) -> None:
    found = forbidden_reason(ipaddress.ip_address(address))
    assert found is not None and reason in found, (address, found)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_not(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


def test_the_allow_settings_open_hosts_and_networks_but_metadata_only_exactly() -> None:
    allowed = Destinations.parse("hooks.internal, *.corp.example", "10.1.0.0/16,::1/128")
    ip = ipaddress.ip_address
    assert allowed.refusal("hooks.internal", ip("10.9.9.9")) is None  # named host
    assert allowed.refusal("HOOKS.internal.", ip("127.0.0.1")) is None  # case, trailing dot
    assert allowed.refusal("a.b.corp.example", ip("192.168.0.1")) is None  # under the domain
    assert allowed.refusal("corp.example.evil", ip("192.168.0.1")) is not None
    assert allowed.refusal("other", ip("10.1.200.3")) is None  # inside an allowed network
    assert allowed.refusal("other", ip("::ffff:10.1.200.3")) is None  # mapped form too
    assert allowed.refusal("other", ip("10.2.0.1")) is not None
    assert allowed.refusal("other", ip("::1")) is None
    # Metadata stays closed to host names and to wide networks ...
    wide = Destinations.parse("meta.internal", "0.0.0.0/0,169.254.0.0/16")
    assert wide.refusal("meta.internal", ip("169.254.169.254")) == "a cloud metadata address"
    assert wide.refusal("x", ip("169.254.169.254")) is not None
    assert wide.refusal("x", ip("169.254.1.1")) is None
    # ... and opens to an entry naming exactly it.
    exact = Destinations.parse("", "169.254.169.254/32")
    assert exact.refusal("x", ip("169.254.169.254")) is None
    with pytest.raises(InvalidArgument, match="TRELLIS_NOTIFY_ALLOW_NETWORKS"):
        Destinations.parse("", "10.0.0.0/33")


def test_the_allow_settings_are_checked_at_start() -> None:
    config = CoordinatorConfig.from_env(
        {
            "TRELLIS_NOTIFY_ALLOW_HOSTS": "hooks.internal,*.corp.example",
            "TRELLIS_NOTIFY_ALLOW_NETWORKS": "10.1.0.0/16, fd12::/64",
        }
    )
    assert config.notify_allow_networks == "10.1.0.0/16, fd12::/64"
    with pytest.raises(ConfigError, match=r"TRELLIS_NOTIFY_ALLOW_NETWORKS: 'ten' is not"):
        CoordinatorConfig.from_env({"TRELLIS_NOTIFY_ALLOW_NETWORKS": "ten"})
    with pytest.raises(ConfigError, match=r"TRELLIS_NOTIFY_ALLOW_HOSTS: 'a b' is not"):
        CoordinatorConfig.from_env({"TRELLIS_NOTIFY_ALLOW_HOSTS": "a b"})


LITERALS = [
    "127.0.0.1",
    "[::1]",
    "169.254.169.254",
    "10.0.0.5",
    "[fd00:ec2::254]",
    "[::ffff:127.0.0.1]",
    "0.0.0.0",
    "127.1",
    "2130706433",
    "0x7f.0.0.1",
]


@pytest.mark.parametrize("host", LITERALS)
def test_channels_pointing_at_forbidden_ip_literals_are_refused_at_creation(host: str) -> None:
    cases = [
        (ChannelKind.WEBHOOK, {"url": f"http://{host}:8080/hook", "secret": "s"}, "webhook.url"),
        (
            ChannelKind.SMS,
            {"url": f"https://{host}/send/{{to}}", "body_template": "x", "to": ["+1"]},
            "sms.url",
        ),
        (
            ChannelKind.SMTP,
            {"host": host.strip("[]"), "port": 25, "from_address": "a@b.c", "to": ["d@e.f"]},
            "smtp.host",
        ),
    ]
    for kind, config, field in cases:
        with pytest.raises(InvalidArgument) as info:
            validate_channel(kind, config)
        message = str(info.value)
        assert message.startswith(f"{field}: "), message
        assert "TRELLIS_NOTIFY_ALLOW_NETWORKS" in message, message


def test_allowed_literals_and_host_names_pass_creation() -> None:
    allowed = Destinations.parse("", "127.0.0.0/8")
    hook = {"url": "http://127.0.0.1:8080/hook", "secret": "s"}
    assert validate_channel(ChannelKind.WEBHOOK, hook, allowed)["url"] == hook["url"]
    # Names are checked when they are resolved, at every send, not here.
    for url in ("http://localhost:8080/x", "https://hooks.example.com/x"):
        validate_channel(ChannelKind.WEBHOOK, {"url": url, "secret": "s"})
    with pytest.raises(InvalidArgument, match=r"webhook\.url: 'file:///etc/passwd' is not an abs"):
        validate_channel(ChannelKind.WEBHOOK, {"url": "file:///etc/passwd", "secret": "s"})
    with pytest.raises(InvalidArgument, match=r"webhook\.url: 'gopher://"):
        validate_channel(ChannelKind.WEBHOOK, {"url": "gopher://10.0.0.1:70/x", "secret": "s"})


class Inner(httpcore.AsyncNetworkBackend):
    """Records where it was asked to connect; fails for addresses in ``down``."""

    def __init__(self, down: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.connected: list[tuple[str, int]] = []
        self.down = down

    async def connect_tcp(self, host: str, port: int, **_: Any) -> httpcore.AsyncNetworkStream:
        self.connected.append((host, port))
        if host in self.down:
            raise httpcore.ConnectError("refused")
        return httpcore.AsyncMockStream([])

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _resolver(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[list[str]]]) -> list[str]:
    """Script ``getaddrinfo``: each call for a name takes the next list of addresses (a
    rebinding DNS server answers differently each time)."""
    asked: list[str] = []
    loop = asyncio.get_running_loop()

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        asked.append(host)
        addresses = answers[host].pop(0)
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (a, port),
            )
            for a in addresses
        ]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return asked


async def test_the_backend_connects_to_the_address_it_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The second answer would be 127.0.0.1 (rebinding): it is never asked for, because the
    # connection goes to the address of the one resolution that was checked.
    asked = _resolver(monkeypatch, {"hook.example": [["93.184.216.34"], ["127.0.0.1"]]})
    inner = Inner()
    backend = GuardedBackend(Destinations(), inner)
    await backend.connect_tcp("hook.example", 443, timeout=5)
    assert asked == ["hook.example"]
    assert inner.connected == [("93.184.216.34", 443)]


async def test_the_backend_refuses_a_name_with_any_forbidden_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _resolver(
        monkeypatch,
        {
            "mixed.example": [["93.184.216.34", "10.0.0.7"]],
            "meta.example": [["169.254.169.254"]],
            "v6.example": [["::1"]],
        },
    )
    inner = Inner()
    backend = GuardedBackend(Destinations(), inner)
    for host, reason in [
        ("mixed.example", "mixed.example resolves to a private address (RFC 1918)"),
        ("meta.example", "meta.example resolves to a cloud metadata address"),
        ("v6.example", "v6.example resolves to a loopback address"),
    ]:
        with pytest.raises(DestinationRefused) as info:
            await backend.connect_tcp(host, 443)
        assert str(info.value) == f"destination refused: {reason}"
    assert inner.connected == []  # nothing was contacted


async def test_the_backend_tries_each_checked_address_in_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _resolver(monkeypatch, {"two.example": [["2606:4700::1111", "93.184.216.34"]]})
    inner = Inner(down={"2606:4700::1111"})
    await GuardedBackend(Destinations(), inner).connect_tcp("two.example", 80)
    assert inner.connected == [("2606:4700::1111", 80), ("93.184.216.34", 80)]


async def test_the_http_client_is_built_on_the_guarded_backend() -> None:
    # The client the Deliverer uses: a change in httpx's transport that dropped the backend
    # would silently reopen every address.
    client = guarded_client(Destinations(), 5.0)
    try:
        pool = client._transport._pool  # type: ignore[attr-defined]
        assert isinstance(pool._network_backend, GuardedBackend)
        assert client.follow_redirects is False and client.trust_env is False
    finally:
        await client.aclose()
