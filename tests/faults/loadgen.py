"""A load generator for the overload test, run as its own process (so that its threads don't
compete for the test process's GIL with the /healthz probe).

    python loadgen.py --ports 5000,5001 --clients 16 --seconds 6 --iterations 30000 --tag T

Each client keeps one keep-alive connection and enqueues as fast as answers come. Job n of client c
carries the bytes "T c n", so the test can check results. Prints one JSON object at the end.
"""

import argparse
import http.client
import json
import threading
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ports", required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--iterations", type=int, default=30000)
    parser.add_argument("--tag", default="overload")
    args = parser.parse_args()
    ports = [int(p) for p in args.ports.split(",")]
    deadline = time.monotonic() + args.seconds
    lock = threading.Lock()
    out = {"acknowledged": [], "statuses": {}, "accept_latencies": [], "refusal_latencies": [],
           "missing_retry_after": 0, "bad": [], "errors": 0}

    def client(number):
        port = ports[number % len(ports)]
        conn = None
        n = 0
        while time.monotonic() < deadline:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            data = f"{args.tag} {number} {n}".encode()
            began = time.monotonic()
            try:
                conn.request("PUT", f"/enqueue?iterations={args.iterations}", body=data,
                             headers={"Content-Type": "application/octet-stream"})
                answer = conn.getresponse()
                body = answer.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = None
                with lock:
                    out["errors"] += 1
                time.sleep(0.01)
                continue
            elapsed = time.monotonic() - began
            if answer.will_close:
                conn.close()
                conn = None
            with lock:
                out["statuses"][answer.status] = out["statuses"].get(answer.status, 0) + 1
                if answer.status in (200, 201):
                    out["acknowledged"].append([json.loads(body)["id"], number, n])
                    out["accept_latencies"].append(elapsed)
                elif answer.status in (429, 503):
                    out["refusal_latencies"].append(elapsed)
                    if answer.getheader("Retry-After") is None:
                        out["missing_retry_after"] += 1
                elif len(out["bad"]) < 10:
                    out["bad"].append([answer.status, body[:200].decode("utf-8", "replace")])
            n += 1
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
