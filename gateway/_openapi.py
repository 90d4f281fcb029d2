"""The gateway's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Written by hand next to the routes in ``gateway.app`` (a test fuzzes the real process
against it: every answer must match what is documented here, status, headers and body).
"""

from __future__ import annotations

from typing import Any

from gateway.config import GatewayConfig

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"$ref": f"#/components/responses/E{code}"} for code in codes}


_ERROR_TEXT = {
    400: "The request is malformed: the body is not JSON the gateway or coordinator accepts "
    "(not UTF-8 JSON, NaN/Infinity, integers past 100 digits, nesting past 128 levels), "
    "or a field is invalid.",
    401: "The signature, token or credential is missing or wrong.",
    403: "The credential may not do this.",
    404: "No such webhook path, execution or node; or the route is disabled.",
    408: "The body did not arrive within TRELLIS_GATEWAY_BODY_TIMEOUT; the connection is closed.",
    409: "A conflict: a replayed signed webhook delivery, or an approval already decided.",
    413: "The body is larger than TRELLIS_GATEWAY_MAX_BODY_BYTES.",
    429: "The coordinator refused the call for now (rate limit or backpressure).",
    502: "The coordinator answered with an unexpected error.",
    503: "The coordinator cannot be reached; retry after Retry-After seconds.",
}


def _error_response(code: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _ERROR_TEXT[code],
        "content": _json_content(_ERROR),
    }
    if code == 503:
        response["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }
        }
    return response


_BEARER = {
    "name": "Authorization",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
}


def openapi_document(config: GatewayConfig) -> dict[str, Any]:
    """The document for a gateway with ``config`` (its body limit is stated)."""
    limit = config.max_body_bytes
    node_params = [
        {"name": "execution_id", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "node_id", "in": "path", "required": True, "schema": {"type": "string"}},
        {
            **_BEARER,
            "description": "`Bearer <your Trellis API key or JWT>`: the decision is made as "
            "you, and the coordinator checks the node's role.",
        },
    ]

    def decision(verb: str) -> dict[str, Any]:
        return {
            "post": {
                "operationId": f"{verb}Node",
                "summary": f"{verb.capitalize()} a waiting approval node as the caller.",
                "parameters": node_params,
                "requestBody": {
                    "required": False,
                    "description": f'`{{"comment": "..."}}` (or empty); at most {limit} bytes.',
                    "content": _json_content({"$ref": "#/components/schemas/Decision"}),
                },
                "responses": {
                    "200": {
                        "description": "Decided.",
                        "content": _json_content({"$ref": "#/components/schemas/Decided"}),
                    },
                    **_errors(400, 401, 403, 404, 408, 409, 413, 429, 503),
                },
            }
        }

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Trellis gateway",
            "version": "1",
            "description": "HTTP in front of the Trellis coordinator: probes, webhooks, "
            "published events and approval decisions. Every error answers JSON "
            '`{"error": "..."}`.',
        },
        "paths": {
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "The gateway process is alive.",
                    "responses": {
                        "200": {
                            "description": "Alive.",
                            "content": _json_content(
                                {
                                    "type": "object",
                                    "properties": {"status": {"const": "ok"}},
                                    "required": ["status"],
                                }
                            ),
                        }
                    },
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Whether the coordinator answers its health service.",
                    "responses": {
                        "200": {
                            "description": "Ready.",
                            "content": _json_content({"$ref": "#/components/schemas/Ready"}),
                        },
                        "503": {
                            "description": "The coordinator is unreachable or not serving.",
                            "content": _json_content({"$ref": "#/components/schemas/Ready"}),
                        },
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": {
                        "200": {
                            "description": "The OpenAPI document.",
                            "content": _json_content({"type": "object"}),
                        }
                    },
                }
            },
            "/api/webhooks/{path}": {
                "post": {
                    "operationId": "fireWebhook",
                    "summary": "Fire the webhook trigger at `path` (it may contain `/`).",
                    "description": "The raw body and the headers go to the coordinator "
                    "unparsed; it verifies the signature (`X-Trellis-Signature: t=<unix "
                    'seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>`, at most 1024 '
                    "characters and 8 v1 values) or the bearer token first, and only then "
                    "parses the body. A signed delivery seen already inside its tolerance "
                    f"window is refused (409). At most {limit} bytes.",
                    "parameters": [
                        {
                            "name": "path",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "X-Trellis-Signature",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                        },
                        {**_BEARER, "description": "`Bearer <token>` for token triggers."},
                    ],
                    "requestBody": {
                        "required": False,
                        "content": _json_content({}),
                    },
                    "responses": {
                        "202": {
                            "description": "The execution started (or found by the "
                            "trigger's idempotency key: `created` false).",
                            "content": _json_content({"$ref": "#/components/schemas/Fired"}),
                        },
                        **_errors(400, 401, 403, 404, 408, 409, 413, 429, 502, 503),
                    },
                }
            },
            "/api/events/{name}": {
                "post": {
                    "operationId": "publishEvent",
                    "summary": "Publish an event: every matching event trigger starts.",
                    "description": "Guarded by `Authorization: Bearer "
                    "<TRELLIS_GATEWAY_EVENTS_TOKEN>`; 404 when that setting is empty. The "
                    f"body is any JSON document within the bounds above, at most {limit} "
                    "bytes.",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        {**_BEARER, "description": "`Bearer <events token>`."},
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                        },
                    ],
                    "requestBody": {"required": False, "content": _json_content({})},
                    "responses": {
                        "202": {
                            "description": "The triggers started, failed or filtered out.",
                            "content": _json_content({"$ref": "#/components/schemas/Published"}),
                        },
                        **_errors(400, 401, 403, 404, 408, 413, 429, 502, 503),
                    },
                }
            },
            "/api/executions/{execution_id}/nodes/{node_id}/approve": decision("approve"),
            "/api/executions/{execution_id}/nodes/{node_id}/reject": decision("reject"),
        },
        "components": {
            "responses": {f"E{code}": _error_response(code) for code in _ERROR_TEXT},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string", "minLength": 1}},
                    "required": ["error"],
                },
                "Fired": {
                    "type": "object",
                    "properties": {
                        "execution_id": {"type": "string"},
                        "created": {"type": "boolean"},
                    },
                    "required": ["execution_id", "created"],
                },
                "Published": {
                    "type": "object",
                    "properties": {
                        "executions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "trigger_id": {"type": "string"},
                                    "execution_id": {"type": "string"},
                                    "created": {"type": "boolean"},
                                },
                                "required": ["trigger_id", "execution_id", "created"],
                            },
                        },
                        "failures": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "trigger_id": {"type": "string"},
                                    "error": {"type": "string"},
                                },
                                "required": ["trigger_id", "error"],
                            },
                        },
                        "filtered_out": {"type": "integer", "minimum": 0},
                    },
                    "required": ["executions", "failures", "filtered_out"],
                },
                "Decision": {
                    "type": "object",
                    "properties": {"comment": {"type": "string"}},
                },
                "Decided": {
                    "type": "object",
                    "properties": {
                        "execution_id": {"type": "string"},
                        "status": {"type": "string"},
                        "node_status": {"type": "string"},
                    },
                    "required": ["execution_id", "status", "node_status"],
                },
                "Ready": {
                    "type": "object",
                    "properties": {
                        "status": {"enum": ["ready", "unready"]},
                        "dependencies": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "degraded": {"type": "array", "items": {"type": "string"}},
                        "dispatch": {
                            "type": "object",
                            "properties": {
                                "shared": {"type": "boolean"},
                                "detail": {"type": "string"},
                            },
                            "required": ["shared", "detail"],
                        },
                        "events_endpoint": {"enum": ["enabled", "disabled"]},
                    },
                    "required": ["status", "dependencies", "degraded", "events_endpoint"],
                },
            },
        },
    }


__all__ = ["openapi_document"]
