"""A webhook receiver for the tests: a real HTTP server process on 127.0.0.1.

``python _webhook_receiver.py PORT LOG [STATUS_FILE]``: every POST is appended to
LOG as one JSON line (arrival time, path, headers, body as text); the answer's
status is the integer in STATUS_FILE when it exists (read per request, so a test
can turn a healthy receiver into a failing one), else 200. ``GET /health``
answers 200. Stopped by the test, by PID.
"""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    port, log = int(sys.argv[1]), Path(sys.argv[2])
    status_file = Path(sys.argv[3]) if len(sys.argv) > 3 else None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = 200
            if status_file is not None and status_file.exists():
                status = int(status_file.read_text().strip())
            entry = {
                "t": time.time(),
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body.decode("utf-8"),
                "status": status,
            }
            with log.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
