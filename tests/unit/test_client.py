"""The keep-alive client endpoints and workers use to reach the balancer."""

import json
import socket
import threading

import pytest

import unit_support  # noqa: F401  (services/ on sys.path)
from dynamic_workload import httpserver
from dynamic_workload.client import BalancerClient, BalancerUnreachable
from dynamic_workload.httpserver import route


class App:
    def __init__(self):
        self.connections = 0
        self.seen = []
        self.lock = threading.Lock()


class EchoHandler(httpserver.Handler):
    routes = [route("/echo", POST="echo"), route("/closing", GET="closing")]

    def setup(self):
        super().setup()
        with self.app.lock:
            self.app.connections += 1

    def echo(self):
        body = self.read_body(1 << 20)
        self.app.seen.append((self.headers.get("Authorization"), self.headers.get("Content-Type"), body))
        return self.send_json(200, {"size": len(body)})

    def closing(self):
        # Answers as if keeping the connection, then drops it: what a balancer restart looks like.
        status = self.send_json(200, {"ok": True})
        self.close_connection = True
        return status


@pytest.fixture
def server():
    srv = httpserver.serve(App(), EchoHandler, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


@pytest.fixture
def client(server):
    client = BalancerClient(f"http://127.0.0.1:{server.server_address[1]}", "s3cret", timeout=10)
    yield client
    client.close()


def test_requests_carry_the_token_and_json_bodies(client, server):
    answer = client.request("POST", "/echo", {"result": "ab"})
    assert answer.status == 200 and answer.json() == {"size": len(json.dumps({"result": "ab"}))}
    answer = client.request("POST", "/echo", b"\x00raw\xff")
    assert answer.json() == {"size": 5}
    assert server.app.seen[0] == ("Bearer s3cret", "application/json", json.dumps({"result": "ab"}).encode())
    assert server.app.seen[1][0] == "Bearer s3cret" and server.app.seen[1][2] == b"\x00raw\xff"


def test_connections_are_reused(client, server):
    for _ in range(5):
        assert client.request("POST", "/echo", b"x").status == 200
    assert server.app.connections == 1


def test_a_connection_dropped_while_idle_is_retried_on_a_fresh_one(client, server):
    assert client.request("GET", "/closing").status == 200
    answer = client.request("POST", "/echo", b"after the drop")
    assert answer.status == 200 and answer.json() == {"size": 14}
    assert server.app.connections == 2


def test_an_unreachable_balancer_raises_balancer_unreachable():
    with socket.socket() as hole:  # bound, never listening: connections are refused
        hole.bind(("127.0.0.1", 0))
        port = hole.getsockname()[1]
        client = BalancerClient(f"http://127.0.0.1:{port}", "t", timeout=5)
        with pytest.raises(BalancerUnreachable, match=f"127.0.0.1:{port}"):
            client.request("GET", "/status")


@pytest.mark.parametrize("url", ["127.0.0.1:5100", "https://127.0.0.1:5100", "http://", "ftp://host"])
def test_a_malformed_balancer_url_is_refused_at_once(url):
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        BalancerClient(url, "t")
