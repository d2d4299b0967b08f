"""One write per response: uvicorn's headers and body leave in one ``write`` instead of two.

uvicorn writes a response's status line and headers when the app sends ``http.response.start`` and the body
with ``http.response.body``: two ``write`` system calls and two TCP segments for every small response. Here the
writes made in one event-loop step are held and leave joined, in a ``call_soon`` callback after the callbacks
already queued. ``close`` flushes first, so ``Connection: close`` replies are never lost; everything else goes to
the real transport.
"""

from __future__ import annotations

import asyncio
from typing import Any


class CoalescingTransport:
    """A transport proxy that joins the writes of one loop step into one ``write`` of the real transport."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():  # a connection lost meanwhile takes its bytes with it
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
