"""A stand-in for a vLLM OpenAI server, for the supervisor tests: `fake_vllm_engine.py PORT MODE`.

It answers GET /health with 200 and has a child process standing in for vLLM's engine
core (same process group). `POST /fail` makes /health answer 503 from then on (vLLM's
API server after its engine core died); `POST /hang` makes /health never answer.
MODE `exit` exits with code 3 at once (an engine that cannot start), `slow-start` listens
after 1.5 s. Standard library only, so it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time


def serve(port: int, mode: str) -> None:
    if mode == "exit":
        sys.exit(3)
    if mode == "slow-start":
        time.sleep(1.5)
    core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    health = {"state": "ok"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if health["state"] == "hang":
                threading.Event().wait()
            self.send_response(200 if health["state"] == "ok" else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            health["state"] = self.path.strip("/")
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    try:
        server.serve_forever()
    finally:
        core.kill()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
