"""One API process: the whole HTTP (+ gRPC) front end over a :class:`~service.ipc.client.RemoteEngine`, on the
listening socket it shares with the other API processes (SO_REUSEPORT)."""

from __future__ import annotations

import socket
import sys
from typing import Any

from service.core import DataPlane
from service.frontend.lifecycle import GATE
from service.frontend.server import serve
from service.ipc.child import settings_for_child
from service.ipc.client import RemoteEngine
from service.metrics import Metrics
from service.tracing import setup_tracing


def reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(settings_dump: dict[str, Any], path: str, index: int, parent: int) -> None:
    settings = settings_for_child(settings_dump, parent)
    metrics = Metrics()
    plane = DataPlane(settings, RemoteEngine(path, index), metrics)
    GATE.barrier = plane.drain_barrier  # connections close only once every API process's listener has
    sock = reuseport_socket(settings.host, settings.port)
    sys.exit(serve(settings, plane, metrics, setup_tracing(), sockets=[sock]))
