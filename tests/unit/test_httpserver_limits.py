"""The HTTP layer's bounds under load: connections at once, and request bytes held in memory."""

import http.client
import json
import socket
import threading

import pytest

import unit_support  # noqa: F401  (services/ on sys.path)
from dynamic_workload import httpserver
from dynamic_workload.httpserver import ByteBudget, route


def test_a_byte_budget_refuses_past_its_limit_but_always_admits_one():
    budget = ByteBudget(100)
    assert budget.reserve(60) and budget.reserve(40)
    assert not budget.reserve(1)
    budget.release(60)
    assert budget.reserve(50) and not budget.reserve(20)
    budget.release(40)
    budget.release(50)
    assert budget.reserve(1000)  # alone, even a body larger than the budget is admitted


class Held(httpserver.Handler):
    routes = [route("/upload", PUT="upload"), route("/hold", GET="hold")]

    def upload(self):
        body = self.read_body(1000, self.app["budget"])
        self.app["inside"].set()
        self.app["release"].wait(10)
        return self.send_json(200, {"size": len(body)})

    def hold(self):
        with self.app["lock"]:
            self.app["holding"] += 1
        self.app["inside"].set()
        self.app["release"].wait(10)
        return self.send_json(200, {"ok": True})


@pytest.fixture
def server():
    app = {"budget": ByteBudget(100), "inside": threading.Event(), "release": threading.Event(),
           "holding": 0, "lock": threading.Lock()}

    class Small(httpserver.Server):
        max_connections = 2

    server = Small(("127.0.0.1", 0), Held, app)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    app["release"].set()
    server.shutdown()
    server.server_close()
    thread.join(10)


def ask(port, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body)
        answer = conn.getresponse()
        return answer.status, dict(answer.getheaders()), json.loads(answer.read())
    finally:
        conn.close()


def test_uploads_past_the_byte_budget_get_503_and_the_budget_comes_back(server):
    port = server.server_address[1]
    first = []
    holder = threading.Thread(target=lambda: first.append(ask(port, "PUT", "/upload", b"x" * 80)))
    holder.start()
    assert server.app["inside"].wait(10)
    status, headers, body = ask(port, "PUT", "/upload", b"y" * 30)
    assert status == 503 and headers["Retry-After"] == "1" and "uploads" in body["error"]
    server.app["release"].set()
    holder.join(10)
    assert first[0][0] == 200
    assert server.app["budget"].used == 0
    assert ask(port, "PUT", "/upload", b"z" * 90)[0] == 200


def test_connections_past_the_limit_are_answered_503_at_once(server):
    port = server.server_address[1]
    holders = [threading.Thread(target=ask, args=(port, "GET", "/hold")) for _ in range(2)]
    for holder in holders:
        holder.start()
    unit_support.wait_until(lambda: server.app["holding"] == 2, 10, message="both slots taken")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as third:
        answer = b""
        while chunk := third.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
    assert json.loads(body)["error"]
    server.app["release"].set()
    for holder in holders:
        holder.join(10)
