"""The public API (contract section 4): stateless, it checks input and forwards to the balancer.

An endpoint keeps nothing: any number of them can serve behind DNS or a load balancer, and
one can be killed at any moment. It names each job itself (a random id) before forwarding
it, so when the balancer's answer is lost the enqueue is simply repeated under the same
id: the balancer stores it once, and the client gets its 2xx only after the commit.
"""

import os
import time

from . import dashboard, httpserver, logs, metrics
from .client import BalancerClient, BalancerUnreachable
from .config import Settings
from .httpserver import HttpError, parse_int, route
from .multipart import MultipartError, extract_data

# After the balancer says the queue is full, refuse enqueues here, without reading them or
# asking the balancer, for this long: under overload, refusing must cost next to nothing.
FULL_HOLD_SECONDS = 0.2

# Seconds to wait for the balancer's answer: a read is quick; an enqueue waits for a commit
# (a group commit under load, a 16 MiB payload) and is worth waiting for longer.
READ_TIMEOUT = 5
ENQUEUE_TIMEOUT = 30


class Endpoint:
    def __init__(self, settings, client, clock=time.monotonic, sleep=time.sleep):
        self.settings = settings
        self.client = client
        self.clock = clock
        self.sleep = sleep
        self.upload_budget = httpserver.ByteBudget(settings.upload_budget_bytes)
        self.full_until = 0.0  # monotonic time until which the queue is taken to be full
        self.request_seconds = metrics.Histogram(
            "dynamic_workload_endpoint_request_duration_seconds", "Endpoint request latency.",
            metrics.REQUEST_BUCKETS, ("method", "code"))

    def forward(self, method, path, body=None, timeout=READ_TIMEOUT):
        """Send a request to the balancer, retrying while it is away (every route is repeatable)."""
        deadline = self.clock() + self.settings.balancer_retry_seconds
        delay = 0.05
        while True:
            try:
                return self.client.request(method, path, body, timeout=timeout)
            except BalancerUnreachable as error:
                if self.clock() + delay > deadline:
                    logs.event("balancer_unreachable", error=str(error))
                    raise HttpError(503, "the balancer cannot be reached; retry later",
                                    {"Retry-After": "2"}) from None
            self.sleep(delay)
            delay = min(delay * 2, 1.0)


class EndpointHandler(httpserver.Handler):
    routes = [
        route("/", GET="dashboard"),
        route("/healthz", GET="healthz"),
        route("/metrics", GET="metrics"),
        route("/status", GET="status"),
        route("/enqueue", PUT="enqueue"),
        route("/pullCompleted", POST="pull_completed"),
        route("/jobs/(?P<job_id>[^/]*)", GET="get_job"),
    ]

    def observe(self, method, status, seconds):
        self.app.request_seconds.observe(seconds, method, str(status))

    def relay(self, answer):
        """Pass the balancer's answer on, as it is (status, JSON body, Retry-After)."""
        headers = {}
        if "Retry-After" in answer.headers:
            headers["Retry-After"] = answer.headers["Retry-After"]
        if answer.status == 401:
            logs.event("balancer_refused_token")
            raise HttpError(503, "the endpoint's cluster token is not accepted by the balancer")
        return self.send_body(answer.status, answer.body, "application/json", headers)

    def healthz(self):
        return self.send_json(200, {"ok": True})

    def dashboard(self):
        return self.send_body(200, dashboard.PAGE, "text/html; charset=utf-8")

    def enqueue(self):
        settings = self.app.settings
        iterations = parse_int(self.query.get("iterations"), "iterations", 1, settings.max_iterations)
        if self.app.clock() < self.app.full_until:
            raise HttpError(429, "the queue is full; retry later", {"Retry-After": "1"})
        # The limit is on the request body as sent (a form's envelope included), so that it
        # is decided from Content-Length before a byte of the upload is read.
        body = self.read_body(settings.max_body_bytes, self.app.upload_budget)
        try:
            data = extract_data(self.headers.get("Content-Type", ""), body)
        except MultipartError as error:
            raise HttpError(400, str(error)) from None
        if not data:
            raise HttpError(400, "empty data; send the job's bytes, e.g. curl -F data=@FILE")
        job_id = os.urandom(16).hex()  # random, like uuid4, at a fifth of the cost
        answer = self.app.forward("PUT", f"/jobs/{job_id}?iterations={iterations}", data, timeout=ENQUEUE_TIMEOUT)
        if answer.status in (200, 201):
            return self.send_json(201, {"id": job_id, "status": "queued", "iterations": iterations,
                                        "size": len(data)})
        if answer.status == 429:
            self.app.full_until = self.app.clock() + FULL_HOLD_SECONDS
        return self.relay(answer)

    def pull_completed(self):
        top = parse_int(self.query.get("top"), "top", 1, 1000, default=10)
        return self.relay(self.app.forward("GET", f"/completed?top={top}"))

    def get_job(self, job_id):
        if not job_id or len(job_id) > 64 or not job_id.replace("-", "").replace("_", "").isalnum() \
                or not job_id.isascii():
            raise HttpError(404, f"no job {job_id!r}")
        return self.relay(self.app.forward("GET", f"/jobs/{job_id}"))

    def status(self):
        return self.relay(self.app.forward("GET", "/status"))

    def metrics(self):
        own = self.app.request_seconds.render()
        try:
            answer = self.app.client.request("GET", "/metrics", timeout=5)
            upstream, up = answer.body.decode(), 1
        except BalancerUnreachable:
            upstream, up = "", 0
        text = upstream + own + metrics.family(
            "dynamic_workload_endpoint_balancer_up", "gauge", "1 if the balancer answered the last scrape.",
            [({}, up)])
        return self.send_body(200, text.encode(), metrics.CONTENT_TYPE)


def main(argv=None):
    args = httpserver.service_arguments("dynamic_workload endpoint", __doc__.splitlines()[0], 5000).parse_args(argv)
    logs.configure("endpoint", args.verbose)
    settings = Settings.from_env()
    app = Endpoint(settings, BalancerClient(settings.balancer_url, settings.token))
    server = httpserver.serve(app, EndpointHandler, args.host, args.port)
    stopping = httpserver.stop_on_signals()
    logs.event("started", address=f"http://{args.host}:{args.port}", balancer=settings.balancer_url)
    httpserver.serve_until(server, stopping)
    logs.event("stopped")
