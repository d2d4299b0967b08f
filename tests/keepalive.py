"""A keep-alive HTTP client for drain tests (integration and container suites share it).

One client owns one connection and POSTs until the server says ``Connection: close``, then reconnects; it stops
at the first refused connect (the listener closed: expected during a drain) or the first loss: a request that
could not be sent on an open connection, or that was sent and never answered, or answered with a non-200.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Mapping


class KeepAliveClient(threading.Thread):
    """One client on one keep-alive connection, POSTing until the server closes it; records what went wrong."""

    def __init__(
        self,
        port: int,
        body: bytes,
        path: str = "/v1/predict",
        headers: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.body, self.path = host, port, body, path
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.answered = 0
        self.errors: list[str] = []
        self.refused = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        while True:
            try:
                conn.request("POST", self.path, body=self.body, headers=self.headers)
            except ConnectionRefusedError:  # a new connect after the listener closed: fine
                self.refused += 1
                return
            except OSError as exc:  # the request could not be sent on an open connection: a loss
                self.errors.append(f"send: {type(exc).__name__}: {exc}")
                return
            try:
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:  # sent, never answered: a loss
                self.errors.append(f"answer: {type(exc).__name__}: {exc}")
                return
            if response.status != 200:
                self.errors.append(f"status {response.status}")
                return
            self.answered += 1
            if response.getheader("connection", "").lower() == "close":
                conn.close()  # the server said so; the next request opens a new connection
