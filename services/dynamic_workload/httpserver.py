"""The HTTP/1.1 server every service is built on, tuned and hardened.

``http.server`` is correct but slow and chatty by default. This module fixes what matters:

- HTTP/1.1 keep-alive with a Content-Length on every answer, and a buffered ``wfile``
  (unbuffered, the headers and the body leave in two small writes and Nagle's algorithm
  stalls each keep-alive request by about 40 ms);
- a listen backlog of 1024, so bursts of clients are not dropped by the kernel;
- every answer, errors included, is JSON ``{"error": ...}`` unless a route says otherwise;
- a request body is read only when a route asks for it, after its size was checked, and
  ``Expect: 100-continue`` is answered only then: an oversized upload is refused with 413
  before a byte of it is sent;
- unknown routes answer 404, wrong methods 405 with ``Allow``, any method name included;
- a bug in a route answers 500 and is logged; it never drops the connection silently.
"""

import argparse
import http.server
import json
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse

from . import logs


class HttpError(Exception):
    """An answer other than success, raised anywhere in a route."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


_BUSY_BODY = b'{"error": "too many connections at once; retry shortly"}\n'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    # Each connection gets a thread; past this many at once a new connection is answered 503
    # at once instead, so that a flood of clients can't grow the process without bound.
    max_connections = 1000

    def __init__(self, address, handler_class, app):
        self.app = app
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__(address, handler_class)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1)
                request.sendall(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_bind(self):
        # Small answers must leave at once; the buffered wfile already batches each answer.
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()


class ByteBudget:
    """Bytes of request bodies held in memory at once, across all connections.

    A route reserves a body's size before reading it and gives it back when done; when the
    budget is spent the request is refused with 503 (retry shortly) instead of being read.
    """

    def __init__(self, limit):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, size):
        with self._lock:
            if self.used + size > self.limit and self.used > 0:
                return False
            self.used += size
            return True

    def release(self, size):
        with self._lock:
            self.used -= size


def route(pattern, **methods):
    """A route: a path regex and, per HTTP method, the name of the handler method."""
    return re.compile("^" + pattern + "$"), methods


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = -1
    # An idle keep-alive connection (or a client that stalls mid-request) is dropped after this.
    timeout = 60
    server_version = "dynamic-workload"
    sys_version = ""
    # Subclasses list their routes: [route("/path", GET="method_name"), ...]
    routes = []

    @property
    def app(self):
        return self.server.app

    # --- dispatch -------------------------------------------------------------------------

    def __getattr__(self, name):
        # BaseHTTPRequestHandler looks up do_<METHOD>; every method name goes through
        # dispatch so that an unknown one gets a 405 or 404, not a 501.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def handle_expect_100(self):
        # Answer "100 Continue" only when a route decides to read the body (see read_body).
        self._expects_continue = True
        return True

    def parse_request(self):
        self._reserved = []
        self._expects_continue = False
        self._body_consumed = False
        self._started = time.monotonic()
        return super().parse_request()

    def _dispatch(self):
        path, _, query_string = self.path.partition("?")
        self.route_path = path
        self.query = {k: v[0] for k, v in urllib.parse.parse_qs(query_string, keep_blank_values=True).items()}
        method = "GET" if self.command == "HEAD" else self.command
        status = 500
        try:
            self.check_access(method, path)
            for pattern, methods in self.routes:
                match = pattern.match(path)
                if match is None:
                    continue
                if method not in methods:
                    allow = ", ".join(sorted(methods))
                    raise HttpError(405, f"{self.command} is not allowed on {path}; use {allow}", {"Allow": allow})
                status = getattr(self, methods[method])(**match.groupdict())
                return
            raise HttpError(404, f"no route {path}; see the README for the API")
        except HttpError as error:
            status = error.status
            self.send_json(error.status, {"error": error.message}, error.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:
            answer = self.translate(error)
            if answer is not None:
                status = answer.status
                self.send_json(answer.status, {"error": answer.message}, answer.headers)
                return
            # A bug: answer it, log it, keep serving.
            logs.event("internal_error", path=path, method=self.command, error=repr(error))
            try:
                self.send_json(500, {"error": "internal error; it has been logged"})
            except OSError:
                self.close_connection = True
        finally:
            for budget, size in self._reserved:
                budget.release(size)
            self._reserved = []
            self.observe(method, status, time.monotonic() - self._started)

    def translate(self, error):
        """Hook: the HttpError to answer for an expected exception of the service, or None."""
        return None

    def check_access(self, method, path):
        """Hook run before routing; raise HttpError to refuse the request (e.g. 401)."""

    def observe(self, method, status, seconds):
        """Hook for request metrics; subclasses may record the request here."""

    # --- request bodies -------------------------------------------------------------------

    def declared_length(self):
        """The body size the client announced: an int, or None for a chunked body."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        if not raw.strip().isdigit():
            raise HttpError(400, f"Content-Length {raw!r} is not a size in bytes")
        return int(raw)

    def read_body(self, limit, budget=None):
        """Read the whole body, refusing with 413 (before reading) when it exceeds `limit`.

        With a ByteBudget, the body's size is reserved first (503 when it is spent) and
        given back when the request is done.
        """
        length = self.declared_length()
        if length is not None and length > limit:
            raise HttpError(413, f"body of {length} bytes is above the limit of {limit} bytes")
        if budget is not None:
            reserved = limit if length is None else length
            if not budget.reserve(reserved):
                raise HttpError(503, "too many uploads in progress; retry shortly", {"Retry-After": "1"})
            self._reserved.append((budget, reserved))
        if self._expects_continue:
            self.send_response_only(100)
            self.end_headers()
            self.wfile.flush()
            self._expects_continue = False
        if length is None:
            body = self._read_chunked(limit)
        else:
            body = self.rfile.read(length)
            if len(body) < length:
                self.close_connection = True
                raise HttpError(400, f"body ended after {len(body)} of {length} bytes")
        self._body_consumed = True
        return body

    def _read_chunked(self, limit):
        parts, size = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                chunk_size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise HttpError(400, "malformed chunked body") from None
            if chunk_size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            size += chunk_size
            if size > limit:
                self.close_connection = True
                raise HttpError(413, f"body above the limit of {limit} bytes")
            chunk = self.rfile.read(chunk_size)
            if len(chunk) < chunk_size:
                self.close_connection = True
                raise HttpError(400, "chunked body ended early")
            parts.append(chunk)
            self.rfile.readline(1024)

    def _body_pending(self):
        if self._body_consumed:
            return False
        try:
            length = self.declared_length()
        except HttpError:
            return True
        return length is None or length > 0

    # --- answers --------------------------------------------------------------------------

    def send_json(self, status, payload, headers=None):
        self.send_body(status, json.dumps(payload).encode() + b"\n", "application/json", headers)
        return status

    def send_body(self, status, body, content_type, headers=None):
        if self._body_pending():
            # The client's body was not read: the connection can't carry another request.
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()
        return status

    def send_error(self, code, message=None, explain=None):
        # Called by http.server for malformed requests: answer JSON like everything else.
        if code == 505:
            # An HTTP/2 request line is bad input here, not a server failure: 400, not 5xx.
            code, message = 400, f"{message}; send HTTP/1.1"
        self.close_connection = True
        if not hasattr(self, "_body_consumed"):
            self._body_consumed = True
        if self.request_version == "HTTP/0.9":
            # The request line was unreadable, so its version is unknown; an HTTP/0.9 answer
            # would be a bare body with no status line. Answer as HTTP/1.0 instead.
            self.request_version = "HTTP/1.0"
        body = json.dumps({"error": message or explain or http.server.BaseHTTPRequestHandler.responses.get(code, ("error",))[0]}).encode() + b"\n"
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            pass

    def log_message(self, format, *args):
        logs.detail("http", client=self.client_address[0], message=format % args)

    def log_request(self, code="-", size="-"):
        pass  # request metrics replace access logs; see observe()


def serve(app, handler_class, host, port):
    """Create the server, bound and listening; the caller runs serve_forever()."""
    # Threads take turns with the GIL every millisecond rather than every 5: under load a
    # quick request (a health check) then waits for a busy one far less.
    sys.setswitchinterval(0.001)
    return Server((host, port), handler_class, app)


def service_arguments(prog, description, default_port):
    """The command line every HTTP service takes: --host, --port, -v."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every job's steps")
    return parser


def stop_on_signals():
    """An Event that SIGTERM and SIGINT set (the handlers do nothing else)."""
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    return stopping


def serve_until(server, stopping):
    """Serve on a background thread until `stopping` is set; then stop accepting and close."""
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    while not stopping.wait(1.0):
        pass
    server.shutdown()
    server.server_close()


def parse_int(raw, name, low, high, default=None):
    """Parse a query parameter as an int in [low, high], or raise a 400 that says why."""
    if raw is None:
        if default is not None:
            return default
        raise HttpError(400, f"{name} is missing; give an integer from {low} to {high}")
    text = raw.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise HttpError(400, f"{name}={raw!r} is not an integer; give one from {low} to {high}")
    # Bounded before int(): a thousand-digit number is just out of range, not an error.
    value = int(text) if len(text.lstrip("+-0")) <= 19 else high + 1
    if not low <= value <= high:
        raise HttpError(400, f"{name}={value} is out of range; give an integer from {low} to {high}")
    return value
