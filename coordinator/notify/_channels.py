"""Channel kinds and the validation of their settings (done once, at creation).

A channel's settings are a JSON object whose keys depend on its kind:

- ``webhook``: ``url``, ``secret``, optional ``headers`` (fixed extra headers);
- ``smtp``: ``host``, ``port``, ``from_address``, ``to`` (list), ``starttls``, optional
  ``username``/``password`` (both or neither), ``subject_template``, ``body_template``;
- ``sms``: ``method``, ``url``, ``headers``, ``body_template``, ``to`` (list): one HTTP
  request per recipient to the provider, every text templated.

``validate_channel`` returns the settings normalized (defaults filled in) or raises
``InvalidArgument`` naming the offending field, e.g. ``smtp.port``. A URL or SMTP host that
is a forbidden address (loopback, private, link-local, metadata ...: see
``coordinator/notify/_network.py``) is refused here already, unless ``Destinations`` allows
it; host names are checked when they are resolved, on every send.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from email.utils import parseaddr
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from coordinator.errors import InvalidArgument
from coordinator.model import ChannelKind
from coordinator.notify._network import Destinations
from coordinator.notify._templates import ALL_FIELDS, WITHOUT_RECIPIENT, check_template

DEFAULT_SUBJECT = "[trellis] {workflow_name} {status}: {execution_id}"
DEFAULT_BODY = (
    "Execution {execution_id} of workflow {workflow_name} v{workflow_version} ended "
    "{status} at {ended_at}.\n\nError: {error_type}: {error_message} (node {error_node})\n"
)
SMS_METHODS = ("POST", "PUT", "GET")
# Headers Trellis sets itself on webhook requests.
RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "host", "x-trellis-signature", "x-trellis-delivery"}
)
MAX_RECIPIENTS = 50
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Values that must never be shown back: channel settings are write-only for these keys.
SECRET_KEYS = ("secret", "password")


def _text(config: Mapping[str, Any], kind: str, key: str, *, required: bool) -> str:
    value = config.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{kind}.{key} must be a string")
    value = value.strip() if key not in SECRET_KEYS else value
    if required and not value:
        raise InvalidArgument(f"{kind}.{key} is required")
    return value


def _url(field: str, raw: str, destinations: Destinations, *, templated: bool = False) -> str:
    if not raw:
        raise InvalidArgument(f"{field} is required")
    probe = raw
    if templated:
        check_template(field, raw)
        probe = re.sub(r"\{[a-z_]+\}", "x", raw)
    try:
        url = httpx.URL(probe)
    except (httpx.InvalidURL, ValueError) as exc:
        raise InvalidArgument(f"{field}: {raw!r} is not a URL ({exc})") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise InvalidArgument(
            f"{field}: {raw!r} is not an absolute http:// or https:// URL with a host"
        )
    if not (templated and re.search(r"\{[a-z_]+\}", raw.split("//", 1)[-1].split("/", 1)[0])):
        destinations.check_literal(field, url.host)
    return raw


def _headers(field: str, raw: Any, *, templated: bool) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"{field} must be an object of header names to values")
    out: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise InvalidArgument(f"{field}: {name!r} is not a valid header name")
        if not isinstance(value, str) or "\n" in value or "\r" in value:
            raise InvalidArgument(f"{field}.{name} must be a one-line string")
        if templated:
            check_template(f"{field}.{name}", value)
        out[name] = value
    return out


def _recipients(field: str, raw: Any, *, email: bool) -> list[str]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list | tuple) or not raw:
        raise InvalidArgument(f"{field} needs at least one recipient")
    if len(raw) > MAX_RECIPIENTS:
        raise InvalidArgument(f"{field} has {len(raw)} recipients; at most {MAX_RECIPIENTS}")
    out = []
    for item in raw:
        if not isinstance(item, str) or not item.strip():
            raise InvalidArgument(f"{field}: every recipient must be a non-empty string")
        value = item.strip()
        if email:
            _email(field, value)
        out.append(value)
    return out


def _email(field: str, value: str) -> str:
    _name, address = parseaddr(value)
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or " " in address:
        raise InvalidArgument(f"{field}: {value!r} is not an e-mail address")
    return value


def _webhook(config: Mapping[str, Any], destinations: Destinations) -> dict[str, Any]:
    kind = "webhook"
    _only(config, kind, {"url", "secret", "headers"})
    headers = _headers("webhook.headers", config.get("headers"), templated=False)
    reserved = sorted(h for h in headers if h.lower() in RESERVED_HEADERS)
    if reserved:
        raise InvalidArgument(f"webhook.headers: {', '.join(reserved)} is set by Trellis")
    return {
        "url": _url("webhook.url", _text(config, kind, "url", required=True), destinations),
        "secret": _text(config, kind, "secret", required=True),
        "headers": headers,
    }


def _smtp(config: Mapping[str, Any], destinations: Destinations) -> dict[str, Any]:
    kind = "smtp"
    _only(
        config,
        kind,
        {
            "host",
            "port",
            "from_address",
            "to",
            "starttls",
            "username",
            "password",
            "subject_template",
            "body_template",
        },
    )
    port = config.get("port", 0)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise InvalidArgument(f"smtp.port must be a port number (1-65535), not {port!r}")
    starttls = config.get("starttls", False)
    if not isinstance(starttls, bool):
        raise InvalidArgument("smtp.starttls must be true or false")
    username = _text(config, kind, "username", required=False)
    password = _text(config, kind, "password", required=False)
    if bool(username) != bool(password):
        raise InvalidArgument("smtp.username and smtp.password go together: set both or neither")
    subject = _text(config, kind, "subject_template", required=False) or DEFAULT_SUBJECT
    body = _text(config, kind, "body_template", required=False) or DEFAULT_BODY
    check_template("smtp.subject_template", subject, WITHOUT_RECIPIENT)
    check_template("smtp.body_template", body, WITHOUT_RECIPIENT)
    if "\n" in subject or "\r" in subject:
        raise InvalidArgument("smtp.subject_template must be one line")
    host = _text(config, kind, "host", required=True)
    destinations.check_literal("smtp.host", host)
    return {
        "host": host,
        "port": port,
        "from_address": _email(
            "smtp.from_address", _text(config, kind, "from_address", required=True)
        ),
        "to": _recipients("smtp.to", config.get("to"), email=True),
        "starttls": starttls,
        "username": username,
        "password": password,
        "subject_template": subject,
        "body_template": body,
    }


def _sms(config: Mapping[str, Any], destinations: Destinations) -> dict[str, Any]:
    kind = "sms"
    _only(config, kind, {"method", "url", "headers", "body_template", "to"})
    method = (_text(config, kind, "method", required=False) or "POST").upper()
    if method not in SMS_METHODS:
        raise InvalidArgument(f"sms.method must be one of {', '.join(SMS_METHODS)}")
    body = _text(config, kind, "body_template", required=method != "GET")
    check_template("sms.body_template", body, ALL_FIELDS)
    return {
        "method": method,
        "url": _url(
            "sms.url", _text(config, kind, "url", required=True), destinations, templated=True
        ),
        "headers": _headers("sms.headers", config.get("headers"), templated=True),
        "body_template": body,
        "to": _recipients("sms.to", config.get("to"), email=False),
    }


def _only(config: Mapping[str, Any], kind: str, known: set[str]) -> None:
    extra = sorted(set(config) - known)
    if extra:
        raise InvalidArgument(
            f"{kind}: unknown setting {', '.join(extra)}; known: {', '.join(sorted(known))}"
        )


_VALIDATORS = {
    ChannelKind.WEBHOOK: _webhook,
    ChannelKind.SMTP: _smtp,
    ChannelKind.SMS: _sms,
}


def validate_channel(
    kind: ChannelKind, config: Mapping[str, Any], destinations: Destinations | None = None
) -> dict[str, Any]:
    """The settings of a ``kind`` channel, normalized; ``InvalidArgument`` names the field.
    ``destinations``: the allowed exceptions to "public addresses only" (default: none)."""
    return _VALIDATORS[kind](config, destinations or Destinations())


# What a write-only value shows as when it is set.
SET = "<set>"


def redacted(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` for showing: secrets (webhook secret, SMTP password) and header values
    (where SMS providers take their tokens) show as ``<set>`` (or "" when unset); header
    names are kept."""
    shown: dict[str, Any] = {}
    for key, value in config.items():
        if key in SECRET_KEYS:
            shown[key] = SET if value else ""
        elif key == "headers" and isinstance(value, Mapping):
            shown[key] = {name: SET for name in value}
        elif key == "url" and isinstance(value, str):
            shown[key] = _url_shown(value)
        else:
            shown[key] = value
    return shown


def _url_shown(url: str) -> str:
    """``url`` without what may be a credential: the user info (``user:token@``) and the
    query's values (``?api_key=...``) show as ``<set>``; templated parts stay as written."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{SET}@{netloc.rpartition('@')[2]}"
    query = "&".join(
        f"{name}={SET}" if sep and "{{" not in value else f"{name}{sep}{value}"
        for name, sep, value in (pair.partition("=") for pair in parts.query.split("&") if pair)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
