"""CoalescingTransport: the writes of one loop step leave as one write of the real transport, in order."""

from __future__ import annotations

import asyncio

from service.frontend.wire import CoalescingTransport


class Recorder:
    """Stands in for the socket transport (the dependency, not the thing under test): records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str) -> str:
        return f"extra:{name}"


def _pair() -> tuple[Recorder, CoalescingTransport]:
    """A recorder and the shim over it, on the running loop."""
    real = Recorder()
    return real, CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]


async def _one_step() -> None:
    await asyncio.sleep(0)  # let the callbacks scheduled so far run


def test_headers_and_body_written_in_one_step_leave_as_one_write() -> None:
    async def main() -> None:
        real, shim = _pair()
        shim.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        shim.write(b"{}")
        assert real.calls == []  # held until the step ends
        await _one_step()
        assert real.calls == [("write", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")]
        shim.write(b"next")  # a later step starts a new write
        await _one_step()
        assert real.calls[-1] == ("write", b"next") and len(real.calls) == 2

    asyncio.run(main())


def test_close_sends_what_is_held_before_closing() -> None:
    async def main() -> None:
        real, shim = _pair()
        shim.write(b"head")
        shim.write(b"body")
        shim.close()
        assert real.calls == [("write", b"headbody"), ("close", b"")]
        await _one_step()  # the scheduled flush finds nothing left to send
        assert len(real.calls) == 2

    asyncio.run(main())


def test_a_connection_closed_meanwhile_gets_no_write_and_other_calls_pass_through() -> None:
    async def main() -> None:
        real, shim = _pair()
        shim.write(b"lost")
        real.closing = True  # the peer went away before the step ended
        await _one_step()
        assert real.calls == []
        assert shim.get_extra_info("peername") == "extra:peername"
        assert shim.is_closing() is True

    asyncio.run(main())
