"""Where notifications may go: never to the coordinator's own network neighbourhood.

A channel's URL or SMTP host is chosen by whoever may create channels, and the coordinator
sends from inside the cluster. Without a check, a webhook could read an internal service
(``http://10.0.0.7/admin``), the cloud metadata service (``http://169.254.169.254/``) or the
coordinator's own ports. So every outbound notification connection goes only to a
**public** address, unless the operator allows a host or network
(``TRELLIS_NOTIFY_ALLOW_HOSTS``, ``TRELLIS_NOTIFY_ALLOW_NETWORKS``).

It is checked twice:

- when a channel is created: a URL or SMTP host that *is* a forbidden address (an IP
  literal) is refused with ``InvalidArgument`` (``check_literal``);
- on every connection: the host name is resolved, **every** address it resolves to is
  checked, and the connection is made to a checked address, so DNS cannot answer one thing
  to the check and another to the connect (``Destinations.resolve``, used by
  ``GuardedBackend`` for HTTP and by the SMTP sender). TLS still verifies the host name.

A refusal at send time raises ``DestinationRefused``: the delivery fails for good (a
refused destination does not become allowed by waiting).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import typing
from collections.abc import Iterable
from dataclasses import dataclass

import httpcore

from coordinator.errors import InvalidArgument, Unavailable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOW_HOSTS_SETTING = "TRELLIS_NOTIFY_ALLOW_HOSTS"
ALLOW_NETWORKS_SETTING = "TRELLIS_NOTIFY_ALLOW_NETWORKS"

# Cloud metadata services: refused even inside an allowed network, unless the network
# entry is exactly this address (a /32 or /128).
METADATA = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)

_NETS: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "an unspecified address"),
    ("10.0.0.0/8", "a private address (RFC 1918)"),
    ("100.64.0.0/10", "a carrier-grade NAT address (RFC 6598)"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private address (RFC 1918)"),
    ("192.0.0.0/24", "a reserved address (IETF protocol assignments)"),
    ("192.0.2.0/24", "a reserved address (documentation)"),
    ("192.88.99.0/24", "a reserved address (6to4 relay)"),
    ("192.168.0.0/16", "a private address (RFC 1918)"),
    ("198.18.0.0/15", "a reserved address (benchmarking)"),
    ("198.51.100.0/24", "a reserved address (documentation)"),
    ("203.0.113.0/24", "a reserved address (documentation)"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    ("64:ff9b:1::/48", "a reserved address (local NAT64)"),
    ("100::/64", "a reserved address (discard)"),
    ("2001::/23", "a reserved address (IETF protocol assignments)"),
    ("2001:db8::/32", "a reserved address (documentation)"),
    ("fc00::/7", "a private address (RFC 4193 unique local)"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"),
    ("ff00::/8", "a multicast address"),
)
FORBIDDEN: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), reason) for net, reason in _NETS
)
_V4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class DestinationRefused(Unavailable):
    """A notification would have gone to a forbidden address; nothing was sent."""


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, IPv4-compatible, 6to4,
    NAT64), if any: ``::ffff:127.0.0.1`` reaches 127.0.0.1."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _V4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why notifications may not go to ``ip`` by default (``None``: a public address)."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        reason = forbidden_reason(inner)
        return None if reason is None else f"{reason} (as an IPv6 address)"
    if ip in METADATA:
        return "a cloud metadata address"
    for network, reason in FORBIDDEN:
        if ip in network:
            return reason
    if not ip.is_global:
        return "a reserved address"
    return None


def parse_ip(host: str) -> IPAddress | None:
    """``host`` as an IP address if it is one: ``127.0.0.1``, ``[::1]``, and the numeric
    forms the resolver accepts too (``127.1``, ``2130706433``, ``0x7f.0.0.1``)."""
    text = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        pass
    if text and all(c in "0123456789abcdefxABCDEFX." for c in text) and text[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def _host_key(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _advice() -> str:
    return (
        "notifications go only to public addresses; an operator can allow this one with "
        f"{ALLOW_HOSTS_SETTING} (host names) or {ALLOW_NETWORKS_SETTING} (CIDRs)"
    )


@dataclass(frozen=True)
class Destinations:
    """The allowed exceptions to "public addresses only". Empty (the default): none."""

    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, hosts: str, networks: str) -> Destinations:
        """From the comma-separated settings: host names (``*.example.com`` for the names
        under a domain) and CIDRs (``10.1.0.0/16``, ``127.0.0.1/32``, ``fd12::/64``)."""
        names = frozenset(_host_key(h) for h in hosts.split(",") if h.strip())
        nets = []
        for raw in (n.strip() for n in networks.split(",")):
            if not raw:
                continue
            try:
                nets.append(ipaddress.ip_network(raw, strict=False))
            except ValueError as exc:
                raise InvalidArgument(
                    f"{ALLOW_NETWORKS_SETTING}: {raw!r} is not a network; use CIDRs like "
                    "10.1.0.0/16 or 127.0.0.1/32, separated by commas"
                ) from exc
        return cls(names, tuple(nets))

    def host_allowed(self, host: str) -> bool:
        key = _host_key(host)
        if key in self.allow_hosts:
            return True
        return any(entry.startswith("*.") and key.endswith(entry[1:]) for entry in self.allow_hosts)

    def refusal(self, host: str, ip: IPAddress) -> str | None:
        """Why ``host`` may not be reached at ``ip`` (``None``: it may)."""
        reason = forbidden_reason(ip)
        if reason is None:
            return None
        target = embedded_ipv4(ip) or ip
        if target in METADATA:
            # Only an entry naming exactly this address opens a metadata service.
            exact = any(n.num_addresses == 1 and target in n for n in self.allow_networks)
            return None if exact else reason
        if self.host_allowed(host) or any(target in n for n in self.allow_networks):
            return None
        return reason

    def check_literal(self, field_name: str, host: str) -> None:
        """At channel creation: refuse a host that is a forbidden IP address."""
        ip = parse_ip(host)
        if ip is None:
            return
        reason = self.refusal(host, ip)
        if reason is not None:
            raise InvalidArgument(f"{field_name}: {host} is {reason}; {_advice()}")

    async def resolve(self, host: str, port: int, within: float | None) -> list[IPAddress]:
        """Every address of ``host``, each checked; ``DestinationRefused`` if any is
        forbidden, ``OSError`` (``socket.gaierror``) if it does not resolve."""
        literal = parse_ip(host)
        if literal is not None:
            addresses = [literal]
        else:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(within):
                infos = await loop.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
                )
            addresses = []
            for info in infos:
                ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
                if ip not in addresses:
                    addresses.append(ip)
        for ip in addresses:
            reason = self.refusal(host, ip)
            if reason is not None:
                what = "is" if literal is not None else "resolves to"
                raise DestinationRefused(f"destination refused: {host} {what} {reason}")
        return addresses


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the destination check: ``connect_tcp`` resolves the
    host, checks every address and connects to a checked one. httpcore then starts TLS with
    the URL's host name as SNI and for certificate verification."""

    def __init__(
        self, destinations: Destinations, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self._destinations = destinations
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await self._destinations.resolve(host, port, timeout)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout("could not resolve the host name in time") from exc
        except OSError as exc:
            raise httpcore.ConnectError("could not resolve the host name") from exc
        last: Exception | None = None
        for ip in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(ip),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None  # resolve returns at least one address or raises
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("notifications are not sent over unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


async def connect_socket(
    destinations: Destinations, host: str, port: int, within: float | None
) -> socket.socket:
    """A connected (non-blocking) TCP socket to a checked address of ``host``: for senders
    that take a socket (SMTP), which then verify TLS against ``host``."""
    addresses = await destinations.resolve(host, port, within)
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for ip in addresses:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(within):
                await loop.sock_connect(sock, (str(ip), port))
        except (OSError, TimeoutError) as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    assert last is not None
    raise last


def tls_verify_reason(exc: BaseException) -> str | None:
    """A short reason for a failed TLS handshake, from OpenSSL's fixed messages."""
    while exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return f"TLS certificate not accepted: {exc.verify_message}"
        if isinstance(exc, ssl.SSLError):
            return "TLS handshake failed"
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None
