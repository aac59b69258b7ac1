"""Bad input: property-based fuzzing (hypothesis) of the endpoint's and the balancer's HTTP surface.

Raw sockets carry random methods, paths, query strings, headers (broken ones too), bodies,
multipart envelopes, chunked framing, truncated and slow requests. Every complete request gets a
whole answer, 2xx or 4xx; an incomplete one gets an answer or a close, never a hang. Afterwards
every service is the same process as before (no crash hidden by the supervisor's restarts),
answers /healthz, and logged no internal error.

505 is accepted only for a request line that claims HTTP/2 or later: that answer is the protocol's
own ("HTTP Version Not Supported", RFC 9110 15.6.6), not a failure of the service.
"""

import collections
import os
import re
import socket
import time

import pytest
from hypothesis import HealthCheck, example, given, settings

import faultkit
import httpfuzz
from faultkit import report

pytestmark = pytest.mark.cluster

ENDPOINT_ROUTES = ["/", "/healthz", "/metrics", "/status", "/enqueue", "/pullCompleted", "/jobs/0123abcd",
                   "/jobs/", "/jobs/" + "f" * 32]
ENDPOINT_KEYS = ["iterations", "top"]
BALANCER_ROUTES = ["/healthz", "/metrics", "/status", "/completed", "/lease", "/heartbeat", "/jobs/abc",
                   "/jobs/abc/release", "/bundle", "/jobs/" + "f" * 32 + "/release"]
# No "wait": a lease long-polls up to `wait` seconds, a slow answer by design, not a hang.
BALANCER_KEYS = ["iterations", "top", "max"]
ENDPOINT_PLAUSIBLE = [("PUT", "/enqueue", {"iterations": (1, 2000)}), ("PUT", "/enqueue", {"iterations": (1, 2000)}),
                      ("POST", "/pullCompleted", {"top": (1, 1000)}), ("GET", "/jobs/<id>", {}),
                      ("GET", "/status", {}), ("GET", "/metrics", {}), ("GET", "/", {}), ("HEAD", "/healthz", {})]
BALANCER_PLAUSIBLE = [("PUT", "/jobs/<id>", {"iterations": (1, 2000)}), ("GET", "/jobs/<id>", {}),
                      ("GET", "/completed", {"top": (1, 1000)}), ("POST", "/lease", {"max": (1, 100)}),
                      ("POST", "/heartbeat", {}),
                      ("POST", "/jobs/<id>/release", {}), ("GET", "/status", {}), ("GET", "/bundle", {}),
                      ("GET", "/metrics", {})]
EXAMPLES = 500


def enqueue_form(content_type, body):
    head = (f"PUT /enqueue?iterations=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    return httpfuzz.FuzzRequest([head + body], True, "PUT", "/enqueue?iterations=1", "HTTP/1.1", 0.0)


# Inputs the fuzzing found once, checked on every run (each answered 500 before its fix).
ENDPOINT_REGRESSIONS = [
    enqueue_form("multipart/form-data; boundary=\xe9", b"--\xc3\xa9--\r\n"),  # a non-ASCII boundary
    enqueue_form("multipart/form-data; boundary*=utf-8''%E2%82%AC",  # RFC 2231, outside latin-1
                 "--\u20ac\r\nContent-Disposition: form-data; name=data\r\n\r\nx\r\n--\u20ac--\r\n".encode()),
]

FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with faultkit.fired(tmp_path_factory.mktemp("fuzz"), cluster_max_workers=1, cluster_max_iterations=2000,
                        cluster_max_body_bytes=4096, local_cluster_lease_seconds=5) as cluster:
        yield cluster


class Tally:
    """How many requests were fuzzed, and what came back."""

    def __init__(self):
        self.sent = 0
        self.statuses = collections.Counter()
        self.closed_without_answer = 0  # incomplete requests only
        self.slow = 0

    def __str__(self):
        return (f"{self.sent} requests ({self.slow} slow), statuses {dict(sorted(self.statuses.items()))}, "
                f"{self.closed_without_answer} incomplete ones closed without an answer")


def http_major(version):
    match = re.fullmatch(r"HTTP/(\d+)\.(\d+)", version)
    return int(match.group(1)) if match else None


def send(port, request, tally):
    """One fuzzed request; fails the example on a 5xx, a hang, or a complete request left unanswered."""
    tally.sent += 1
    tally.slow += request.delay > 0
    answers = faultkit.raw_exchange(port, request.pieces, timeout=15, delay=request.delay,
                                    half_close=not request.complete, head_request=request.head_request)
    if request.complete:
        assert answers, f"a complete request got no answer: {request.describe()}"
    else:
        tally.closed_without_answer += not answers
    for answer in answers:
        tally.statuses[answer.status] += 1
        protocol_505 = answer.status == 505 and (http_major(request.version) or 0) >= 2
        assert answer.status < 500 or protocol_505, f"{answer!r} for {request.describe()}"
        assert 200 <= answer.status < 500 or protocol_505, f"{answer!r} for {request.describe()}"


LOGS = ("balancer.log", "endpoint-0.log", "endpoint-1.log")


def internal_errors(cluster, before):
    """The internal_error events the services logged since the snapshot `before`."""
    errors = []
    for name in LOGS:
        with open(os.path.join(cluster.state_dir, "logs", name), "rb") as log:
            log.seek(before["log sizes"][name])
            errors += [line for line in log.read().decode("utf-8", "replace").splitlines()
                       if '"internal_error"' in line]
    return errors


def snapshot(cluster):
    """(pid, kernel start time) of every service (a restart changes it), and the logs' sizes."""
    pids = {"balancer": faultkit.balancer_pid(cluster),
            **{f"endpoint-{i}": faultkit.endpoint_pid(cluster, i) for i in range(2)}}
    state = {name: (pid, faultkit.process_start_time(pid)) for name, pid in pids.items()}
    state["log sizes"] = {name: os.path.getsize(os.path.join(cluster.state_dir, "logs", name)) for name in LOGS}
    return state


def check_still_fine(cluster, before):
    now = snapshot(cluster)
    assert {k: v for k, v in now.items() if k != "log sizes"} == \
        {k: v for k, v in before.items() if k != "log sizes"}, "a service crashed and the supervisor restarted it"
    cluster.wait_healthy(timeout=5)
    errors = internal_errors(cluster, before)
    assert not errors, f"{len(errors)} internal errors (500) logged, e.g. {errors[:3]}"


def test_fuzzing_the_endpoints_gets_2xx_or_4xx_and_never_a_hang(cluster):
    before = snapshot(cluster)
    tally = Tally()
    began = time.monotonic()

    @FUZZ_SETTINGS
    @given(request=httpfuzz.requests(ENDPOINT_ROUTES, ENDPOINT_KEYS, max_body=5000,
                                     plausible=ENDPOINT_PLAUSIBLE))
    @example(request=ENDPOINT_REGRESSIONS[0])
    @example(request=ENDPOINT_REGRESSIONS[1])
    def endpoint_survives(request):
        send(cluster.endpoints[tally.sent % 2], request, tally)

    try:
        endpoint_survives()
    finally:
        report("fuzzing the endpoints", requests_fuzzed=tally.sent, seconds=round(time.monotonic() - began, 1),
               detail=str(tally))
    check_still_fine(cluster, before)


def test_fuzzing_the_balancer_with_and_without_the_token_gets_2xx_or_4xx(cluster):
    before = snapshot(cluster)
    token = cluster.token
    auth_values = [f"Bearer {token}", f"Bearer {token}", f"bearer {token}", f"Bearer {token} ", f"Bearer  {token}",
                   f"Basic {token}", token, "Bearer", "Bearer ", "", f"Bearer {token[:-1]}", f"Bearer {token}x",
                   "Bearer " + "x" * 5000, "Bearer é", "Bearer \x00"]
    tally = Tally()
    began = time.monotonic()

    @FUZZ_SETTINGS
    @given(request=httpfuzz.requests(BALANCER_ROUTES, BALANCER_KEYS, auth_values=auth_values,
                                     max_body=5000, plausible=BALANCER_PLAUSIBLE))
    def balancer_survives(request):
        send(cluster.balancer_port, request, tally)

    try:
        balancer_survives()
    finally:
        report("fuzzing the balancer", requests_fuzzed=tally.sent, seconds=round(time.monotonic() - began, 1),
               detail=str(tally))
    check_still_fine(cluster, before)


def test_stalled_clients_do_not_block_anyone_else(cluster):
    """Fifty connections that send half a request and stall: /healthz still answers at once."""
    stalled = []
    latencies = []
    try:
        for n in range(50):
            port = (cluster.endpoints + [cluster.balancer_port])[n % 3]
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            stalled.append(sock)
            sock.sendall(b"PUT /enqueue?iterations=1 HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc" if n % 2
                         else b"GET /healthz HTTP/1.1\r\nHost: x")
        for n in range(60):
            port = (cluster.endpoints + [cluster.balancer_port])[n % 3]
            began = time.monotonic()
            answer = faultkit.request(port, "GET", "/healthz", timeout=5)
            latencies.append(time.monotonic() - began)
            assert answer.status == 200
    finally:
        for sock in stalled:
            sock.close()
    p99 = faultkit.percentile(latencies, 0.99)
    report("50 stalled clients", healthz_p99_ms=round(p99 * 1000, 1), healthz_max_ms=round(max(latencies) * 1000, 1))
    assert p99 < 0.1, latencies
