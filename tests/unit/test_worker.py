"""The worker's loop against a scripted balancer client: no network, no real sleeping."""

import base64
import json
import re
import threading

from unit_support import FakeClock
from dynamic_workload.client import BalancerUnreachable, Response
from dynamic_workload.work import work
from dynamic_workload.worker import Stop, Worker


def answer(status, payload):
    return Response(status, {"Content-Type": "application/json"}, json.dumps(payload).encode())


class ScriptedClient:
    """Stands in for BalancerClient: `handle(method, path, body)` decides each answer."""

    def __init__(self, handle):
        self.handle = handle
        self.requests = []
        self.lock = threading.Lock()

    def request(self, method, path, body=None, headers=None, timeout=None):
        with self.lock:
            self.requests.append((method, path, body, dict(headers or {})))
        outcome = self.handle(method, path, body)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def paths(self, prefix=""):
        with self.lock:
            return [path for _, path, _, _ in self.requests if path.startswith(prefix)]


class NoSleep:
    """Records the delays a worker asked to sleep, without sleeping."""

    def __init__(self, clock=None):
        self.delays = []
        self.clock = clock

    def __call__(self, seconds):
        self.delays.append(seconds)
        if self.clock is not None:
            self.clock.advance(seconds)


def make_worker(handle, idle_timeout=30.0, clock=None):
    clock = clock or FakeClock(0.0)
    sleep = NoSleep(clock)
    client = ScriptedClient(handle)
    return Worker(client, "worker-1", idle_timeout, clock=clock, sleep=sleep), client, sleep, clock


def job(job_id, data, iterations):
    return {"id": job_id, "iterations": iterations, "attempt": 1, "data": base64.b64encode(data).decode()}


# --- Stop ----------------------------------------------------------------------------------


def test_stop_is_warm_after_one_request_and_cold_after_two():
    stop = Stop()
    assert (stop.warm, stop.cold) == (False, False)
    stop.request(15, None)  # called as a signal handler: (signum, frame)
    assert (stop.warm, stop.cold) == (True, False)
    stop.request()
    assert (stop.warm, stop.cold) == (True, True)
    stop.request()
    assert (stop.warm, stop.cold) == (True, True)


# --- call: retries with backoff ------------------------------------------------------------


def failing_then(outcomes):
    """A handler that gives the scripted outcomes in order, then 200s."""
    remaining = list(outcomes)

    def handle(method, path, body):
        return remaining.pop(0) if remaining else answer(200, {"ok": True})

    return handle


def test_call_retries_through_an_unreachable_balancer_with_growing_delays():
    down = BalancerUnreachable("127.0.0.1:5100: Connection refused")
    worker, client, sleep, _ = make_worker(failing_then([down] * 4))
    result = worker.call("POST", "/lease?wait=1", b"")
    assert result.status == 200 and result.json() == {"ok": True}
    assert len(client.requests) == 5
    assert all(headers["X-Worker-Id"] == "worker-1" for _, _, _, headers in client.requests)
    assert len(sleep.delays) == 4
    for delay, base in zip(sleep.delays, [0.1, 0.2, 0.4, 0.8]):
        assert base * 0.5 <= delay <= base  # exponential, with jitter


def test_call_backoff_is_capped_at_five_seconds():
    down = BalancerUnreachable("refused")
    worker, _, sleep, _ = make_worker(failing_then([down] * 12))
    assert worker.call("GET", "/status").status == 200
    assert len(sleep.delays) == 12
    assert max(sleep.delays) <= 5.0
    assert all(2.5 <= delay <= 5.0 for delay in sleep.delays[-4:])


def test_call_retries_busy_and_failing_answers_but_returns_client_errors():
    worker, client, sleep, _ = make_worker(failing_then([
        answer(503, {"error": "restarting"}), answer(429, {"error": "full"}), answer(500, {"error": "bug"})]))
    assert worker.call("POST", "/lease", b"").status == 200
    assert len(client.requests) == 4 and len(sleep.delays) == 3
    for status in (400, 401, 404):
        worker, client, sleep, _ = make_worker(failing_then([answer(status, {"error": "no"})]))
        assert worker.call("POST", "/jobs/x/result", {"result": "0"}).status == status
        assert len(client.requests) == 1 and sleep.delays == []


def test_call_gives_up_when_told_to():
    worker, client, sleep, _ = make_worker(failing_then([BalancerUnreachable("refused")] * 100))
    assert worker.call("POST", "/lease", b"", give_up=lambda: True) is None
    assert len(client.requests) == 1 and sleep.delays == []


# --- run: the loop -------------------------------------------------------------------------


class FakeBalancer:
    """Answers a worker's requests like the balancer does, with a fake clock for long polls."""

    def __init__(self, clock, jobs=(), keep_leases=0, lease_seconds=30.0):
        self.clock = clock
        self.jobs = list(jobs)
        self.keep_leases = keep_leases
        self.lease_seconds = lease_seconds
        self.results = {}
        self.released = []
        self.leases = 0
        self.result_failures = 0  # leases carrying results that fail, as if the balancer were away
        self.on_heartbeat = None

    def __call__(self, method, path, body):
        if path.startswith("/lease"):
            results = body.get("results", []) if isinstance(body, dict) else []
            if results and self.result_failures:
                self.result_failures -= 1
                return BalancerUnreachable("127.0.0.1:5100: Connection refused")
            self.leases += 1
            for item in results:
                self.results.setdefault(item["id"], []).append(item)
            keep = self.leases <= self.keep_leases
            lease = {"keep": keep, "lease_seconds": self.lease_seconds, "recorded": [True] * len(results)}
            if "max=0" in path:
                return answer(200, dict(lease, jobs=[]))
            if self.jobs:
                return answer(200, dict(lease, jobs=[self.jobs.pop(0)]))
            wait = int(re.search(r"wait=(\d+)", path).group(1))
            self.clock.advance(wait)  # a long poll that found nothing
            return answer(200, dict(lease, jobs=[]))
        if path == "/heartbeat":
            if self.on_heartbeat:
                self.on_heartbeat()
            return answer(200, {"held": body["jobs"]})
        job_id, action = re.fullmatch(r"/jobs/([^/]+)/(release)", path).groups()
        self.released.append(job_id)
        return answer(200, {"released": True})


def test_a_worker_computes_its_jobs_posts_the_results_and_ends_when_idle():
    clock = FakeClock(0.0)
    data = bytes(range(256)) + b"\r\n--x--\r\n"
    balancer = FakeBalancer(clock, jobs=[job("a", data, 3), job("b", b"second", 1)])
    worker, client, _, _ = make_worker(balancer, idle_timeout=30.0, clock=clock)
    assert worker.run() == 0
    assert [body["result"] for body in balancer.results["a"]] == [work(data, 3).hex()]
    assert [body["result"] for body in balancer.results["b"]] == [work(b"second", 1).hex()]
    assert all(body["duration"] >= 0 for bodies in balancer.results.values() for body in bodies)
    assert worker.jobs_done == 2
    assert clock() >= 30.0  # it waited out its idle timeout before ending
    assert clock() <= 30.0 + 10  # ... and not much longer (one poll)
    assert balancer.released == []


def test_a_worker_the_balancer_needs_stays_past_its_idle_timeout():
    clock = FakeClock(0.0)
    balancer = FakeBalancer(clock, keep_leases=5)
    worker, _, _, _ = make_worker(balancer, idle_timeout=10.0, clock=clock)
    assert worker.run() == 0
    # Five long polls of 10 s answered "keep", then idle for 10 s more.
    assert clock() >= 60.0
    assert balancer.leases >= 6


def test_a_worker_refused_by_the_balancer_exits_with_2():
    worker, client, _, _ = make_worker(lambda method, path, body: answer(401, {"error": "token"}))
    assert worker.run() == 2
    assert len(client.requests) == 1


def test_a_result_is_kept_while_the_balancer_is_away_and_posted_once():
    clock = FakeClock(0.0)
    balancer = FakeBalancer(clock, jobs=[job("a", b"data", 2)])
    balancer.result_failures = 3
    worker, client, sleep, _ = make_worker(balancer, idle_timeout=5.0, clock=clock)
    assert worker.run() == 0
    assert [body["result"] for body in balancer.results["a"]] == [work(b"data", 2).hex()]
    carrying = [b for m, p, b, h in client.requests if p.startswith("/lease") and b["results"]]
    assert len(carrying) == 4  # three refused, the fourth recorded it
    assert len(sleep.delays) == 3


def test_a_warm_stop_hands_a_just_leased_job_back_and_exits():
    clock = FakeClock(0.0)
    balancer = FakeBalancer(clock, jobs=[job("a", b"data", 1)])
    worker, client, _, _ = make_worker(balancer, clock=clock)

    def stop_while_leasing(method, path, body):
        if path.startswith("/lease"):
            worker.stop.request()  # SIGTERM arrives while the lease is in flight
        return balancer(method, path, body)

    client.handle = stop_while_leasing
    assert worker.run() == 0
    assert balancer.released == ["a"]
    assert balancer.results == {}
    assert balancer.leases == 1


def test_a_cold_stop_abandons_the_job_being_computed_and_releases_it():
    clock = FakeClock(0.0)
    # 2**22 iterations take seconds; the first heartbeat (after 10 ms) asks for a cold stop, which
    # must end the work within CHECK_EVERY iterations. Ignored, the job completes and posts a result.
    balancer = FakeBalancer(clock, jobs=[job("long", b"data", 2**22)], lease_seconds=0.03)
    worker, client, _, _ = make_worker(balancer, clock=clock)

    def two_signals():  # SIGTERM twice, while the heartbeat shows the job is being computed
        worker.stop.request()
        worker.stop.request()

    balancer.on_heartbeat = two_signals
    assert worker.run() == 0
    assert balancer.released == ["long"]
    assert balancer.results == {}
    assert worker.jobs_done == 0
    assert client.paths("/heartbeat")


def test_a_batch_of_jobs_is_computed_and_its_results_ride_on_the_next_lease():
    clock = FakeClock(0.0)
    batch = [job(f"j{n}", b"batch %d" % n, 5) for n in range(3)]
    balancer = FakeBalancer(clock)
    worker, client, _, _ = make_worker(balancer, idle_timeout=5.0, clock=clock)

    def one_batch(method, path, body):
        if path.startswith("/lease") and balancer.leases == 0 and "max=0" not in path:
            balancer.leases += 1
            assert "max=32" in path and "budget=" in path
            return answer(200, {"jobs": batch, "keep": False, "lease_seconds": 30.0, "recorded": []})
        return balancer(method, path, body)

    client.handle = one_batch
    assert worker.run() == 0
    leases = [b for m, p, b, h in client.requests if p.startswith("/lease")]
    assert [item["id"] for item in leases[1]["results"]] == ["j0", "j1", "j2"]  # all three, one request
    assert {job_id: items[0]["result"] for job_id, items in balancer.results.items()} == {
        f"j{n}": work(b"batch %d" % n, 5).hex() for n in range(3)}
    assert not client.paths("/jobs/")  # no per-job request at all
