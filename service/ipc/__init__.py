"""Several API processes, one engine process per device, and the messages between them.

Why (after vLLM's API servers): at thousands of requests/s the per-request Python work (HTTP, validation,
tokenizing) fills one core long before an accelerator is busy. ``api_workers`` > 1 runs that work in N
processes, which share the HTTP and gRPC ports with SO_REUSEPORT (the kernel spreads connections evenly), and
sends token ids to ONE engine process per device that owns the batchers and the ONNX Runtime sessions, so
batches still form from all traffic.

- ``codec``: the messages, typed (msgspec Structs over msgpack: decoding runs no code, unlike pickle).
- ``server``: the engine process's loop (requests in from every API process, results back).
- ``client``: :class:`~service.ipc.client.RemoteEngine`, the engine as an API process sees it.
- ``engine_process`` / ``api``: the two process mains; ``supervisor``: starts them, forwards signals, stops
  everything when one dies.

Transport: pyzmq (a well-kept library, vLLM's choice): each API process has a DEALER socket connected to the
engine's ROUTER over an ``ipc://`` socket in a private (0700) temporary directory. Requests that arrive in the
same event-loop iteration travel in one message, and so do the results that finish together, so the IPC cost is
per scheduling round, not per request. Importing this package imports nothing: the supervisor stays small, and
only the engine process loads ONNX Runtime.
"""
