"""The OpenAPI 3.1 document of the REST API (``GET /v1/openapi.json``).

Clients (PyEnSight, portals, pages) read the API's contract from the server itself,
and the test suite holds the live server to it: every call, parameter, status and JSON
shape, errors included. Data, not code: :data:`OPERATIONS` describes each call by
(method, path template), and :func:`document` keeps exactly the calls the router says
it answers (:meth:`~.api.RestApi.routes`), failing on one it does not describe, so the
document can neither miss a call nor list one the server does not answer.
"""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..core.lifecycle import State
from ..identity import USER_KEY_HEADER, USER_KEY_PARAM
from ..sessions.job_launcher import HEADER
from ..sessions.jobs import REPORT_MAX_SIZE
from ..sessions.token_status import WARNINGS
from .events import HEARTBEAT, MAX_PER_CLIENT, MAX_STREAMS

Json = dict[str, Any]


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, description: str) -> Json:
    return {"type": [kind, "null"], "description": description}


def _object(properties: Json, optional: tuple[str, ...] = ()) -> Json:
    """A JSON object with these properties and no other, all required but ``optional``."""
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": [name for name in properties if name not in optional]}


_STRINGS: Json = {"type": "object", "additionalProperties": {"type": "string"}}
_STATE: Json = {"enum": [str(state) for state in State]}
_JOB = {  # a Slurm service's instance: its job as the reservation records it
    "job_id": _nullable("string", "the Slurm job's id (a Slurm service only)"),
    "job_node": _nullable("string", "the compute node, once the job runs"),
    "queue_reason": _nullable("string", "Slurm's reason while queued: Priority, "
                                        "Resources..."),
    "expected_start": {"type": ["string", "null"], "format": "date-time",
                       "description": "when Slurm's backfill plans the start (ISO 8601)"},
}
_ADMIN = {  # an instance's session, shown to the administrator only
    "client": _nullable("string", "its websocket's client address (administrator only)"),
    "backend": _nullable("string", "host:port the session is relayed to (administrator "
                                   "only)"),
    "pid": _nullable("integer", "the process listening there, on the instance running the "
                                "session (administrator only)"),
}
_TOKEN_FIELDS = {
    "service": {"type": "string"},
    "index": {"type": "integer", "minimum": 0},
    "state": _STATE,
    "node": _nullable("string", "the cluster instance holding it (--node_name)"),
    **_JOB,
    "seconds_left": {"type": ["number", "null"], "minimum": 0,
                     "description": "until the session ends on its own (see ends)"},
    "ends": {"enum": ["timeout", "reconnect grace", "time limit", None],
             "description": "what ends it then: --timeout of a reservation never used, "
                            "a detached session's reconnect grace, a job's time limit"},
    "end_reason": _nullable("string", "why it ended (state ended)"),
}

SCHEMAS: Json = {
    "Error": _object({"error": {"type": "string", "description": "why, for people"}}),
    "Health": _object({"status": {"enum": ["ok", "stopping"]},
                       "node": _nullable("string", "--node_name"),
                       "store": {"enum": ["ok", "unavailable"]}}),
    "Stopping": _object({"status": {"const": "stopping"}}),
    "Service": _object({
        "name": {"type": "string"},
        "count": {"type": "integer", "minimum": 0,
                  "description": "instances in all (in a cluster: the cluster's capacity)"},
        "instances": {"type": "array", "items": _ref("Instance")},
        "common_options": {"type": "object", "description": "the service's config options"},
        "file_ext": {"type": "array", "items": {"type": "string"}}}),
    "Instance": _object({
        "index": {"type": "integer", "minimum": 0},
        "token": _nullable("string", "null: another known user's token"),
        "timestamp": {"type": "number", "description": "reserved at (seconds since epoch)"},
        "options": _STRINGS | {"description": "the reserve call's query"},
        "state": _STATE,
        "owner": _nullable("string", "the known user who reserved it"),
        "bytes_up": {"type": "integer", "minimum": 0, "description": "browser to service"},
        "bytes_down": {"type": "integer", "minimum": 0, "description": "service to browser"},
        "viewers": {"type": "array", "description": "the viewers of its shares on the "
                    "instance answering (mode, user, since: seconds since the epoch)",
                    "items": _object({"mode": {"enum": ["view", "control"]},
                                      "user": _nullable("string", "a known user"),
                                      "since": {"type": "number"}})},
        "node": {"type": "string", "description": "the cluster instance holding it"},
        **_JOB,
        "detached_seconds_left": {"type": "number", "minimum": 0,
                                  "description": "reconnect grace left (state detached)"},
        **_ADMIN},
        optional=("node", *_JOB, "detached_seconds_left", *_ADMIN)),
    "Reserved": _object({"token": {"type": "string",
                                   "description": "the websocket's ?token= (a capability)"}}),
    "Released": _object({"released": {"type": "string"}, "service": {"type": "string"}}),
    "Shared": _object({"token": {"type": "string", "description": "the share token: a "
                                 "viewer's websocket ?token= (a capability)"},
                       "mode": {"enum": ["view", "control"]}}),
    "TokenStatus": _object(_TOKEN_FIELDS),
    "Event": _object({"event": {"enum": ["state", "warning", "ended"]}, **_TOKEN_FIELDS}),
    "JobReport": _object({
        "job_id": {"type": "string"},
        "host": {"type": "string", "minLength": 1, "maxLength": 255},
        "port": {"type": "integer", "minimum": 0, "maximum": 65535,
                 "description": "0 while the command does not listen yet"},
        "time": {"type": "number", "description": "when signed (as in the signature)"},
        "output": {"type": "array", "items": {"type": "string"},
                   "description": "what the command printed since the last report"}},
        optional=("output",)),
    "JobReportAccepted": _object({"status": {"const": "ok"}}),
}


def _json(description: str, schema: Json) -> Json:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _text(description: str, media_type: str) -> Json:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


def _parameter(name: str, where: str, description: str, schema: Json | None = None) -> Json:
    return {"name": name, "in": where, "required": where == "path", "description": description,
            "schema": schema or {"type": "string"}}


_USER = [_parameter(USER_KEY_PARAM, "query", "a --users_file user's key: who is asking (or, "
                    "from a --trusted_proxy, its --user_header)"),
         _parameter(USER_KEY_HEADER, "header", f"the same as ?{USER_KEY_PARAM}=")]
_TOKEN = _parameter("token", "path", "the reservation token (also its credential)")
_SECURED: list[Json] = [{"securityToken": []}, {"bearer": []}]
_TOKEN_HOLDER = [*_SECURED, {}]  # {}: the reservation token in the path suffices
_NOT_HOLDER = "neither the security token nor a known reservation token"
_PORT_ERRORS = {
    "421": "a Host this server does not answer to (DNS rebinding; see --allowed_host)",
    "default": "any other error of the HTTP port: a malformed request (400), an unsupported "
               "Expect (417), a request head too large (431), HTTP other than 1.0 and 1.1 "
               "(505), an internal error (500)",
}
_CALL_ERRORS = {
    "401": "missing or wrong security token",
    "405": "a method other than GET and HEAD",
}
_CROSS_SITE = "a page of another site made it (not with the security token; see "\
              "--allowed_origin)"
_STORE = "the reservation store (Redis) is unavailable"


def _operation(operation_id: str, summary: str, ok: Json, errors: dict[str, str | Json],
               security: list[Json] = _SECURED, **fields: Any) -> Json:
    """An operation answering ``ok`` (200) or an error of ``errors`` (a description of an
    Error, or a response) or the port's. A call with ``security`` is one of the dispatch
    table: also 401 and 405."""
    if security:
        errors = {**_CALL_ERRORS, **errors}
    responses = {"200": ok} | {
        code: _json(text, _ref("Error")) if isinstance(text, str) else text
        for code, text in sorted({**errors, **_PORT_ERRORS}.items())}
    return {"operationId": operation_id, "summary": summary, "security": security,
            **fields, "responses": responses}


_EVENT_ITEM = {  # one server-sent event (OpenAPI 3.2's itemSchema, as an extension)
    "type": "object", "additionalProperties": False, "required": ["id", "data"],
    "properties": {
        "id": {"type": "string", "description": "the token's change count (seq)"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": _ref("Event")}},
}
_WARN_AT = " and ".join(f"{mark / 60:g}" for mark in WARNINGS)

OPERATIONS: dict[tuple[str, str], Json] = {
    ("GET", "/v1/stop"): _operation(
        "stop", "Stop the server gracefully: close tunnels, stop every service, exit 0",
        _json("stopping", _ref("Stopping")), {"403": _CROSS_SITE}),
    ("GET", "/v1/status"): _operation(
        "status", "One object per service the caller may see",
        _json("the services ([] with none); another known user's token is null",
              {"type": "array", "items": _ref("Service")}),
        {"503": _STORE}, parameters=_USER),
    ("GET", "/v1/status/{token}"): _operation(
        "tokenStatus", "What the token's holder is told of its session (ended ones too, "
                       "for a while)",
        _json("the session", _ref("TokenStatus")),
        {"401": _NOT_HOLDER, "403": "the token is another known user's",
         "404": "unknown or expired token", "503": _STORE},
        _TOKEN_HOLDER, parameters=[_TOKEN, *_USER]),
    ("GET", "/v1/events/{token}"): _operation(
        "tokenEvents", "The session's live view, as server-sent events",
        {"description": (
            "text/event-stream: the state now, then an event per change, warnings "
            f"{_WARN_AT} minutes before the session ends on its own, a comment every "
            f"{HEARTBEAT:g} s; it ends after the ended event. Each event is id: and data: "
            "(an Event); a Last-Event-ID is ignored: a stream resumes with the state now"),
         "content": {"text/event-stream": {"schema": {"type": "string"},
                                           "x-itemSchema": _EVENT_ITEM}}},
        {"401": _NOT_HOLDER, "403": "the token is another known user's",
         "404": "unknown or expired token",
         "429": f"the client already has {MAX_PER_CLIENT} event streams open",
         "503": f"{MAX_STREAMS} event streams open on this instance, or {_STORE}"},
        _TOKEN_HOLDER, parameters=[_TOKEN, *_USER]),
    ("GET", "/v1/status_view"): _operation(
        "statusView", "A live dashboard of the status (HTML, refreshing every 2 s)",
        _text("the page, or with ?fragment its live part", "text/html"),
        {"503": _STORE},
        parameters=[_parameter("fragment", "query", "present: the page's live part only"), *_USER]),
    ("GET", "/v1/metrics"): _operation(
        "metrics", "Prometheus metrics",
        _text("the Prometheus text format, version 0.0.4", "text/plain"), {"503": _STORE}),
    ("GET", "/v1/reserve/{service}"): _operation(
        "reserve", "Reserve an instance of a service: its token opens the websocket",
        _json("reserved", _ref("Reserved")),
        {"403": f"{_CROSS_SITE}; or the caller is not in the service's group, or anonymous "
                "for a Slurm service run as the reserving user",
         "404": "unknown service",
         "410": "released while its Slurm job was being submitted (\"start\": \"reserve\")",
         "502": "its Slurm job could not be submitted (\"start\": \"reserve\")",
         "503": f"all its instances are in use, or {_STORE}"},
        parameters=[_parameter("service", "path", "the service's name"), *_USER,
                    _parameter("options", "query", "the query less security_token and "
                               "user_key: the reservation's options", _STRINGS)
                    | {"style": "form", "explode": True}]),
    ("GET", "/v1/release/{token}"): _operation(
        "release", "End a reservation: stop its service if it runs (cancel its Slurm job); "
                   "a share token: revoke it, closing its viewers",
        _json("released", _ref("Released")),
        {"401": _NOT_HOLDER, "403": f"{_CROSS_SITE}; or the token is another known user's",
         "404": "unknown token", "503": _STORE}, _TOKEN_HOLDER,
        parameters=[_TOKEN, *_USER]),
    ("GET", "/v1/share/{token}"): _operation(
        "share", "A share token: viewers of the running session, read-only (view) or not",
        _json("shared", _ref("Shared")),
        {"400": "mode is neither view nor control",
         "401": _NOT_HOLDER, "403": f"{_CROSS_SITE}; or the token is another known user's",
         "404": "unknown or expired token",
         "409": "sharing is off for the service (max_viewers 0), view needs a service "
                "that declares \"protocol\": \"rfb\", or its VNC server offers neither "
                "None nor VNC authentication",
         "503": _STORE}, _TOKEN_HOLDER,
        parameters=[_TOKEN, *_USER, _parameter("mode", "query", "view (the default) or "
                                               "control", {"enum": ["view", "control"]})]),
    ("GET", "/v1/health"): _operation(
        "health", "For load balancers; a store outage is no failure",
        _json("serving", _ref("Health")),
        {"503": _json("shutting down", _ref("Health"))}, [],
        description="No security token needed."),
    ("GET", "/v1/openapi.json"): _operation(
        "openapi", "This document", _json("the OpenAPI 3.1 document", {
            "type": "object", "required": ["openapi", "info", "paths"],
            "properties": {"openapi": {"const": "3.1.0"}}}), {}, []),
    ("POST", "/v1/job_report"): _operation(
        "jobReport", "A Slurm job's launcher reports where its command listens",
        _json("accepted", _ref("JobReportAccepted")),
        {"400": "not a job report", "403": f"{_CROSS_SITE}; or report refused: bad "
         "signature, signed over 60 s ago, for another job, from another node than Slurm "
         "allocated, not newer than the last one",
         "405": "not a POST", "410": "no session wants that job (the launcher ends it)",
         "413": f"over {REPORT_MAX_SIZE} bytes",
         "503": "the job is not seen running yet (the launcher tries again)"}, [],
        description="For the in-job launcher, not for pages: signed with the job's own "
                    f"secret in the {HEADER} header, no security token.",
        parameters=[_parameter(HEADER, "header", "TIME HMAC: the hex HMAC-SHA256 of TIME, "
                               "a newline and the body under the job's secret")
                    | {"required": True}],
        requestBody={"required": True, "content": {
            "application/json": {"schema": _ref("JobReport")}}}),
}
"""Every call the server may answer, by (method, path template)."""

_INFO = {
    "title": "websocketserver REST API", "version": __version__,
    "description": (
        "The HTTP port's REST API. With a security token configured, a call needs it as "
        "?security_token= or Authorization: Bearer (else 401), but the public ones and, "
        "for calls about a reservation token, that token's holder. Errors are JSON "
        "{\"error\": \"...\"}; a GET call answers HEAD too, but for the calls that "
        "change state (stop, reserve, release, share: 405). A path under /v1/ not "
        "described here answers 404."),
}


def document(routes: list[tuple[str, str]]) -> Json:
    """The document describing ``routes`` (method, path template): each must be in
    :data:`OPERATIONS` (else :class:`KeyError` naming it), and no other call is."""
    paths: Json = {}
    for method, path in routes:
        if (method, path) not in OPERATIONS:
            raise KeyError(f"{method} {path} is not described in the OpenAPI document")
        paths.setdefault(path, {})[method.lower()] = OPERATIONS[method, path]
    return {
        "openapi": "3.1.0", "info": _INFO, "security": _SECURED, "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "securityToken": {"type": "apiKey", "in": "query", "name": "security_token"},
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "the security token"}}},
    }
