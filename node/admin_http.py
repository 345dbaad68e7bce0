"""HTTP admin endpoint: health, Prometheus metrics, the status page and a JSON API.

It listens on `[admin] bind_address` (127.0.0.1 by default). With `[admin] token` set, every
path except `/healthz` needs the token, as ``Authorization: Bearer TOKEN`` or as the password of
HTTP Basic authentication, so that a browser can open the status page. The configuration
rejects a non-loopback address without a token. Requests that change state (POST, DELETE) must send
``Content-Type: application/json``, and an ``Origin`` header, when sent, must name this server,
so a web page from another origin cannot make a browser change anything here.

Paths
-----
GET    /healthz                              liveness and readiness (503 when not ready)
GET    /metrics                              Prometheus text format
GET    /                                     status page
GET    /api/status                           studies per state, job and outbox queue depths
GET    /api/studies?state=S&since=T&limit=N  studies, newest first
GET    /api/studies/UID/audit                audit trail of a study
POST   /api/studies/UID/requeue              new report job for a study
POST   /api/srs/UID/resend                   deliver an SR again; body {"to": NAME} (optional)
GET    /api/outbox?state=S&limit=N           outbox entries, newest first
GET    /api/ae                               callers and destinations in effect
POST   /api/ae/callers                       body {"ae_title": T, "host": H}
DELETE /api/ae/callers/TITLE?host=H&allow_any_caller=true
POST   /api/ae/destinations                  body {"name", "ae_title", "host", "port", "sr_class"}
DELETE /api/ae/destinations/NAME
POST   /api/ae/destinations/NAME/echo        C-ECHO with round-trip time
POST   /api/reload                           read callers and destinations from the file again
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import os
import re
import shutil
import socket
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import structlog

from node import admin, ae_config
from node.admin_page import STATUS_SCRIPT, STATUS_STYLE, render_status_page
from node.config import ConfigError
from node.index.models import utc_now
from node.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from node.service import NodeService

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 64 * 1024
_LIST_LIMIT_MAX = 1000
_PAGE_ROWS = 50
_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_USER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_QUIET_PATHS = frozenset({"/healthz", "/metrics"})


class HTTPError(Exception):
    """A request that ends with an error status and a JSON body naming the problem."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Response:
    """A response body with its status and content type."""

    status: HTTPStatus
    body: bytes
    content_type: str


def _json(value, status: HTTPStatus = HTTPStatus.OK) -> Response:
    return Response(status, json.dumps(value, indent=1).encode() + b"\n", "application/json")


class AdminServer:
    """The admin HTTP server of one node, in a background thread.

    Parameters
    ----------
    service
        The running node whose index, configuration and parts the endpoints read.
    """

    def __init__(self, service: NodeService) -> None:
        self.service = service
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._routes: list[tuple[str, re.Pattern, Callable]] = [
            ("GET", re.compile(r"/healthz"), self._get_health),
            ("GET", re.compile(r"/metrics"), self._get_metrics),
            ("GET", re.compile(r"/"), self._get_page),
            ("GET", re.compile(r"/static/status\.js"), self._get_script),
            ("GET", re.compile(r"/static/status\.css"), self._get_style),
            ("GET", re.compile(r"/api/status"), self._get_status),
            ("GET", re.compile(r"/api/studies"), self._get_studies),
            ("GET", re.compile(r"/api/studies/([0-9.]+)/audit"), self._get_audit),
            ("POST", re.compile(r"/api/studies/([0-9.]+)/requeue"), self._post_requeue),
            ("POST", re.compile(r"/api/srs/([0-9.]+)/resend"), self._post_resend),
            ("GET", re.compile(r"/api/outbox"), self._get_outbox),
            ("GET", re.compile(r"/api/ae"), self._get_ae),
            ("POST", re.compile(r"/api/ae/callers"), self._post_caller),
            ("DELETE", re.compile(r"/api/ae/callers/([^/]+)"), self._delete_caller),
            ("POST", re.compile(r"/api/ae/destinations"), self._post_destination),
            ("DELETE", re.compile(r"/api/ae/destinations/([^/]+)"), self._delete_destination),
            ("POST", re.compile(r"/api/ae/destinations/([^/]+)/echo"), self._post_echo),
            ("POST", re.compile(r"/api/reload"), self._post_reload),
        ]

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the port and serve requests in a background thread.

        Raises
        ------
        ConfigError
            When the address cannot be bound, for example because the port is in use.
        """
        settings = self.service.config.admin
        server_address = (settings.bind_address, settings.port)
        handler_class = type("AdminRequestHandler", (_RequestHandler,), {"admin_server": self})
        server_class = ThreadingHTTPServer
        if ipaddress.ip_address(settings.bind_address).version == 6:
            server_class = type("AdminHTTPServerV6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        try:
            self._server = server_class(server_address, handler_class)
        except OSError as exc:
            raise ConfigError(
                f"the admin endpoint cannot listen on {settings.bind_address}:{settings.port}: {exc}; "
                "set [admin] port to a free port, or enabled = false"
            ) from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="libra-admin-http", daemon=True)
        self._thread.start()
        log.info(
            "admin_http.listening",
            bind_address=settings.bind_address,
            port=self.port,
            token_required=bool(settings.token.get_secret_value()),
        )

    @property
    def port(self) -> int:
        """The TCP port the server is bound to."""
        return self._server.server_address[1] if self._server else self.service.config.admin.port

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            log.info("admin_http.stopped")

    # -- dispatch ----------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], body: dict, actor: str) -> Response:
        """Run the route that matches `method` and `path` and return its response.

        Raises
        ------
        HTTPError
            For an unknown path (404), a known path with another method (405), or a failed
            request (400, 404, 409) whose message names the cause.
        """
        path_matched = False
        for route_method, pattern, function in self._routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            path_matched = True
            if route_method == method:
                try:
                    return function(*match.groups(), query=query, body=body, actor=actor)
                except admin.NotFoundError as exc:
                    raise HTTPError(HTTPStatus.NOT_FOUND, str(exc)) from exc
                except admin.ConflictError as exc:
                    raise HTTPError(HTTPStatus.CONFLICT, str(exc)) from exc
                except (admin.AdminError, ConfigError) as exc:
                    raise HTTPError(HTTPStatus.BAD_REQUEST, str(exc)) from exc
        if path_matched:
            raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}")
        raise HTTPError(HTTPStatus.NOT_FOUND, f"no such path: {path}")

    # -- health and metrics ------------------------------------------------------------------

    def health(self) -> dict:
        """Return the liveness and readiness checks: database, store, model and listener.

        `model_loaded` is None in a process without a worker (``--no-worker``).
        """
        service = self.service
        checks: dict[str, bool | None] = {}
        try:
            with service.index.engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
            checks["database"] = True
        except Exception as exc:  # noqa: BLE001 - reported as not ready; logged
            log.warning("admin_http.database_check_failed", exc_info=exc)
            checks["database"] = False
        store_root = service.store.root
        checks["store"] = (
            store_root.is_dir()
            and os.access(store_root, os.W_OK)
            and shutil.disk_usage(store_root).free >= service.store.free_disk_reserve_bytes
        )
        checks["model_loaded"] = service.worker.model_loaded.is_set() if service.worker is not None else None
        checks["listener"] = service.receiver.is_listening
        ready = all(value is not False for value in checks.values())
        return {"live": True, "ready": ready, "checks": checks}

    def _get_health(self, **_) -> Response:
        health = self.health()
        return _json(health, HTTPStatus.OK if health["ready"] else HTTPStatus.SERVICE_UNAVAILABLE)

    def _get_metrics(self, **_) -> Response:
        return Response(HTTPStatus.OK, self.service.metrics.render(), METRICS_CONTENT_TYPE)

    # -- status page -------------------------------------------------------------------------

    def _get_page(self, **_) -> Response:
        index = self.service.index
        html = render_status_page(
            self.service.config.node.ae_title,
            admin.status_counts(index),
            admin.list_studies(index, limit=_PAGE_ROWS),
            admin.list_outbox(index, limit=_PAGE_ROWS),
            utc_now(),
        )
        return Response(HTTPStatus.OK, html.encode(), "text/html; charset=utf-8")

    def _get_script(self, **_) -> Response:
        return Response(HTTPStatus.OK, STATUS_SCRIPT.encode(), "text/javascript; charset=utf-8")

    def _get_style(self, **_) -> Response:
        return Response(HTTPStatus.OK, STATUS_STYLE.encode(), "text/css; charset=utf-8")

    # -- studies, SRs and outbox -------------------------------------------------------------

    def _get_status(self, **_) -> Response:
        index = self.service.index
        return _json({"studies": admin.status_counts(index), **admin.queue_depths(index)})

    def _get_studies(self, query: dict[str, str], **_) -> Response:
        since = admin.parse_since(query["since"]) if query.get("since") else None
        studies = admin.list_studies(
            self.service.index, state=query.get("state") or None, since=since, limit=_limit(query)
        )
        return _json([study.as_dict() for study in studies])

    def _get_audit(self, study_instance_uid: str, **_) -> Response:
        rows = admin.study_audit(self.service.index, study_instance_uid)
        return _json([row.as_dict() for row in rows])

    def _post_requeue(self, study_instance_uid: str, actor: str, **_) -> Response:
        result = admin.requeue_study(self.service.index, study_instance_uid, actor)
        return _json(asdict(result))

    def _post_resend(self, sr_sop_instance_uid: str, body: dict, actor: str, **_) -> Response:
        results = admin.resend_sr(
            self.service.index, sr_sop_instance_uid, self.service.config.destinations, actor, to=body.get("to")
        )
        self.service.sender.wake()
        return _json([asdict(result) for result in results])

    def _get_outbox(self, query: dict[str, str], **_) -> Response:
        entries = admin.list_outbox(self.service.index, limit=_limit(query), state=query.get("state") or None)
        return _json([entry.as_dict() for entry in entries])

    # -- AE titles ---------------------------------------------------------------------------

    def _config_path(self):
        if self.service.config_path is None:
            raise HTTPError(
                HTTPStatus.CONFLICT, "this node was started without a configuration file, so AE titles cannot be edited"
            )
        return self.service.config_path

    def _get_ae(self, **_) -> Response:
        config = self.service.config
        return _json(
            {
                "config_path": str(self.service.config_path) if self.service.config_path else None,
                "callers": [caller.model_dump() for caller in config.callers],
                "destinations": [destination.model_dump(mode="json") for destination in config.destinations],
            }
        )

    def _post_caller(self, body: dict, actor: str, **_) -> Response:
        caller = ae_config.add_caller(self._config_path(), str(body.get("ae_title", "")), str(body.get("host") or ""))
        reload = self.service.reload_config()
        log.info("admin.caller_added_by_api", calling_ae_title=caller.ae_title, actor=actor)
        return _json({"added": caller.model_dump(), "reload": reload.as_dict()}, HTTPStatus.CREATED)

    def _delete_caller(self, ae_title: str, query: dict[str, str], actor: str, **_) -> Response:
        removed = ae_config.remove_caller(
            self._config_path(),
            urllib.parse.unquote(ae_title),
            host=query.get("host"),
            allow_any_caller=query.get("allow_any_caller") == "true",
        )
        reload = self.service.reload_config()
        log.info("admin.caller_removed_by_api", calling_ae_title=urllib.parse.unquote(ae_title), actor=actor)
        return _json({"removed": removed, "reload": reload.as_dict()})

    def _post_destination(self, body: dict, actor: str, **_) -> Response:
        destination = ae_config.make_destination(body)
        ae_config.add_destination(self._config_path(), destination)
        reload = self.service.reload_config()
        log.info("admin.destination_added_by_api", destination=destination.name, actor=actor)
        return _json({"added": destination.model_dump(mode="json"), "reload": reload.as_dict()}, HTTPStatus.CREATED)

    def _delete_destination(self, name: str, actor: str, **_) -> Response:
        name = urllib.parse.unquote(name)
        ae_config.remove_destination(self._config_path(), name)
        reload = self.service.reload_config()
        log.info("admin.destination_removed_by_api", destination=name, actor=actor)
        return _json({"removed": name, "reload": reload.as_dict()})

    def _post_echo(self, name: str, **_) -> Response:
        name = urllib.parse.unquote(name)
        destination = next((item for item in self.service.config.destinations if item.name == name), None)
        if destination is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"destination {name!r} is not configured")
        result = ae_config.echo_destination(destination, self.service.config.node.ae_title)
        return _json(result.as_dict())

    def _post_reload(self, **_) -> Response:
        return _json(self.service.reload_config().as_dict())


def _limit(query: dict[str, str]) -> int:
    text = query.get("limit", "100")
    if not text.isdigit() or not 1 <= int(text) <= _LIST_LIMIT_MAX:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"limit {text!r} is not a whole number from 1 to {_LIST_LIMIT_MAX}")
    return int(text)


class _RequestHandler(BaseHTTPRequestHandler):
    """Parses one request, checks authentication and origin, and writes the response."""

    admin_server: AdminServer
    server_version = "libra-node-admin"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        """Silence the base class's stderr lines; `_handle` logs each request with structlog."""

    def _handle(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = dict(urllib.parse.parse_qsl(url.query))
        actor = ""
        try:
            actor = self._authenticate(path)
            body = self._read_body(method)
            response = self.admin_server.handle(method, path, query, body, actor)
        except HTTPError as exc:
            response = _json({"error": exc.message}, exc.status)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the client as a status
            log.error("admin_http.request_failed", method=method, path=path, exc_info=exc)
            response = _json({"error": f"internal error: {type(exc).__name__}; see the node's log"}, HTTPStatus.INTERNAL_SERVER_ERROR)
        self._send(response)
        level = log.debug if path in _QUIET_PATHS and response.status < 400 else log.info
        level("admin_http.request_handled", method=method, path=path, status=int(response.status), actor=actor)

    def _authenticate(self, path: str) -> str:
        """Return the actor name of the request, or raise HTTPError 401 or 403."""
        settings = self.admin_server.service.config.admin
        token = settings.token.get_secret_value()
        if not token:
            self._check_loopback_host()
            return "admin:api"
        if path == "/healthz":
            return "admin:api"
        header = self.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode()):
            return "admin:api"
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, password = "", ""
            if hmac.compare_digest(password.encode(), token.encode()):
                return f"admin:{user}" if _USER_NAME_PATTERN.match(user) else "admin:api"
        raise HTTPError(
            HTTPStatus.UNAUTHORIZED,
            "the admin token is required: send 'Authorization: Bearer TOKEN', or the token as the Basic auth password",
        )

    def _check_loopback_host(self) -> None:
        """Reject a Host header that is not a loopback name, which a DNS rebinding page would send."""
        host = (self.headers.get("Host") or "").strip()
        hostname = urllib.parse.urlsplit(f"//{host}").hostname or ""
        if hostname == "localhost":
            return
        try:
            if ipaddress.ip_address(hostname).is_loopback:
                return
        except ValueError:
            pass
        raise HTTPError(
            HTTPStatus.FORBIDDEN,
            f"Host {host!r} is not a loopback address; without an admin token only 127.0.0.1 or localhost is served",
        )

    def _read_body(self, method: str) -> dict:
        if method == "GET":
            return {}
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise HTTPError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"{method} requests must send Content-Type: application/json"
            )
        origin = self.headers.get("Origin")
        if origin is not None and urllib.parse.urlsplit(origin).netloc != self.headers.get("Host", ""):
            raise HTTPError(HTTPStatus.FORBIDDEN, f"Origin {origin!r} is not this server; requests from other sites are rejected")
        length_text = self.headers.get("Content-Length", "0")
        if not length_text.isdigit() or int(length_text) > MAX_BODY_BYTES:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body must be at most {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(int(length_text)) if int(length_text) else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        return body

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _CONTENT_SECURITY_POLICY)
        if response.status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Basic realm="libra-node admin", charset="UTF-8"')
        self.end_headers()
        self.wfile.write(response.body)
