"""The server's HTTP API (stdlib ThreadingHTTPServer), bound to 127.0.0.1 unless --api-host says otherwise.

    GET    /streams          every stream: state and counts (offered, classified, dropped, reconnects)
    POST   /streams          add one: a JSON body like a streams-file entry, {"id": "door", "source": "rtsp://..."}
    DELETE /streams/<id>     remove one (what it already queued is still classified and written)
    GET    /healthz          200 while the engine works and a stream is live or connecting, else 503 (JSON body)
    GET    /metrics          Prometheus metrics
    POST   /model            {"path": DIR}: load, verify here and switch to DIR's model (the old one serves meanwhile)
    POST   /reload           re-read the --streams file (SIGHUP does the same)

Errors are JSON {"error": "one line"} with 400 (bad request), 404 (no such stream) or 409 (refused swap).
"""
from __future__ import annotations

import json

from edgepipe import UserError
from edgepipe.runtime.mjpeg_server import QuietHandler, start_http_server
from edgepipe.runtime.streams import StreamsError, stream_config

MAX_BODY = 64 * 1024


class Api:
    def __init__(self, server, port: int, host: str = "127.0.0.1"):
        self.server = server
        self.httpd = start_http_server(host, port, self._handler(), "the API", "--api-port")
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        api = self

        class Handler(QuietHandler):
            def do_GET(self):
                self._answer(api.get, self.path.split("?", 1)[0])

            def do_POST(self):
                self._answer(api.post, self.path.split("?", 1)[0], self._body())

            def do_DELETE(self):
                self._answer(api.delete, self.path.split("?", 1)[0])

            def _body(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    return ValueError(f"request body over {MAX_BODY} bytes")
                raw = self.rfile.read(length) if length else b""
                try:
                    return json.loads(raw) if raw.strip() else {}
                except json.JSONDecodeError as exc:
                    return ValueError(f"the body is not JSON: {exc.msg} at character {exc.pos}")

            def _answer(self, method, path, *body):
                try:
                    code, payload = method(path, *body)
                except ApiError as exc:
                    code, payload = exc.code, {"error": str(exc)}
                except UserError as exc:
                    code, payload = 400, {"error": str(exc)}
                if isinstance(payload, tuple):           # (bytes, content type): /metrics
                    data, ctype = payload
                else:
                    data, ctype = (json.dumps(payload) + "\n").encode(), "application/json"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    # --- routes (each returns (status, JSON-able payload) or raises) -----------------------------------------
    def get(self, path: str):
        if path == "/streams":
            return 200, self.server.list_streams()
        if path == "/healthz":
            ok, body = self.server.health()
            return (200 if ok else 503), body
        if path == "/metrics":
            if self.server.metrics is None:
                raise ApiError(404, "metrics are not available in this server")
            return 200, self.server.metrics.exposition()
        raise ApiError(404, f"no such path {path}; try /streams, /healthz, /metrics")

    def post(self, path: str, body):
        if isinstance(body, Exception):
            raise ApiError(400, str(body))
        if path == "/streams":
            cfg = stream_config(body, self.server.settings.defaults, "POST /streams")
            return 201, {cfg.id: self.server.add(cfg)}
        if path == "/model":
            if not isinstance(body, dict) or not isinstance(body.get("path"), str):
                raise ApiError(400, 'POST /model takes {"path": "MODEL_DIR"}')
            try:
                return 200, self.server.swap_model(body["path"])
            except UserError as exc:
                raise ApiError(409, f"model not swapped: {exc}") from None
        if path == "/reload":
            return 200, self.server.reload()
        raise ApiError(404, f"cannot POST {path}; try /streams, /model, /reload")

    def delete(self, path: str):
        prefix = "/streams/"
        if not path.startswith(prefix) or len(path) == len(prefix):
            raise ApiError(404, "DELETE /streams/<id>")
        sid = path[len(prefix):]
        try:
            return 200, self.server.remove(sid)
        except StreamsError as exc:
            raise ApiError(404, str(exc)) from None


class ApiError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
