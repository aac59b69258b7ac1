"""The floor to compare an endpoint with: a bare ThreadingHTTPServer answering a fixed JSON.

Same tuning as services/dynamic_workload/httpserver.py (HTTP/1.1 keep-alive, buffered wfile,
TCP_NODELAY, listen backlog 1024), none of the work: it reads the request body (so that the
connection can carry the next request) and answers the same 201 JSON an endpoint would.

    python bench/bare_server.py PORT
"""

import http.server
import json
import socket
import sys

ANSWER = json.dumps({"id": "0" * 32, "status": "queued", "iterations": 10, "size": 100}).encode() + b"\n"


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()

    def handle_error(self, request, client_address):
        pass  # a load generator resetting its connections at the end is not news


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = -1

    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)
        self.wfile.flush()

    do_PUT = do_GET = do_POST = answer

    def log_message(self, *args):
        pass


def main():
    server = Server(("127.0.0.1", int(sys.argv[1])), Handler)
    print("ready", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
