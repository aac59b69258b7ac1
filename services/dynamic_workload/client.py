"""A small keep-alive HTTP client for reaching the balancer (used by endpoints and workers).

Connections are pooled and reused, so a request costs one round trip, not a TCP handshake.
A request that fails on a reused connection (the balancer closed it while idle, or
restarted) is retried once on a fresh one; every balancer route is safe to repeat.
"""

import http.client
import json
import queue
import urllib.parse


class BalancerUnreachable(Exception):
    """No answer from the balancer: refused, reset or timed out."""


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)


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

    def _take(self):
        try:
            return self._idle.get_nowait(), True
        except queue.Empty:
            return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout), False

    def _give_back(self, conn):
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            conn.close()

    def request(self, method, path, body=None, headers=None, timeout=None):
        """Send a request; returns a Response or raises BalancerUnreachable."""
        all_headers = {"Authorization": f"Bearer {self.token}"}
        all_headers.update(headers or {})
        if body is not None and not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        for _ in range(2):
            conn, reused = self._take()
            conn.timeout = timeout or self.timeout
            if conn.sock is not None:
                conn.sock.settimeout(conn.timeout)
            try:
                conn.request(method, path, body=body, headers=all_headers)
                answer = conn.getresponse()
                data = answer.read()
            except (OSError, http.client.HTTPException) as error:
                conn.close()
                if reused:
                    # Stale keep-alive connections (the balancer restarted?): drop all the
                    # idle ones and try once more on a fresh connection.
                    self.close()
                    continue
                raise BalancerUnreachable(f"{self.host}:{self.port}: {error or type(error).__name__}") from None
            if answer.will_close:
                conn.close()
            else:
                self._give_back(conn)
            return Response(answer.status, answer.headers, data)
        raise BalancerUnreachable(f"{self.host}:{self.port}: connection lost twice")

    def close(self):
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
