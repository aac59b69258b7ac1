"""The HTTP/1.1 server every service is built on, exercised through a real server on 127.0.0.1."""

import http.client
import json
import socket
import threading

import pytest

import unit_support  # noqa: F401  (services/ on sys.path)
from dynamic_workload import httpserver
from dynamic_workload.httpserver import HttpError, parse_int, route

LIMIT = 64


class App:
    def __init__(self):
        self.bodies = []


class ItemHandler(httpserver.Handler):
    routes = [
        route("/items/(?P<name>[a-z0-9]+)", GET="get_item", PUT="put_item"),
        route("/count", GET="count"),
        route("/boom", GET="boom"),
    ]

    def get_item(self, name):
        return self.send_json(200, {"name": name})

    def put_item(self, name):
        body = self.read_body(LIMIT)
        self.app.bodies.append(body)
        return self.send_json(201, {"name": name, "size": len(body)})

    def count(self):
        return self.send_json(200, {"n": parse_int(self.query.get("n"), "n", 1, 1000)})

    def boom(self):
        raise ZeroDivisionError("a bug in a route")


@pytest.fixture
def server():
    app = App()
    srv = httpserver.serve(app, ItemHandler, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.fixture
def port(server):
    return server.server_address[1]


@pytest.fixture
def connection(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    yield conn
    conn.close()


@pytest.fixture
def raw(port):
    """Raw sockets to the server, for requests http.client refuses to send; all closed at the end."""
    sockets = []

    def connect():
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sockets.append(sock)
        return sock

    yield connect
    for sock in sockets:
        sock.close()


def ask(conn, method, path, body=None, headers=None, encode_chunked=False):
    conn.request(method, path, body=body, headers=headers or {}, encode_chunked=encode_chunked)
    answer = conn.getresponse()
    return answer, answer.read()


def read_response(reader):
    """One response from a socket file: (status line, lower-cased headers, body)."""
    status_line = reader.readline()
    headers = {}
    while True:
        line = reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers["content-length"])) if "content-length" in headers else b""
    return status_line, headers, body


def assert_json_error(answer, body, status):
    assert answer.status == status
    assert answer.getheader("Content-Type") == "application/json"
    assert answer.getheader("Content-Length") == str(len(body))
    assert isinstance(json.loads(body)["error"], str) and json.loads(body)["error"]


# --- routing -------------------------------------------------------------------------------


def test_a_route_answers_json(connection):
    answer, body = ask(connection, "GET", "/items/abc")
    assert answer.status == 200
    assert json.loads(body) == {"name": "abc"}
    assert answer.getheader("Content-Type") == "application/json"


def test_an_unknown_route_is_a_json_404(connection):
    for path in ("/nowhere", "/items/", "/items/abc/more", "/items/ABC"):
        answer, body = ask(connection, "GET", path)
        assert_json_error(answer, body, 404)


@pytest.mark.parametrize("method", ["POST", "DELETE", "PATCH"])
def test_a_wrong_method_is_a_405_with_allow(connection, method):
    answer, body = ask(connection, method, "/items/abc")
    assert_json_error(answer, body, 405)
    assert answer.getheader("Allow") == "GET, PUT"
    answer, body = ask(connection, "PUT", "/count", body=b"")
    assert_json_error(answer, body, 405)
    assert answer.getheader("Allow") == "GET"


def test_an_invented_method_gets_405_or_404_never_501(connection):
    answer, body = ask(connection, "FOO", "/items/abc")
    assert_json_error(answer, body, 405)
    assert answer.getheader("Allow") == "GET, PUT"
    answer, body = ask(connection, "FOO", "/nowhere")
    assert_json_error(answer, body, 404)


def test_head_answers_like_get_without_a_body(connection):
    answer, body = ask(connection, "HEAD", "/items/abc")
    assert answer.status == 200
    assert body == b""
    assert int(answer.getheader("Content-Length")) == len(json.dumps({"name": "abc"}).encode()) + 1
    answer, body = ask(connection, "GET", "/items/abc")  # the connection is still in step
    assert json.loads(body) == {"name": "abc"}


def test_a_bug_in_a_route_is_a_json_500_and_the_connection_survives(connection):
    answer, body = ask(connection, "GET", "/boom")
    assert_json_error(answer, body, 500)
    assert "a bug in a route" not in body.decode()  # the details go to the log, not the client
    answer, body = ask(connection, "GET", "/items/ok")
    assert answer.status == 200


# --- malformed requests --------------------------------------------------------------------


@pytest.mark.parametrize("line, status", [
    (b"this is not http", 400), (b"GARBAGE", 400), (b"GET /items/abc HTTP/1.1 extra", 400),
    (b"GET /items/abc HTTP/9.9", 400),  # an HTTP/2+ request line is bad input: never a 5xx
])
def test_a_malformed_request_line_gets_a_json_error_with_a_status_line(raw, line, status):
    sock = raw()
    sock.sendall(line + b"\r\nHost: x\r\n\r\n")
    status_line, headers, body = read_response(sock.makefile("rb"))
    assert status_line.startswith(b"HTTP/1.1 %d " % status), status_line
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body)["error"]


def test_a_request_line_too_long_gets_a_json_414(raw):
    sock = raw()
    sock.sendall(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status_line, headers, body = read_response(sock.makefile("rb"))
    assert status_line.startswith(b"HTTP/1.1 414 ")
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body)["error"]


def test_a_malformed_content_length_is_a_json_400(raw):
    sock = raw()
    sock.sendall(b"PUT /items/abc HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n")
    status_line, headers, body = read_response(sock.makefile("rb"))
    assert status_line.startswith(b"HTTP/1.1 400 ")
    assert "Content-Length" in json.loads(body)["error"]
    assert headers["connection"] == "close"


def test_a_body_shorter_than_announced_is_a_json_400(raw, server):
    sock = raw()
    sock.sendall(b"PUT /items/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    sock.shutdown(socket.SHUT_WR)
    status_line, _, body = read_response(sock.makefile("rb"))
    assert status_line.startswith(b"HTTP/1.1 400 ")
    assert "3 of 10" in json.loads(body)["error"]
    assert server.app.bodies == []


# --- bodies --------------------------------------------------------------------------------


def test_a_body_within_the_limit_is_read(connection, server):
    answer, body = ask(connection, "PUT", "/items/abc", body=b"x" * LIMIT)
    assert answer.status == 201
    assert json.loads(body) == {"name": "abc", "size": LIMIT}
    assert server.app.bodies == [b"x" * LIMIT]


def test_a_body_over_the_limit_is_refused_with_413(connection, server):
    answer, body = ask(connection, "PUT", "/items/abc", body=b"x" * (LIMIT + 1))
    assert_json_error(answer, body, 413)
    assert str(LIMIT) in json.loads(body)["error"]
    assert server.app.bodies == []


@pytest.mark.parametrize("path, status", [("/items/big", 413), ("/nowhere", 404), ("/count", 405)])
def test_a_refusal_is_answered_before_the_body_is_sent_when_the_client_expects_100_continue(
        raw, server, path, status):
    sock = raw()
    sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n".encode()
                 + b"Expect: 100-continue\r\n\r\n")
    # Read everything the server sends until it closes; the body is never sent.
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    assert received.startswith(f"HTTP/1.1 {status} ".encode()), received[:100]
    assert b" 100 " not in received.split(b"\r\n", 1)[0]
    assert b"100 Continue" not in received
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body)["error"]
    assert server.app.bodies == []


def test_100_continue_is_sent_when_the_route_reads_the_body(raw, server):
    sock = raw()
    reader = sock.makefile("rb")
    sock.sendall(b"PUT /items/small HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert reader.readline() == b"HTTP/1.1 100 Continue\r\n"
    assert reader.readline() == b"\r\n"
    sock.sendall(b"hello")
    status_line, _, body = read_response(reader)
    assert status_line.startswith(b"HTTP/1.1 201 ")
    assert json.loads(body)["size"] == 5
    assert server.app.bodies == [b"hello"]


def test_a_chunked_body_is_read_and_bounded(connection, server):
    answer, body = ask(connection, "PUT", "/items/chunked", body=iter([b"abc", b"", b"defg"]),
                       headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
    assert answer.status == 201 and json.loads(body)["size"] == 7
    assert server.app.bodies == [b"abcdefg"]
    answer, body = ask(connection, "PUT", "/items/chunked", body=iter([b"x" * 40, b"y" * 40]),
                       headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
    assert_json_error(answer, body, 413)
    assert server.app.bodies == [b"abcdefg"]


# --- connections ---------------------------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection(connection):
    answer, body = ask(connection, "GET", "/items/one")
    assert answer.status == 200 and json.loads(body) == {"name": "one"}
    first_socket = connection.sock
    assert first_socket is not None and answer.getheader("Connection") != "close"
    answer, body = ask(connection, "PUT", "/items/two", body=b"payload")
    assert answer.status == 201
    answer, body = ask(connection, "GET", "/nowhere")  # an error answer keeps the connection too
    assert answer.status == 404
    answer, body = ask(connection, "GET", "/items/three")
    assert answer.status == 200 and json.loads(body) == {"name": "three"}
    assert connection.sock is first_socket


def test_every_answer_has_a_content_length(connection):
    requests = [
        ("GET", "/items/a", None), ("PUT", "/items/b", b"body"), ("GET", "/nowhere", None),
        ("POST", "/items/a", None), ("GET", "/count?n=x", None), ("GET", "/count?n=5", None),
        ("GET", "/boom", None), ("PUT", "/items/c", b"z" * (LIMIT + 1)), ("FOO", "/count", None),
    ]
    statuses = []
    for method, path, body in requests:
        answer, received = ask(connection, method, path, body=body)
        statuses.append(answer.status)
        assert answer.getheader("Content-Length") == str(len(received)), (method, path)
    assert statuses == [200, 201, 404, 405, 400, 200, 500, 413, 405]


# --- parse_int -----------------------------------------------------------------------------


def test_query_integers_through_the_server(connection):
    answer, body = ask(connection, "GET", "/count?n=12")
    assert json.loads(body) == {"n": 12}
    for query in ("", "?n=", "?n=abc", "?n=0", "?n=1001", "?n=" + "9" * 5000):
        answer, body = ask(connection, "GET", "/count" + query)
        assert_json_error(answer, body, 400)
        assert "n" in json.loads(body)["error"]


@pytest.mark.parametrize("raw_value, expected", [
    ("1", 1), ("1000", 1000), ("+7", 7), (" 12 ", 12), ("000000000000000000000000042", 42),
])
def test_parse_int_accepts_integers_in_range(raw_value, expected):
    assert parse_int(raw_value, "iterations", 1, 1000) == expected


def test_parse_int_uses_the_default_only_when_missing():
    assert parse_int(None, "top", 1, 1000, default=10) == 10
    with pytest.raises(HttpError):
        parse_int("", "top", 1, 1000, default=10)


def test_parse_int_missing_names_the_parameter_and_range():
    with pytest.raises(HttpError) as caught:
        parse_int(None, "iterations", 1, 100_000_000)
    assert caught.value.status == 400
    assert "iterations" in caught.value.message and "missing" in caught.value.message
    assert "1" in caught.value.message and "100000000" in caught.value.message


@pytest.mark.parametrize("raw_value", ["", " ", "abc", "1.5", "1e3", "0x10", "12abc", "--1", "1 2", "½", "٣", "１２"])
def test_parse_int_refuses_non_integers(raw_value):
    with pytest.raises(HttpError) as caught:
        parse_int(raw_value, "iterations", 1, 1000)
    assert caught.value.status == 400
    assert "not an integer" in caught.value.message and "iterations" in caught.value.message


@pytest.mark.parametrize("raw_value", ["0", "-1", "1001", "-0", "99999999999999999999", "9" * 5000,
                                       "-" + "9" * 5000, "+" + "0" * 30 + "1001"])
def test_parse_int_refuses_out_of_range_and_huge_values(raw_value):
    with pytest.raises(HttpError) as caught:
        parse_int(raw_value, "top", 1, 1000)
    assert caught.value.status == 400
    assert "out of range" in caught.value.message and "top" in caught.value.message
    assert len(caught.value.message) < 200  # a huge value is not echoed back whole
