"""Security: the balancer's token (contract section 5).

401 from the balancer to every request without the cluster's token, except GET (and HEAD)
/healthz and /metrics; the token never appears in a log file, in /status, /metrics, a job or the
dashboard, in the process table (any local user can read command lines) or in the bundle the
balancer serves; GET /bundle requires the token and with it returns a zip.
"""

import base64
import io
import os
import zipfile

import pytest

import faultkit
from faultkit import report, wait_until

pytestmark = pytest.mark.cluster

ROUTES = ["/healthz", "/metrics", "/status", "/completed?top=5", "/lease", "/lease?wait=0", "/jobs/abc",
          "/jobs/abc?iterations=1", "/heartbeat", "/jobs/abc/release", "/bundle",
          "/", "/nope", "/healthz/", "/metrics/x", "/HEALTHZ", "//healthz", "//status", "/healthz/../status", "/jobs/",
          "/enqueue?iterations=1", "/pullCompleted"]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"]
OPEN = {("GET", "/healthz"), ("HEAD", "/healthz"), ("GET", "/metrics"), ("HEAD", "/metrics")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with faultkit.fired(tmp_path_factory.mktemp("security"), cluster_max_workers=1,
                        local_cluster_lease_seconds=5) as cluster:
        yield cluster


def credentials(token):
    """Authorization headers that do not carry the cluster's token, as each would be sent."""
    return {
        "none": {},
        "wrong token": {"Authorization": "Bearer " + "x" * len(token)},
        "token minus a char": {"Authorization": "Bearer " + token[:-1]},
        "token plus a char": {"Authorization": "Bearer " + token + "x"},
        "empty bearer": {"Authorization": "Bearer "},
        "basic scheme": {"Authorization": "Basic " + base64.b64encode(f"x:{token}".encode()).decode()},
        "other header": {"X-Token": token, "X-Cluster-Token": token},
        "cookie": {"Cookie": f"token={token}"},
        "non-ascii": {"Authorization": "Bearer é"},
    }


def test_the_balancer_answers_401_to_every_request_without_the_token(cluster):
    token = cluster.token
    unexpected, count = [], 0
    for route in ROUTES:
        for method in METHODS:
            for name, headers in credentials(token).items():
                path = route + ("&" if "?" in route else "?") + f"token={token}" if name == "other header" else route
                body = b'{"result": "' + b"0" * 128 + b'"}' if method in ("POST", "PUT") else None
                answer = faultkit.request(cluster.balancer_port, method, path, body, headers, timeout=10)
                count += 1
                # http.server reads "//x" as "/x" (it strips the leading slashes of a path).
                normalized = "/" + route.lstrip("/") if route.startswith("//") else route
                expected = 200 if (method, normalized) in OPEN else 401
                if answer.status != expected:
                    unexpected.append((method, path, name, answer.status, answer.body[:100]))
                elif expected == 401:
                    if answer.headers.get("WWW-Authenticate") != "Bearer" or token.encode() in answer.body:
                        unexpected.append((method, path, name, "401 without WWW-Authenticate, or echoing the token"))
                    if method != "HEAD" and "error" not in answer.json():
                        unexpected.append((method, path, name, "401 without a JSON error"))
    # Nothing sent without the token changed anything: no job "abc" was created or completed.
    assert faultkit.balancer(cluster, "GET", "/jobs/abc").status == 404
    report("401 without the token", requests=count, unexpected=len(unexpected))
    assert not unexpected, unexpected[:10]


def test_the_token_appears_in_no_log_answer_process_table_or_bundle(cluster):
    token = cluster.token
    # Traffic that makes the services log: jobs, a refused token, a restart, a lost worker.
    ids = [cluster.enqueue(f"security {n}".encode(), 1000).json()["id"] for n in range(5)]
    cluster.wait_completed(ids, timeout=30)
    faultkit.request(cluster.balancer_port, "GET", "/status", headers={"Authorization": "Bearer nope"})
    long_job = cluster.enqueue(b"a long job", 800_000).json()["id"]
    wait_until(lambda: cluster.worker_pids(), 20, message="a worker")
    wait_until(lambda: cluster.job(long_job).json()["status"] == "running", 20, message="the long job to run")
    cluster.kill(next(iter(cluster.worker_pids().values())))
    balancer = faultkit.balancer_pid(cluster)
    cluster.kill(balancer)
    faultkit.wait_restarted(cluster, balancer, "dynamic_workload balancer")
    cluster.wait_healthy()
    cluster.wait_completed([long_job], timeout=60)

    places = {}
    for folder, _, files in os.walk(os.path.join(cluster.state_dir, "logs")):
        for name in files:
            with open(os.path.join(folder, name), "rb") as log:
                places[f"logs/{name}"] = log.read()
    for name in ("services.json",):
        with open(os.path.join(cluster.state_dir, name), "rb") as spec:
            places[name] = spec.read()
    for name, pid in cluster.worker_pids().items():
        places[f"workers/{name}.pid"] = open(os.path.join(cluster.state_dir, "workers", f"{name}.pid"), "rb").read()
    for path in ("/status", "/metrics", f"/jobs/{long_job}", "/completed?top=100"):
        places[f"balancer {path}"] = faultkit.balancer(cluster, "GET", path).body
    for port in cluster.endpoints:
        for method, path in (("GET", "/status"), ("GET", "/metrics"), ("GET", "/"), ("GET", f"/jobs/{long_job}"),
                             ("POST", "/pullCompleted?top=100")):
            places[f"endpoint {port} {path}"] = faultkit.request(port, method, path).body
    for pid in faultkit.group_members(cluster.supervisor_pid()):
        places[f"cmdline of {faultkit.service_name(cluster, pid)} ({pid})"] = faultkit.cmdline(pid).encode()
    bundle = faultkit.balancer(cluster, "GET", "/bundle")
    places["GET /bundle"] = bundle.body
    leaks = [where for where, content in places.items() if token.encode() in content]
    sizes = sum(len(c) for c in places.values())
    report("the token kept secret", places_checked=len(places), bytes_checked=sizes, leaks=len(leaks))
    assert not leaks, leaks
    # The files that do hold it are for the cluster's user only.
    for name in ("token", "cluster.env"):
        assert os.stat(os.path.join(cluster.state_dir, name)).st_mode & 0o077 == 0, name
    assert os.stat(cluster.state_dir).st_mode & 0o077 == 0


def test_the_bundle_requires_the_token_and_with_it_is_a_zip_of_the_services(cluster):
    for headers in credentials(cluster.token).values():
        assert faultkit.request(cluster.balancer_port, "GET", "/bundle", headers=headers).status == 401
    # The endpoints, public, do not serve it at all.
    for port in cluster.endpoints:
        assert faultkit.request(port, "GET", "/bundle").status == 404
    answer = faultkit.balancer(cluster, "GET", "/bundle")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(answer.body)) as bundle:
        names = bundle.namelist()
        assert bundle.testzip() is None
    assert "__main__.py" in names and "dynamic_workload/worker.py" in names, names
    report("GET /bundle", bytes=len(answer.body), files=len(names), without_token=401)
