"""A small keep-alive HTTP client for reaching the balancer (used by endpoints and workers).

Connections are pooled and reused, so a request costs one round trip, not a TCP handshake.
A request that fails on a reused connection (the balancer closed it while idle, or
restarted) is retried once on a fresh one; every balancer route is safe to repeat.
"""

import json
import queue
import socket
import urllib.parse

MAX_LINE = 65536
MAX_HEADERS = 100


class BalancerUnreachable(Exception):
    """No answer from the balancer: refused, reset or timed out."""


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)


class Connection:
    """One keep-alive connection speaking the plain HTTP/1.1 the balancer speaks.

    Every request goes out in one write with a Content-Length, and every answer of the
    balancer has one: that is all this needs to parse, so it skips ``http.client`` and the
    ``email`` package's header parser, which cost more CPU than the rest of a request.
    """

    def __init__(self, host, port, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def exchange(self, request, timeout):
        """Send a whole request; returns (status, headers, body, will_close)."""
        self.sock.settimeout(timeout)
        self.sock.sendall(request)
        status_line = self.reader.readline(MAX_LINE)
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ConnectionError(f"no HTTP answer ({status_line[:40]!r})")
        status = int(parts[1])
        headers = {}
        for _ in range(MAX_HEADERS):
            line = self.reader.readline(MAX_LINE)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().title()] = value.strip()
        length = headers.get("Content-Length")
        if length is None:
            return status, headers, self.reader.read(), True
        body = self.reader.read(int(length))
        if len(body) < int(length):
            raise ConnectionError("the answer ended early")
        return status, headers, body, headers.get("Connection", "").lower() == "close"

    def close(self):
        self.reader.close()
        self.sock.close()


class BalancerClient:
    def __init__(self, base_url, token, timeout=30.0, pool_size=64):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"balancer URL {base_url!r} must look like http://HOST:PORT")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.token = token
        self.timeout = timeout
        self._idle = queue.LifoQueue(maxsize=pool_size)

    def _take(self, timeout):
        try:
            return self._idle.get_nowait(), True
        except queue.Empty:
            return Connection(self.host, self.port, timeout), False

    def _give_back(self, conn):
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            conn.close()

    def request(self, method, path, body=None, headers=None, timeout=None):
        """Send a request; returns a Response or raises BalancerUnreachable."""
        extra = dict(headers or {})
        if body is None:
            body = b""
        elif not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
            extra["Content-Type"] = "application/json"
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Authorization: Bearer {self.token}\r\nContent-Length: {len(body)}\r\n"
                + "".join(f"{name}: {value}\r\n" for name, value in extra.items()) + "\r\n")
        request = head.encode("latin-1") + body
        timeout = timeout or self.timeout
        for _ in range(2):
            conn, reused = None, False
            try:
                conn, reused = self._take(timeout)
                status, answer_headers, data, will_close = conn.exchange(request, timeout)
            except (OSError, ValueError) as error:
                if conn is not None:
                    conn.close()
                if reused:
                    # Stale keep-alive connections (the balancer restarted?): drop all the
                    # idle ones and try once more on a fresh connection.
                    self.close()
                    continue
                raise BalancerUnreachable(f"{self.host}:{self.port}: {error or type(error).__name__}") from None
            if will_close:
                conn.close()
            else:
                self._give_back(conn)
            return Response(status, answer_headers, data)
        raise BalancerUnreachable(f"{self.host}:{self.port}: connection lost twice")

    def close(self):
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
