"""The read-only status page: `dicom-pipeline web`, and part of `up`.

One HTML page that reloads itself, built from :mod:`pipeline.ops.status` on every request: what is
being received, queued and processed, the recent results with their label, probability and
preview, and the failed items with their errors. ``/api/status`` gives the same as JSON and
``/preview/<path>`` serves a result's preview PNG (nothing else under results/). No request
changes anything; every value is HTML-escaped. It listens on loopback unless configured
otherwise, since it shows results.
"""

from __future__ import annotations

import html
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from pipeline.core.results import PREVIEW_FILE
from pipeline.core.settings import Settings
from pipeline.ops import status

log = logging.getLogger(__name__)

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; } td, th { padding: 4px 10px; border-bottom: 1px solid #ddd;
text-align: left; vertical-align: middle; } th { background: #f3f3f3; }
.uid { font-family: monospace; font-size: 12px; } .err { color: #a00; }
.state-receiving { color: #06c; } .state-queued { color: #a60; } .state-processing { color: #080; }
img.preview { height: 96px; image-rendering: pixelated; }
"""


def _cell(value: Any, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<td{attr}>{html.escape(str(value))}</td>"


def _table(headers: list[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f"<p>{html.escape(empty)}</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


RESULT_COLUMNS = [
    "finished",
    "study / input",
    "model",
    "label",
    "probability",
    "findings",
    "objects",
    "received to result",
    "inference",
    "preview",
]


def render(snap: status.Snapshot, refresh_s: int) -> str:
    queues = ", ".join(f"{k}: {v}" for k, v in snap.queues.items()) or "-"
    flight = [_flight_row(f) for f in snap.in_flight]
    results = [_result_row(r) for r in snap.results]
    failures = [_failure_row(f) for f in snap.failed]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh_s}">
<title>dicom-pipeline status</title><style>{STYLE}</style></head><body>
<h1>dicom-pipeline</h1>
<p id="summary">Redis: {html.escape(snap.broker)} &middot; queues: {html.escape(queues)}
&middot; {len(snap.in_flight)} in flight &middot; {len(snap.failed)} failed
&middot; <span id="unrouted">{html.escape(snap.unrouted.line)}</span>
&middot; <span id="memory">{html.escape(snap.memory.line if snap.memory else "")}</span>
&middot; <span id="pulls">{html.escape("; ".join(snap.pulls))}</span>
&middot; updated {snap.taken.astimezone().strftime("%H:%M:%S")}, every {refresh_s} s</p>
<h2>In flight</h2>
{_table(["study / input", "state", "for", "detail"], flight, "Nothing in flight.")}
<h2>Recent results</h2>
{_table(RESULT_COLUMNS, results, "No results yet.")}
<h2>Failed</h2>
{_table(["when", "id", "item", "stage", "error"], failures, "No failed items.")}
</body></html>
"""


def _flight_row(f: status.InFlight) -> str:
    state = f'<td class="state-{f.state.split()[0]}">{html.escape(f.state)}</td>'
    return (
        "<tr>"
        + _cell(f.what, "uid")
        + state
        + _cell(f"{f.age_s:.0f} s")
        + _cell(f.detail)
        + "</tr>"
    )


def _result_row(r: status.ResultRow) -> str:
    img = (
        f'<img class="preview" alt="preview" src="/preview/{html.escape(r.preview)}">'
        if r.preview
        else ""
    )
    return (
        "<tr>"
        + _cell(r.finished.astimezone().strftime("%Y-%m-%d %H:%M:%S"))
        + _cell(r.what, "uid")
        + _cell(r.model)
        + f'<td class="label">{html.escape(r.label)}</td>'
        + f'<td class="probability">{r.probability:.3f}</td>'
        + _cell(r.findings)
        + _cell(", ".join(r.objects))
        + _cell(f"{r.total_s:.1f} s" + (" (urgent)" if r.urgent else ""))
        + _cell(f"{r.inference_ms:.0f} ms")
        + f"<td>{img}</td></tr>"
    )


def _failure_row(f: status.FailedRow) -> str:
    cells = _cell(f.when) + _cell(f.id, "uid") + _cell(f.what) + _cell(f.stage)
    return "<tr>" + cells + _cell(f.error, "err") + "</tr>"


class _Handler(BaseHTTPRequestHandler):
    settings: Settings
    broker_url: str | None

    def do_GET(self) -> None:
        try:
            self._get()
        except Exception:  # logged: a page that cannot be built is a 500, not a dead thread
            log.exception("status page request failed")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain", b"error, see the log\n")

    def _get(self) -> None:
        path = unquote(urlsplit(self.path).path)
        if path in ("/", "/index.html"):
            snap = status.snapshot(self.settings, self.broker_url)
            body = render(snap, self.settings.web.refresh_s).encode()
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", body)
        elif path == "/api/status":
            snap = status.snapshot(self.settings, self.broker_url)
            self._send(HTTPStatus.OK, "application/json", json.dumps(snap.as_json()).encode())
        elif path.startswith("/preview/"):
            self._preview(path.removeprefix("/preview/"))
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

    def _preview(self, relative: str) -> None:
        results = self.settings.results_dir.resolve()
        target = (results / relative).resolve()
        # Only a preview PNG inside results/: no traversal, no other file.
        if target.name != PREVIEW_FILE or not target.is_relative_to(results):
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")
            return
        try:
            data = target.read_bytes()
        except OSError:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")
            return
        self._send(HTTPStatus.OK, "image/png", data)

    def _send(self, code: HTTPStatus, kind: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("web: " + format, *args)


def start(settings: Settings, broker_url: str | None) -> ThreadingHTTPServer:
    """Serve the page from a daemon thread; returns the server (``server_address`` has the
    port, ``shutdown()`` stops it)."""
    handler = type("Handler", (_Handler,), {"settings": settings, "broker_url": broker_url})
    server = ThreadingHTTPServer((settings.web.host, settings.web.port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="web", daemon=True).start()
    host, port = server.server_address[:2]
    log.info("status page on http://%s:%d/", host, port)
    return server
