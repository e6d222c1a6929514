"""A stand-in for an OpenAI-compatible judge endpoint on the loopback address (127.0.0.1, no network), for the tests
and the judging benchmark: it answers each `/chat/completions` request after `delay_s`, with a verdict from
`verdict(body)` or a fault from `fault(n, body)`, and counts requests, including how many were in flight at once.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

#: (HTTP status, headers, body) a fault answers with instead of a verdict
Fault = tuple[int, dict, bytes]


def completion(content: str) -> bytes:
    """A chat-completions reply whose message is `content`."""
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


class StubJudge:
    """`with StubJudge(...) as stub:` serves on `stub.url` (".../v1"); `stub.requests` holds each request's body and
    Authorization header, `stub.peak` the most requests in flight at once."""

    def __init__(self, verdict: Callable[[dict], str] = lambda body: "{'pred': 'yes', 'score': 4}",
                 delay_s: float = 0.0, fault: Callable[[int, dict], Fault | None] | None = None,
                 on_request: Callable[[dict], None] | None = None):
        self.verdict, self.delay_s, self.fault, self.on_request = verdict, delay_s, fault, on_request
        self.requests: list[dict] = []
        self.in_flight = self.peak = 0
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub._lock:
                    n = len(stub.requests)
                    stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                          "body": body})
                    stub.in_flight += 1
                    stub.peak = max(stub.peak, stub.in_flight)
                try:
                    if stub.on_request is not None:
                        stub.on_request(body)
                    time.sleep(stub.delay_s)
                    status, headers, reply = (stub.fault and stub.fault(n, body)) or (
                        200, {}, completion(stub.verdict(body)))
                finally:
                    with stub._lock:
                        stub.in_flight -= 1
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the default backlog of 5 drops connections a concurrent client opens
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self) -> "StubJudge":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
