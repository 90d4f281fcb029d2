"""The notification senders on real sockets: TLS is verified against the host name while the
connection goes to the checked address; a redirect, were one followed, is checked hop by
hop; an SMTP server's text never reaches an attempt's error. (No coordinator here:
tests/e2e/test_notify_ssrf.py drives a real one.)"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from coordinator.model import ChannelKind
from coordinator.notify import (
    Deliverer,
    DeliveryError,
    DestinationRefused,
    Destinations,
    guarded_client,
    validate_channel,
)
from tests.support.certs import CertificateAuthority
from tests.support.procs import free_port

LOOPBACK_ONLY = Destinations.parse("", "127.0.0.1/32")
NOTE = {"execution_id": "e1", "workflow_name": "orders", "status": "FAILED"}
LEAK = "internal-secret-5b1d"


class Server:
    """An HTTP(S) server on ``host``; ``reply(handler)`` answers; SNI names are recorded."""

    def __init__(self, reply: Any, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None):
        self.paths: list[str] = []
        self.server_names: list[str | None] = []
        paths = self.paths

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                paths.append(self.path)
                reply(self)

            do_GET = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        server.stop()


def no_content(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(204)
    handler.end_headers()


def resolve_to_loopback(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """``names`` resolve to 127.0.0.1 (as a DNS record would say); others as usual."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def getaddrinfo(host: str, port: int, **kwargs: Any) -> list[Any]:
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return await real(host, port, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)


async def test_tls_is_verified_against_the_host_name_not_the_address(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, servers: list[Server]
) -> None:
    # The certificate names hooks.test only (no IP address): the connection goes to the
    # checked 127.0.0.1, and the handshake still sends and verifies the name.
    ca = CertificateAuthority("test CA")
    files = ca.issue_server(hosts=("hooks.test",), ips=()).write(tmp_path, "hooks")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(files.cert, files.key)
    server = Server(no_content, tls=tls)
    servers.append(server)
    resolve_to_loopback(monkeypatch, "hooks.test", "other.test")
    trusted = ssl.create_default_context(cadata=ca.cert_pem.decode())
    deliverer = Deliverer(
        destinations=LOOPBACK_ONLY,
        client=guarded_client(LOOPBACK_ONLY, 5.0, ssl_context=trusted),
    )
    try:
        hook = {"url": f"https://hooks.test:{server.port}/hook", "secret": "s"}
        await deliverer.send(
            ChannelKind.WEBHOOK, validate_channel(ChannelKind.WEBHOOK, hook), "d1", NOTE
        )
        assert server.paths == ["/hook"] and server.server_names == ["hooks.test"]
        # Another name for the same address: the certificate does not match it.
        other = {"url": f"https://other.test:{server.port}/hook", "secret": "s"}
        with pytest.raises(DeliveryError) as info:
            await deliverer.send(ChannelKind.WEBHOOK, other, "d2", NOTE)
        assert str(info.value).startswith("ConnectError: TLS certificate not accepted: ")
        assert "other.test" in str(info.value)
        assert server.paths == ["/hook"]
    finally:
        await deliverer.aclose()


async def test_each_redirect_hop_is_checked_when_redirects_are_followed(
    servers: list[Server],
) -> None:
    # The Deliverer follows no redirect; a client that did would still check every hop.
    target = Server(no_content, host="127.0.0.2")
    servers.append(target)

    def redirect(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", f"http://127.0.0.2:{target.port}/inside")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    start = Server(redirect)
    servers.append(start)
    client = guarded_client(LOOPBACK_ONLY, 5.0, follow_redirects=True)
    try:
        with pytest.raises(DestinationRefused, match=r"127\.0\.0\.2 is a loopback address"):
            await client.get(f"http://127.0.0.1:{start.port}/start")
    finally:
        await client.aclose()
    assert start.paths == ["/start"] and target.paths == []


class RefusingMailbox:
    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        return f"550 5.1.1 no such user; by the way the password is {LEAK}"


async def test_an_smtp_servers_text_is_not_shown_back() -> None:
    port = free_port()
    controller = Controller(RefusingMailbox(), hostname="127.0.0.1", port=port)
    controller.start()
    deliverer = Deliverer(timeout=5.0, destinations=LOOPBACK_ONLY)
    try:
        config = validate_channel(
            ChannelKind.SMTP,
            {"host": "127.0.0.1", "port": port, "from_address": "t@x.example", "to": ["a@b.c"]},
            LOOPBACK_ONLY,
        )
        with pytest.raises(DeliveryError) as info:
            await deliverer.send(ChannelKind.SMTP, config, "d1", NOTE)
        assert str(info.value) == "SMTP SMTPRecipientsRefused: recipients refused (reply 550)"
        # Without the allow setting the same server is not even connected to.
        closed = Deliverer(timeout=5.0)
        with pytest.raises(DestinationRefused, match=r"127\.0\.0\.1 is a loopback address"):
            await closed.send(ChannelKind.SMTP, config, "d2", NOTE)
        await closed.aclose()
    finally:
        await deliverer.aclose()
        controller.stop()
