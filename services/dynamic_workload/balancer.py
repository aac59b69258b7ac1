"""The balancer: the durable queue's HTTP API, for endpoints and workers, and the scaler.

Every route but ``/healthz`` and ``/metrics`` requires the cluster's token
(``Authorization: Bearer <token>``). The routes, all JSON:

    PUT  /jobs/<id>?iterations=N   body: the job's bytes   201 stored, 200 stored before
    GET  /jobs/<id>                                         the job
    GET  /completed?top=N                                   newest completions first
    GET  /status                                            counts, workers, scaler
    POST /lease?wait=S&max=K&budget=I  {"results": [...]}  {"jobs": [...], "keep", "recorded": [...]}
    POST /heartbeat                {"jobs": [ids]}          {"held": [ids]}
    POST /jobs/<id>/release        X-Worker-Id              {"released": bool}
    GET  /bundle                                            the services' zipapp, for workers

A lease long-polls: it waits up to ``wait`` seconds for a job instead of answering empty,
so idle workers cost nothing and a new job starts within milliseconds. It hands out up to
``max`` jobs whose iterations stay within ``budget``, and records the results a worker
brings with it first, in one commit: a worker busy with small jobs makes one request per
batch, not two per job. Every worker request carries ``X-Worker-Id``.
"""

import base64
import hmac
import json
import os
import re
import threading
import time

from . import bundle, httpserver, logs, metrics
from .config import Settings
from .fleets import make_fleet
from .httpserver import HttpError, parse_int, route
from .scaler import Scaler, WorkerRegistry
from .store import QueueFull, Store, StoreUnavailable, UnknownJob

JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
ID = f"(?P<job_id>{JOB_ID.pattern})"
WORKER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_LEASE_WAIT = 20


class Balancer:
    """What the balancer's routes work with: settings, store, scaler and metrics."""

    def __init__(self, settings, store, scaler, registry, stopping=None):
        self.settings = settings
        self.stopping = stopping
        self.restart_reason = None
        self.store = store
        self.scaler = scaler
        self.registry = registry
        self.bundle = bundle.build()
        self.upload_budget = httpserver.ByteBudget(settings.upload_budget_bytes)
        # Idle workers told they may end themselves, and when: only as many as the floor
        # (min_workers) allows, so that idle workers don't all leave at once.
        self._leaving = {}
        self._leaving_lock = threading.Lock()
        self.job_seconds = metrics.Histogram(
            "dynamic_workload_job_duration_seconds", "Time a worker spent computing a job.", metrics.JOB_BUCKETS)
        self.wait_seconds = metrics.Histogram(
            "dynamic_workload_queue_wait_seconds", "Time a job waited in the queue before a worker leased it.",
            metrics.JOB_BUCKETS)
        self.request_seconds = metrics.Histogram(
            "dynamic_workload_balancer_request_duration_seconds", "Balancer request latency.",
            metrics.REQUEST_BUCKETS, ("method", "code"))

    def restart(self, reason):
        """Stop so that the supervisor (or systemd) starts a fresh process: the only cure for
        a database SQLite has opened read-only."""
        if self.restart_reason is None:
            self.restart_reason = reason
            logs.event("restart_requested", reason=reason)
            if self.stopping is not None:
                self.stopping.set()

    def may_leave(self, worker_id, now):
        """Whether an idle worker may end itself without taking the fleet below min_workers."""
        with self._leaving_lock:
            members = self.scaler.known or set()
            for other, since in list(self._leaving.items()):
                if other not in members or now - since > 2 * MAX_LEASE_WAIT:
                    del self._leaving[other]  # it is gone, or it stayed (found work)
            if worker_id in self._leaving:
                return True
            if self.scaler.live - len(self._leaving) > self.settings.min_workers:
                self._leaving[worker_id] = now
                return True
            return False

    def status(self):
        counts = self.store.counts()
        scaler = self.scaler
        durations = sorted(self.store.recent_durations())
        percentiles = {f"p{p}": durations[min(len(durations) - 1, int(len(durations) * p / 100))]
                       for p in (50, 95, 99)} if durations else {}
        return {
            "queued": counts["queued"], "running": counts["running"],
            "completed": counts["completed"], "failed": counts["failed"], "enqueued": counts["enqueued"],
            "workers": scaler.live + scaler.booting, "workers_live": scaler.live,
            "workers_booting": scaler.booting, "min_workers": self.settings.min_workers,
            "max_workers": self.settings.max_workers, "fleet": scaler.fleet.name,
            "fleet_error": scaler.fleet_error,
            "seconds_per_iteration": scaler.seconds_per_iteration,
            "job_seconds": percentiles,
            "decisions": [{"time": t, "wanted": d.wanted, "launch": d.launch, "reason": d.reason}
                          for t, d in scaler.decisions],
        }

    def metrics_text(self):
        counts = self.store.counts()
        scaler = self.scaler
        return "".join([
            metrics.family("dynamic_workload_jobs", "gauge", "Jobs by state.",
                           [({"state": s}, counts[s]) for s in ("queued", "running", "completed", "failed")]),
            metrics.family("dynamic_workload_workers", "gauge", "Workers by state.",
                           [({"state": "live"}, scaler.live), ({"state": "booting"}, scaler.booting)]),
            metrics.family("dynamic_workload_jobs_enqueued", "counter", "Jobs ever accepted.",
                           [({}, counts["enqueued"])]),
            metrics.family("dynamic_workload_worker_launches", "counter", "Workers launched by the scaler.",
                           [({}, scaler.launches_total)]),
            metrics.family("dynamic_workload_scaler_ticks", "counter",
                           "Scaler ticks by outcome: launch, hold (enough workers), backoff (fleet errors).",
                           [({"outcome": k}, v) for k, v in scaler.ticks.items()]),
            metrics.family("dynamic_workload_fleet_errors", "counter",
                           "Fleet API calls that failed (the scaler backs off after each).",
                           [({}, scaler.fleet_errors_total)]),
            metrics.family("dynamic_workload_worker_terminations", "counter",
                           "Workers terminated by the scaler (boot timeout or lost).",
                           [({}, scaler.terminations_total)]),
            self.job_seconds.render(), self.wait_seconds.render(), self.request_seconds.render(),
        ])


class BalancerHandler(httpserver.Handler):
    routes = [
        route("/healthz", GET="healthz"),
        route("/metrics", GET="metrics"),
        route("/status", GET="status"),
        route("/completed", GET="completed"),
        route("/lease", POST="lease"),
        route("/heartbeat", POST="heartbeat_many"),
        route(f"/jobs/{ID}", PUT="enqueue", GET="get_job"),
        route(f"/jobs/{ID}/release", POST="release"),
        route("/bundle", GET="bundle"),
    ]

    def observe(self, method, status, seconds):
        self.app.request_seconds.observe(seconds, method, str(status))

    def translate(self, error):
        # Any route that writes: the disk is full or read-only. Nothing was changed; retry later.
        if isinstance(error, StoreUnavailable):
            logs.event("store_unavailable", path=self.route_path, error=str(error))
            if error.readonly:
                self.app.restart("the job database became read-only")
            return HttpError(507, "the balancer cannot write its job database now (disk full or read-only);"
                                  " retry later", {"Retry-After": "5"})
        return None

    def check_access(self, method, path):
        # Every request needs the token, unknown routes included, except health and metrics.
        if method == "GET" and path in ("/healthz", "/metrics"):
            return
        expected = "Bearer " + self.app.settings.token
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode()):
            raise HttpError(401, "missing or wrong cluster token", {"WWW-Authenticate": "Bearer"})

    def worker_id(self):
        worker_id = self.headers.get("X-Worker-Id", "")
        if not WORKER_ID.fullmatch(worker_id):
            raise HttpError(400, "X-Worker-Id header missing or malformed")
        self.app.registry.seen(worker_id)
        return worker_id

    def json_body(self):
        try:
            body = json.loads(self.read_body(1 << 20) or b"{}")
        except ValueError:
            raise HttpError(400, "body is not JSON") from None
        if not isinstance(body, dict):
            raise HttpError(400, "body must be a JSON object")
        return body

    # --- routes ---------------------------------------------------------------------------

    def bundle(self):
        """The services' zipapp, for workers to run (see bundle.py)."""
        return self.send_body(200, self.app.bundle, "application/zip")

    def healthz(self):
        return self.send_json(200, {"ok": True})

    def metrics(self):
        return self.send_body(200, self.app.metrics_text().encode(), metrics.CONTENT_TYPE)

    def status(self):
        return self.send_json(200, self.app.status())

    def completed(self):
        top = parse_int(self.query.get("top"), "top", 1, 1000, default=10)
        return self.send_json(200, self.app.store.completed(top))

    def enqueue(self, job_id):
        settings = self.app.settings
        iterations = parse_int(self.query.get("iterations"), "iterations", 1, settings.max_iterations)
        data = self.read_body(settings.max_body_bytes, self.app.upload_budget)
        if not data:
            raise HttpError(400, "empty data")
        try:
            created = self.app.store.enqueue(job_id, iterations, data)
        except QueueFull:
            raise HttpError(429, f"the queue is full ({settings.max_queued} jobs waiting); retry later",
                            {"Retry-After": "1"}) from None
        logs.detail("enqueued", job=job_id, iterations=iterations, size=len(data))
        return self.send_json(201 if created else 200, {"id": job_id, "status": "queued"})

    def get_job(self, job_id):
        try:
            return self.send_json(200, self.app.store.get(job_id))
        except UnknownJob:
            raise HttpError(404, f"no job {job_id}") from None

    def lease(self):
        worker_id = self.worker_id()
        wait = parse_int(self.query.get("wait"), "wait", 0, MAX_LEASE_WAIT, default=0)
        max_jobs = parse_int(self.query.get("max"), "max", 0, 100, default=1)
        budget = parse_int(self.query.get("budget"), "budget", 1, 10**12, default=10**12)
        store, settings = self.app.store, self.app.settings
        # The worker's finished results ride on its next lease: recorded (committed) first.
        results = self.parse_results(self.json_body().get("results", []))
        recorded = self.record(worker_id, results) if results else []
        deadline = time.monotonic() + (wait if max_jobs else 0)
        while max_jobs:
            generation = store.generation
            jobs = store.lease(worker_id, settings.lease_seconds, max_jobs, budget)
            remaining = deadline - time.monotonic()
            if jobs or remaining <= 0:
                break
            with store.work_available:
                store.work_available.wait_for(lambda: store.generation != generation, timeout=min(remaining, 1.0))
        else:
            jobs = []
        for job in jobs:
            self.app.wait_seconds.observe(job.pop("waited"))
            job["data"] = base64.b64encode(job["data"]).decode()
            logs.detail("leased", job=job["id"], worker=worker_id, attempt=job["attempt"])
        keep = not jobs and not self.app.may_leave(worker_id, time.monotonic())
        return self.send_json(200, {"jobs": jobs, "keep": keep, "lease_seconds": settings.lease_seconds,
                                    "recorded": recorded})

    def parse_results(self, results):
        """[(job id, result, duration)] from a JSON list of {"id", "result", "duration"}, or a 400."""
        if not isinstance(results, list) or len(results) > 1000:
            raise HttpError(400, "results must be a list of at most 1000 {id, result, duration}")
        parsed = []
        for item in results:
            if not isinstance(item, dict):
                raise HttpError(400, "each result must be an object {id, result, duration}")
            job_id, result, duration = item.get("id"), item.get("result"), item.get("duration")
            if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
                raise HttpError(400, "a result's id is missing or malformed")
            if not isinstance(result, str) or not re.fullmatch(r"[0-9a-f]{128}", result):
                raise HttpError(400, "result must be 128 lowercase hex digits")
            if not isinstance(duration, (int, float)) or isinstance(duration, bool) or duration < 0:
                duration = None
            parsed.append((job_id, result, duration))
        return parsed

    def record(self, worker_id, results):
        """Record results in one commit; returns, for each, True, False (had one) or None (unknown)."""
        recorded = self.app.store.complete_many(results, worker_id)
        for (job_id, _, duration), now in zip(results, recorded):
            if now:
                if duration is not None:
                    self.app.job_seconds.observe(duration)
                logs.detail("completed", job=job_id, worker=worker_id, duration=duration)
        return recorded

    def heartbeat_many(self):
        worker_id = self.worker_id()
        jobs = self.json_body().get("jobs")
        if not isinstance(jobs, list) or len(jobs) > 1000 or not all(isinstance(j, str) for j in jobs):
            raise HttpError(400, "jobs must be a list of at most 1000 job ids")
        held = self.app.store.heartbeat(worker_id, jobs, self.app.settings.lease_seconds)
        return self.send_json(200, {"held": held})

    def release(self, job_id):
        worker_id = self.worker_id()
        released = self.app.store.release(job_id, worker_id)
        logs.event("released", job=job_id, worker=worker_id, released=released)
        return self.send_json(200, {"released": released})


def main(argv=None):
    args = httpserver.service_arguments("dynamic_workload balancer", __doc__.splitlines()[0], 5100).parse_args(argv)
    logs.configure("balancer", args.verbose)
    settings = Settings.from_env()
    if not settings.token:
        raise SystemExit("DW_TOKEN is not set: the balancer refuses to run without the cluster's token")
    os.makedirs(settings.state_dir, exist_ok=True)

    stopping = httpserver.stop_on_signals()
    clock = time.time
    try:
        store = Store(os.path.join(settings.state_dir, "jobs.db"), max_queued=settings.max_queued,
                      max_attempts=settings.max_attempts, clock=clock)
    except StoreUnavailable as error:
        # Exit (and be restarted with backoff) until the database can be written: a balancer
        # that can't store anything must not look healthy.
        logs.event("store_unavailable", error=str(error))
        return 1
    registry = WorkerRegistry(clock)
    fleet = make_fleet(settings, clock)
    scaler = Scaler(store, fleet, settings, registry, clock)
    app = Balancer(settings, store, scaler, registry, stopping)
    server = httpserver.serve(app, BalancerHandler, args.host, args.port)
    scaler_thread = threading.Thread(target=scaler.run, args=(stopping,), name="scaler", daemon=True)
    scaler_thread.start()
    logs.event("started", address=f"http://{args.host}:{args.port}", fleet=fleet.name,
               counts=store.counts())
    httpserver.serve_until(server, stopping)
    logs.event("stopping")
    scaler_thread.join(timeout=10)
    fleet.close()
    store.close()
    logs.event("stopped", restart=app.restart_reason)
    return 1 if app.restart_reason else 0
