"""A local OTLP/HTTP trace sink: accepts ``POST /v1/traces`` and counts what arrives, for measuring tracing's cost.

Run it, then start the service with ``OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:PORT`` (tracing is off
otherwise) and load it as usual: the difference against the same load without the variable is what tracing costs.
Loopback only; it stops on Ctrl-C or SIGTERM and prints the requests and bytes it received.

CLI: ``python -m bench.otlp_sink --port 4318``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType


class Sink(BaseHTTPRequestHandler):
    received = 0
    bytes = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        with Sink.lock:
            Sink.received += 1
            Sink.bytes += len(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_sink", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Sink)

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    print(f"otlp sink: {Sink.received} exports, {Sink.bytes} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
