"""Closed-loop HTTP load generator for ``POST /v1/predict``, run as its own process, loopback only.

``concurrency`` workers each hold one keep-alive connection and send the next request as soon as the previous
answer arrives. Requests that complete inside the measured window (after ``--warmup``, for ``--duration``)
count; everything is bounded by ``--max-requests`` and by a hard wall-clock limit, so a stuck server cannot
hang a benchmark.

Why a hand-written HTTP/1.1 client: on the 2-core machine this project is tuned on, the load generator shares
the CPU with the server it measures, so every microsecond it spends per request is taken from the server and
shows up as lost throughput. httpx costs several hundred microseconds of Python per request, and aiohttp well
over a hundred; this client pre-encodes every request (headers and JSON body) once, writes one ``bytes`` per
request on an ``asyncio.Protocol`` (no stream reader, no per-request task, no ``wait_for``) and parses only the
status line and ``Content-Length``. It runs on uvloop when installed. Its own CPU time is measured with
``resource.getrusage`` over the window and reported, so a reader can see what the client took.

Refuses any host but 127.0.0.1/localhost: this is a benchmark tool, not something to point at other machines.

CLI: ``python -m bench.loadgen --url http://127.0.0.1:8000 --concurrency 64 --duration 30 --warmup 5
--texts texts.json [--inputs-per-request 8] [--json out.json]``; the JSON report goes to stdout (and ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from bench.workload import emit_report, latency_ms, load_texts, make_texts

try:
    import orjson

    def _loads(data: bytes) -> Any:
        return orjson.loads(data)

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover - orjson is a service dependency, so normally present

    def _loads(data: bytes) -> Any:
        return json.loads(data)

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode()


LOOPBACK_HOSTS = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1"}


class NotLoopback(ValueError):
    """The target URL is not plain http on 127.0.0.1/localhost."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go: always an IPv4 loopback address, a port and a path."""

    host: str
    port: int
    path: str


def parse_target(url: str, path: str | None = None) -> Target:
    """Validate ``url`` (http, loopback host) and return the address to connect to.

    ``localhost`` is connected as 127.0.0.1: it may resolve to ::1 first, where the server may not listen.
    """
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise NotLoopback(f"{url!r}: only http:// URLs are supported (got scheme {parts.scheme!r})")
    host = (parts.hostname or "").lower()
    if host not in LOOPBACK_HOSTS:
        raise NotLoopback(f"{url!r}: refusing host {host!r}; the load generator only targets 127.0.0.1/localhost")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise NotLoopback(f"{url!r}: bad port") from exc
    return Target(LOOPBACK_HOSTS[host], port, path or parts.path or "/v1/predict")


def build_requests(
    target: Target, texts: list[str], inputs_per_request: int, top_k: int | None
) -> list[tuple[bytes, int]]:
    """Every request fully encoded once (headers + JSON body), with its number of inputs.

    One input per request is sent as a JSON string (the common single-text call); more as a list of
    consecutive texts, wrapping around the workload.
    """
    head = f"POST {target.path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
    head += "Content-Type: application/json\r\nAccept: application/json\r\n"
    requests: list[tuple[bytes, int]] = []
    for start in range(len(texts)):
        if inputs_per_request == 1:
            inputs: str | list[str] = texts[start]
        else:
            inputs = [texts[(start + j) % len(texts)] for j in range(inputs_per_request)]
        payload: dict[str, Any] = {"inputs": inputs}
        if top_k is not None:
            payload["top_k"] = top_k
        body = _dumps(payload)
        raw = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        requests.append((raw, inputs_per_request))
    return requests


class _Response:
    __slots__ = ("body", "close", "status")

    def __init__(self, status: int, body: bytes, close: bool) -> None:
        self.status, self.body, self.close = status, body, close


def _parse_chunked(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """Decode a chunked body beginning at ``start``; None until it is complete. Returns (body, end)."""
    out = bytearray()
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n", pos)  # trailers are not expected; skip to the final CRLF
            return (bytes(out), end + 2) if end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that carries one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[_Response] | None = None
        self.closed = False

    # -- protocol callbacks ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        response = self._parse()
        if response is not None:
            waiter.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError(f"connection closed before the response ({exc})"))

    # -- client API ------------------------------------------------------------------------------------
    def _parse(self) -> _Response | None:
        buf = self.buf
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        head = bytes(buf[:head_end]).lower()
        status = int(head[9:12])
        body_start = head_end + 4
        close = b"\r\nconnection: close" in head
        marker = head.find(b"\r\ncontent-length:")
        if marker >= 0:
            eol = head.find(b"\r\n", marker + 2)
            length = int(head[marker + 17 : eol if eol >= 0 else len(head)])
            end = body_start + length
            if len(buf) < end:
                return None
            body = bytes(buf[body_start:end])
        elif b"\r\ntransfer-encoding: chunked" in head:
            parsed = _parse_chunked(buf, body_start)
            if parsed is None:
                return None
            body, end = parsed
        else:  # no length: the body runs to the end of the connection (HTTP/1.0 style); not expected here
            if not self.closed:
                return None
            body, end = bytes(buf[body_start:]), len(buf)
            close = True
        del buf[:end]
        return _Response(status, body, close)

    async def request(self, raw: bytes, timeout: float) -> _Response:
        """Send one pre-encoded request and wait for its full response (TimeoutError after ``timeout``)."""
        if self.closed or self.transport is None:
            raise ConnectionError("connection is closed")
        waiter: asyncio.Future[_Response] = self.loop.create_future()
        self.waiter = waiter
        timer = self.loop.call_later(timeout, _expire, waiter)
        self.transport.write(raw)
        try:
            return await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[_Response]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("request timed out"))


@dataclass
class _State:
    """Shared by the workers: what to send next, the window, and what was measured in it."""

    requests: list[tuple[bytes, int]]
    max_requests: int
    t_warm: float
    t_end: float
    validate: bool
    issued: int = 0
    stop: bool = False
    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    measured_inputs: int = 0
    outside_window: int = 0
    last_completion: float = 0.0
    budget_exhausted: asyncio.Event = field(default_factory=asyncio.Event)


def _check_body(body: bytes, n_inputs: int) -> bool:
    """A 200 body must be the documented shape: one non-empty list of {label, score} per input."""
    try:
        data = _loads(body)
        predictions = data["predictions"]
        if len(predictions) != n_inputs:
            return False
        first = predictions[0][0]
        return isinstance(first["label"], str) and isinstance(first["score"], float | int)
    except (ValueError, KeyError, IndexError, TypeError):
        return False


async def _worker(state: _State, target: Target, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
    conn: HttpConnection | None = None
    perf = time.perf_counter
    try:
        while not state.stop:
            if state.issued >= state.max_requests:
                state.budget_exhausted.set()
                return
            raw, n_inputs = state.requests[state.issued % len(state.requests)]
            state.issued += 1
            if conn is None or conn.closed:
                try:
                    _, conn = await loop.create_connection(lambda: HttpConnection(loop), target.host, target.port)
                except OSError as exc:
                    _record_failure(state, perf(), f"connect_error:{type(exc).__name__}")
                    conn = None
                    await asyncio.sleep(0.05)  # do not spin on a server that is down
                    continue
            t0 = perf()
            try:
                response = await conn.request(raw, timeout)
            except TimeoutError:
                _record_failure(state, perf(), "timeout")
                conn.close()
                conn = None
                continue
            except (ConnectionError, OSError):
                _record_failure(state, perf(), "connection_error")
                conn.close()
                conn = None
                await asyncio.sleep(0.01)  # a server that drops connections must not make us spin
                continue
            t1 = perf()
            if state.t_warm <= t1 <= state.t_end:
                if response.status == 200:
                    if state.validate and not _check_body(response.body, n_inputs):
                        state.outcomes["invalid_body"] += 1
                    else:
                        state.outcomes["200"] += 1
                        state.latencies.append(t1 - t0)
                        state.measured_inputs += n_inputs
                else:
                    state.outcomes[str(response.status)] += 1
                state.last_completion = t1
            else:
                state.outside_window += 1
            if response.close:
                conn.close()
                conn = None
    finally:
        if conn is not None:
            conn.close()


def _record_failure(state: _State, now: float, what: str) -> None:
    if state.t_warm <= now <= state.t_end:
        state.outcomes[what] += 1
        state.last_completion = now
    else:
        state.outside_window += 1


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_load(
    target: Target,
    requests: list[tuple[bytes, int]],
    concurrency: int,
    duration: float,
    warmup: float,
    max_requests: int,
    timeout: float,
    validate: bool = True,
) -> dict[str, Any]:
    """Drive the server and return the report (see :func:`summarize`)."""
    loop = asyncio.get_running_loop()
    t_start = time.perf_counter()
    state = _State(requests, max_requests, t_start + warmup, t_start + warmup + duration, validate)
    cpu: dict[str, float] = {}

    def mark(key: str) -> None:
        cpu[key] = _cpu_seconds()
        cpu[key + "_t"] = time.perf_counter()

    loop.call_later(warmup, mark, "start")
    workers = [loop.create_task(_worker(state, target, loop, timeout)) for _ in range(concurrency)]
    all_done: asyncio.Future[list[Any]] = asyncio.gather(*workers, return_exceptions=True)
    budget: asyncio.Future[Any] = loop.create_task(state.budget_exhausted.wait())
    await asyncio.wait([all_done, budget], timeout=warmup + duration, return_when=asyncio.FIRST_COMPLETED)
    mark("end")
    state.stop = True
    budget.cancel()
    # Let in-flight requests finish (they no longer count), bounded; then cancel whatever is left.
    _, pending = await asyncio.wait(workers, timeout=min(timeout, 10.0))
    for task in pending:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    if "start" not in cpu:  # the budget ran out during warm-up: nothing was measured
        cpu["start"], cpu["start_t"] = cpu["end"], cpu["end_t"]
    window_start = cpu["start_t"]
    window_end = min(cpu["end_t"], state.t_end)
    if state.issued >= max_requests and state.last_completion:
        window_end = max(window_start, state.last_completion)
    return summarize(
        state, concurrency, max(window_end - window_start, 1e-9), warmup, cpu["end"] - cpu["start"], requests
    )


def summarize(
    state: _State,
    concurrency: int,
    window: float,
    warmup: float,
    client_cpu: float,
    requests: list[tuple[bytes, int]],
) -> dict[str, Any]:
    """Throughput, latency percentiles (successful responses) and outcomes by status, as JSON-able values."""
    lat = sorted(state.latencies)
    ok = len(lat)
    completed = sum(state.outcomes.values())
    errors = {k: v for k, v in sorted(state.outcomes.items()) if k != "200"}
    latency = latency_ms(lat) if lat else None
    return {
        "concurrency": concurrency,
        "inputs_per_request": requests[0][1],
        "warmup_s": warmup,
        "window_s": window,
        "completed": completed,
        "ok": ok,
        "requests_per_s": ok / window,
        "inputs_per_s": state.measured_inputs / window,
        "completed_per_s": completed / window,
        "latency_ms": latency,
        "errors": errors,
        "error_count": completed - ok,
        "issued": state.issued,
        "outside_window": state.outside_window,
        "client_cpu_s": client_cpu,
        "client_cpu_cores": client_cpu / window,
        "client_cpu_us_per_request": 1e6 * client_cpu / completed if completed else None,
    }


def _install_loop(use_uvloop: bool) -> str:
    if use_uvloop:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            return "uvloop"
        except ImportError:
            pass
    return "asyncio"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL; loopback only")
    parser.add_argument("--path", default=None, help="request path (default /v1/predict)")
    parser.add_argument("--concurrency", "-c", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    parser.add_argument("--max-requests", type=int, default=10_000_000, help="cap on requests sent in all")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    parser.add_argument("--inputs-per-request", type=int, default=1, choices=range(1, 65), metavar="1..64")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--texts", type=Path, help="JSON list of texts (default: the BBC workload)")
    parser.add_argument("--n-texts", type=int, default=2000, help="workload size when --texts is not given")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-validate", action="store_true", help="do not parse 200 response bodies")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0 or args.warmup < 0 or args.max_requests < 1:
        parser.error("concurrency and max-requests must be >= 1, duration > 0, warmup >= 0")
    try:
        target = parse_target(args.url, args.path)
    except NotLoopback as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    texts = load_texts(args.texts) if args.texts else make_texts(args.n_texts, args.seed)
    requests = build_requests(target, texts, args.inputs_per_request, args.top_k)
    loop_name = _install_loop(not args.no_uvloop)
    report = asyncio.run(
        run_load(
            target,
            requests,
            args.concurrency,
            args.duration,
            args.warmup,
            args.max_requests,
            args.timeout,
            validate=not args.no_validate,
        )
    )
    report = {
        "url": f"http://{target.host}:{target.port}{target.path}",
        "event_loop": loop_name,
        "n_texts": len(texts),
        **report,
    }
    emit_report(report, args.json)
    lat = report["latency_ms"] or {}
    print(
        f"loadgen c={args.concurrency} x{args.inputs_per_request}: {report['requests_per_s']:.1f} req/s "
        f"{report['inputs_per_s']:.1f} inputs/s p50={lat.get('p50', float('nan')):.1f}ms "
        f"p99={lat.get('p99', float('nan')):.1f}ms errors={report['errors']} "
        f"client_cpu={report['client_cpu_cores']:.2f} cores",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
