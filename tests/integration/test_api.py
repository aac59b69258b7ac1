"""The public API of contract section 4, through the real cluster fired by ansible-playbook."""

import json
import os
import subprocess

import pytest

from cluster import LocalCluster, contract_work, request
from conftest import wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("api"), cluster_max_body_bytes=4096,
                           cluster_max_iterations=1_000_000, cluster_max_workers=2)
    cluster.fire()
    yield cluster
    cluster.teardown()


def curl(*args):
    run = subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_the_seeds_curl_commands_work_and_results_equal_hashlib(cluster, tmp_path):
    test_file = tmp_path / "test_file"
    test_file.write_bytes(os.urandom(100))
    host = f"http://127.0.0.1:{cluster.endpoint_port}"
    # As the seed's README has it: -F "data=<file" sends the file's content as a field.
    first = curl(f"{host}/enqueue?iterations=10", "-F", f"data=<{test_file}", "-X", "PUT")
    second = curl("-X", "PUT", f"{host}/enqueue?iterations=10", "-F", f"data=@{test_file}")
    cluster.wait_completed([first["id"], second["id"]], timeout=30)
    pulled = curl("-X", "POST", f"http://127.0.0.1:{cluster.endpoint_port + 1}/pullCompleted?top=10")
    results = {job["id"]: job["result"] for job in pulled}
    expected = contract_work(test_file.read_bytes(), 10)
    assert results[first["id"]] == expected
    assert results[second["id"]] == expected


def test_results_are_byte_exact_for_binary_uploads(cluster, tmp_path):
    data = bytes(range(256)) * 4 + b"\r\n--boundary-looking\r\n"
    path = tmp_path / "binary"
    path.write_bytes(data)
    multipart = curl("-X", "PUT", f"http://127.0.0.1:{cluster.endpoint_port}/enqueue?iterations=3",
                     "-F", f"data=@{path}")
    raw = cluster.enqueue(data, 3).json()
    cluster.wait_completed([multipart["id"], raw["id"]], timeout=30)
    for job_id in (multipart["id"], raw["id"]):
        job = cluster.job(job_id).json()
        assert job["status"] == "completed"
        assert job["result"] == contract_work(data, 3)


def test_pull_completed_is_newest_first_and_does_not_consume(cluster):
    ids = []
    for n in range(5):
        answer = cluster.enqueue(f"job {n}".encode(), 1)
        assert answer.status == 201
        ids.append(answer.json()["id"])
        cluster.wait_completed([ids[-1]], timeout=30)
    top = cluster.completed(top=5)
    assert [job["id"] for job in top] == ids[::-1]
    assert [job["id"] for job in cluster.completed(top=5)] == ids[::-1]
    assert len(cluster.completed(top=2)) == 2
    default = request(cluster.endpoint_port, "POST", "/pullCompleted").json()
    assert len(default) == min(10, cluster.status()["completed"])


def test_job_status_and_status_route(cluster):
    answer = cluster.enqueue(b"hello", 2)
    job_id = answer.json()["id"]
    cluster.wait_completed([job_id], timeout=30)
    job = cluster.job(job_id).json()
    assert job["id"] == job_id and job["status"] == "completed"
    assert job["result"] == contract_work(b"hello", 2)
    status = cluster.status(port=cluster.endpoint_port + 1)
    for key in ("queued", "running", "completed", "failed", "workers"):
        assert isinstance(status[key], int)
    assert cluster.job("0123456789abcdef").status == 404


def _error(answer, status):
    assert answer.status == status, (answer.status, answer.body)
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json()["error"]


BOUNDARY = "----dwtest"


@pytest.mark.parametrize("path, body, content_type", [
    ("/enqueue", b"x", "application/octet-stream"),  # iterations missing
    ("/enqueue?iterations=ten", b"x", "application/octet-stream"),
    ("/enqueue?iterations=1.5", b"x", "application/octet-stream"),
    ("/enqueue?iterations=0", b"x", "application/octet-stream"),
    ("/enqueue?iterations=-3", b"x", "application/octet-stream"),
    ("/enqueue?iterations=1000001", b"x", "application/octet-stream"),  # above cluster_max_iterations
    ("/enqueue?iterations=" + "9" * 5000, b"x", "application/octet-stream"),
    ("/enqueue?iterations=10", b"", "application/octet-stream"),  # empty data
    ("/enqueue?iterations=10", f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"f\"\r\n\r\n\r\n--{BOUNDARY}--\r\n".encode(),
     f"multipart/form-data; boundary={BOUNDARY}"),  # empty file
    ("/enqueue?iterations=10", f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc\r\n--{BOUNDARY}--\r\n".encode(),
     f"multipart/form-data; boundary={BOUNDARY}"),  # no data field
    ("/enqueue?iterations=10", b"--x\r\n\r\nabc", "multipart/form-data"),  # no boundary
    ("/enqueue?iterations=10", f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\nabc".encode(),
     f"multipart/form-data; boundary={BOUNDARY}"),  # no closing delimiter
])
def test_bad_enqueues_get_400(cluster, path, body, content_type):
    _error(request(cluster.endpoint_port, "PUT", path, body, {"Content-Type": content_type}), 400)


@pytest.mark.parametrize("top", ["abc", "0", "1001", "-1", "2.5", ""])
def test_bad_top_gets_400(cluster, top):
    _error(request(cluster.endpoint_port, "POST", f"/pullCompleted?top={top}"), 400)


def test_body_above_the_limit_is_refused_from_content_length_before_it_is_sent(cluster):
    import socket

    with socket.create_connection(("127.0.0.1", cluster.endpoint_port), timeout=10) as sock:
        sock.sendall(b"PUT /enqueue?iterations=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 4097\r\n"
                     b"Content-Type: application/octet-stream\r\nExpect: 100-continue\r\n\r\n")
        answer = sock.recv(65536).decode()
    status_line, _, rest = answer.partition("\r\n")
    assert status_line.split()[1] == "413", answer
    assert "100 Continue" not in answer
    assert json.loads(rest.split("\r\n\r\n", 1)[1])["error"]


def test_unknown_routes_and_wrong_methods(cluster):
    _error(request(cluster.endpoint_port, "GET", "/nope"), 404)
    _error(request(cluster.endpoint_port, "GET", "/enqueue?iterations=1"), 405)
    _error(request(cluster.endpoint_port, "GET", "/pullCompleted"), 405)
    _error(request(cluster.endpoint_port, "DELETE", "/status"), 405)
    _error(request(cluster.endpoint_port, "BREW", "/status"), 405)
    assert request(cluster.endpoint_port, "GET", "/healthz").status == 200


def scrape(port):
    from prometheus_client.parser import text_string_to_metric_families

    answer = request(port, "GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(answer.body.decode())}


def sample(families, family, name, **labels):
    for s in families[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name} {labels}")


def test_metrics_move_with_the_work(cluster):
    before = scrape(cluster.endpoint_port)
    ids = [cluster.enqueue(b"metrics %d" % n, 1000).json()["id"] for n in range(3)]
    cluster.wait_completed(ids, timeout=30)
    after = scrape(cluster.endpoint_port + 1)
    enqueued = "dynamic_workload_jobs_enqueued"
    assert sample(after, enqueued, enqueued + "_total") == sample(before, enqueued, enqueued + "_total") + 3
    jobs = "dynamic_workload_jobs"
    assert sample(after, jobs, jobs, state="completed") >= sample(before, jobs, jobs, state="completed") + 3
    duration = "dynamic_workload_job_duration_seconds"
    assert sample(after, duration, duration + "_count") >= sample(before, duration, duration + "_count") + 3
    wait = "dynamic_workload_queue_wait_seconds"
    assert sample(after, wait, wait + "_count") >= sample(before, wait, wait + "_count") + 3
    requests = "dynamic_workload_endpoint_request_duration_seconds"
    assert sample(after, requests, requests + "_count", method="GET", code="200") >= 1
    assert sample(after, "dynamic_workload_endpoint_balancer_up", "dynamic_workload_endpoint_balancer_up") == 1
    ticks = "dynamic_workload_scaler_ticks"

    def all_ticks(families):
        return sum(sample(families, ticks, ticks + "_total", outcome=o) for o in ("launch", "hold", "backoff"))
    wait_until(lambda: all_ticks(scrape(cluster.endpoint_port)) > all_ticks(before), 5, message="a scaler tick")


def test_metrics_and_dashboard(cluster):
    families = scrape(cluster.endpoint_port)
    assert families["dynamic_workload_jobs"].type == "gauge"
    states = {s.labels["state"] for s in families["dynamic_workload_jobs"].samples}
    assert states == {"queued", "running", "completed", "failed"}
    assert {s.labels["state"] for s in families["dynamic_workload_workers"].samples} == {"live", "booting"}
    assert families["dynamic_workload_jobs_enqueued"].type == "counter"
    assert families["dynamic_workload_job_duration_seconds"].type == "histogram"
    page = request(cluster.endpoint_port, "GET", "/")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b"<svg" in page.body


def test_the_balancer_requires_the_token(cluster):
    port = cluster.balancer_port
    for method, path in [("GET", "/status"), ("GET", "/completed"), ("POST", "/lease"),
                         ("PUT", "/jobs/abc?iterations=1"), ("GET", "/jobs/abc"),
                         ("POST", "/heartbeat"),
                         ("POST", "/jobs/abc/release"), ("GET", "/nope"), ("POST", "/healthz")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": cluster.token}):
            answer = request(port, method, path, b"x" if method != "GET" else None, headers)
            assert answer.status == 401, (method, path, headers, answer.status)
    assert request(port, "GET", "/healthz").status == 200
    assert request(port, "GET", "/metrics").status == 200
    good = {"Authorization": f"Bearer {cluster.token}"}
    assert request(port, "GET", "/status", headers=good).status == 200


def test_every_log_line_is_a_json_object_with_time_service_and_event(cluster):
    import glob

    cluster.wait_completed([cluster.enqueue(b"logged", 1).json()["id"]], timeout=30)
    lines = 0
    for path in glob.glob(os.path.join(cluster.state_dir, "logs", "*.log")):
        with open(path) as log:
            for line in log:
                record = json.loads(line)
                assert {"time", "service", "event"} <= record.keys(), (path, line)
                lines += 1
    assert lines >= 4  # supervisor, balancer, endpoints, workers


def test_verbose_logs_name_each_job(tmp_path):
    cluster = LocalCluster(tmp_path, local_cluster_verbose=True)
    cluster.fire()
    try:
        job_id = cluster.enqueue(b"traced", 1).json()["id"]
        cluster.wait_completed([job_id], timeout=30)
        with open(os.path.join(cluster.state_dir, "logs", "balancer.log")) as log:
            events = {json.loads(line)["event"] for line in log if job_id in line}
        assert {"enqueued", "leased", "completed"} <= events
    finally:
        cluster.teardown()
