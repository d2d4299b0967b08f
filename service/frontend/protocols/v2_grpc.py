"""KServe v2 gRPC (``inference.GRPCInferenceService``) over the neutral data plane, with grpcio's asyncio server.

The service and message classes are the ones ``tritonclient[grpc]`` ships (``tritonclient.grpc.service_pb2``,
``service_pb2_grpc``, ``model_config_pb2``; a declared service dependency) rather than stubs generated here: they
are exactly the KServe/Triton protocol that Triton's clients and perf_analyzer speak (Triton's extensions
included: ModelConfig, ModelStatistics, the repository RPCs), they are maintained with those clients, and the
build keeps no codegen step or vendored .proto. They carry no type information, hence the narrow
``type: ignore`` on their imports.

Each RPC is decode -> data plane -> encode, like the HTTP routes: ModelInfer takes BYTES ``text`` (and
``text_pair``) in ``raw_input_contents`` or ``contents.bytes_contents`` and builds the same
:class:`~service.frontend.openinference.InferenceRequest` the HTTP transport decodes, so validation and output
encoding are shared; ModelConfig / ModelStatistics / RepositoryIndex parse openinference.py's documents into
their messages. The API key comes as ``authorization: Bearer <key>`` metadata (the admin key for the repository
RPCs), the call's deadline (``context.time_remaining()``) is the request deadline, and every ServeError becomes
its gRPC status code (errors.py's table).

The server listens on the gRPC port (0: off); with several API processes they share it with SO_REUSEPORT, like
the HTTP listener (the supervisor first makes sure no one else listens there), and a single process binds it
alone. It starts and stops with the HTTP server (lifecycle hooks). On SIGTERM it drains as HTTP does:
ServerReady turns false at once, calls are still answered during ``drain_delay_s``, then
``server.stop(drain_timeout_s)`` refuses new calls (UNAVAILABLE) and lets those in flight finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import grpc
from google.protobuf import json_format  # type: ignore[import-untyped]
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service import __version__
from service.config import Settings
from service.core import Call, DataPlane, Timing
from service.errors import BadRequest, DeadlineExceeded, NotFound, NotReady, ServeError
from service.frontend import openinference as oip
from service.frontend.kit import Kit, check_token

log = logging.getLogger("bertserve.grpc")

Message = Any  # a protobuf message of the tritonclient stubs (untyped)
Rpc = Callable[[Message, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]]
Access = Literal["open", "inference", "admin"]  # which key a call needs (open: none, unless auth_all)

# HTTP-equivalent status per outcome, so one alert on bertserve_requests_total{status=~"5.."} covers both
CANCELLED_STATUS = 499
INTERNAL_STATUS = 500


def _param_value(param: Message) -> Any:
    """An InferParameter's value (bool, int64, double, string or uint64), or None when unset."""
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def _params(params: Any) -> dict[str, Any]:
    return {key: _param_value(value) for key, value in params.items()}


def infer_request(request: Message) -> tuple[oip.InferenceRequest, bytes]:
    """A ModelInferRequest as the v2 request record and its binary section (raw inputs, in order)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        params = _params(tensor.parameters)
        data = None
        if raw:
            params["binary_data_size"] = len(raw[i])
        else:  # contents.bytes_contents; any other contents field fails the BYTES datatype check
            data = list(tensor.contents.bytes_contents)
        inputs.append(oip.RequestInput(tensor.name, list(tensor.shape), tensor.datatype, params, data))
    outputs = [
        oip.RequestOutput(out.name, {k: v for k, v in _params(out.parameters).items() if k == "classification"})
        for out in request.outputs
    ]
    req = oip.InferenceRequest(inputs, request.id or None, _params(request.parameters), outputs or None)
    return req, b"".join(raw)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The RPCs; each runs through :meth:`_call` (auth, metrics, the error table)."""

    def __init__(self, settings: Settings, plane: DataPlane, kit: Kit) -> None:
        self.settings = settings
        self.plane = plane
        self.kit = kit

    # -- the shared wrapper -----------------------------------------------------------------------------------
    def _authorize(self, context: grpc.aio.ServicerContext[Any, Any], admin: bool) -> None:
        key = self.settings.admin_key if admin else self.settings.api_key
        if key is None:
            return
        header = ""
        for name, value in context.invocation_metadata() or ():
            if name == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
        check_token(header, key)

    async def _call(
        self, name: str, rpc: Rpc, request: Message, context: grpc.aio.ServicerContext[Any, Any], access: Access
    ) -> Message:
        with self.kit.track(f"grpc:{name}", Timing()) as status:
            try:
                if access != "open" or self.settings.auth_all:
                    self._authorize(context, admin=access == "admin")
                return await rpc(request, context)
            except ServeError as exc:
                status[0] = exc.status
                self.kit.reject(exc.reason)
                for key, value in exc.headers.items():  # Retry-After and friends, as trailing metadata
                    context.set_trailing_metadata(((key.lower(), value),))
                await context.abort(getattr(grpc.StatusCode, exc.grpc), exc.message)
                raise  # not reached: abort raises
            except asyncio.CancelledError:  # the client cancelled or its deadline passed: normal, not an error
                status[0] = CANCELLED_STATUS
                log.debug("grpc:%s cancelled by the client", name)
                raise
            except grpc.aio.AbortError:
                raise
            except Exception:
                status[0] = INTERNAL_STATUS
                log.exception("unhandled error on grpc:%s", name)
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
                raise

    # -- health and metadata ----------------------------------------------------------------------------------
    async def ServerLive(self, request: Message, context: Any) -> Message:
        async def rpc(_: Message, __: Any) -> Message:
            return pb.ServerLiveResponse(live=True)

        return await self._call("ServerLive", rpc, request, context, "open")

    async def ServerReady(self, request: Message, context: Any) -> Message:
        async def rpc(_: Message, __: Any) -> Message:
            return pb.ServerReadyResponse(ready=self.plane.ready)

        return await self._call("ServerReady", rpc, request, context, "open")

    async def ModelReady(self, request: Message, context: Any) -> Message:
        async def rpc(req: Message, _: Any) -> Message:
            try:
                self.plane.model(req.name, req.version or None)
            except (NotFound, NotReady):
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        return await self._call("ModelReady", rpc, request, context, "open")

    async def ServerMetadata(self, request: Message, context: Any) -> Message:
        async def rpc(_: Message, __: Any) -> Message:
            return pb.ServerMetadataResponse(name="bertserve", version=__version__, extensions=list(oip.EXTENSIONS))

        return await self._call("ServerMetadata", rpc, request, context, "open")

    async def ModelMetadata(self, request: Message, context: Any) -> Message:
        async def rpc(req: Message, _: Any) -> Message:
            doc = oip.model_metadata(self.plane.model(req.name, req.version or None))
            tensors = {
                key: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in doc[key]] for key in ("inputs", "outputs")
            }
            return pb.ModelMetadataResponse(
                name=doc["name"], versions=doc["versions"], platform=doc["platform"], **tensors
            )

        return await self._call("ModelMetadata", rpc, request, context, "open")

    async def ModelConfig(self, request: Message, context: Any) -> Message:
        async def rpc(req: Message, _: Any) -> Message:
            doc = oip.model_config(self.plane.model(req.name, req.version or None), self.settings)
            config = json_format.ParseDict(doc, model_config_pb2.ModelConfig(), ignore_unknown_fields=True)
            return pb.ModelConfigResponse(config=config)

        return await self._call("ModelConfig", rpc, request, context, "open")

    async def ModelStatistics(self, request: Message, context: Any) -> Message:
        async def rpc(req: Message, _: Any) -> Message:
            doc = oip.statistics(await self.plane.statistics(req.name or None, req.version or None))
            return json_format.ParseDict(doc, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

        return await self._call("ModelStatistics", rpc, request, context, "open")

    # -- the repository extension (admin key) ----------------------------------------------------------------
    async def RepositoryIndex(self, request: Message, context: Any) -> Message:
        async def rpc(req: Message, _: Any) -> Message:
            rows = oip.repository_index(await self.plane.repository_index(bool(req.ready)))
            return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

        return await self._call("RepositoryIndex", rpc, request, context, "admin")

    async def RepositoryModelLoad(self, request: Message, context: Any) -> Message:
        async def rpc(req: Message, _: Any) -> Message:
            await self.plane.load(req.model_name)
            return pb.RepositoryModelLoadResponse()

        return await self._call("RepositoryModelLoad", rpc, request, context, "admin")

    async def RepositoryModelUnload(self, request: Message, context: Any) -> Message:
        async def rpc(req: Message, _: Any) -> Message:
            await self.plane.unload(req.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._call("RepositoryModelUnload", rpc, request, context, "admin")

    # -- inference --------------------------------------------------------------------------------------------
    async def ModelInfer(self, request: Message, context: Any) -> Message:
        return await self._call("ModelInfer", self._infer, request, context, "inference")

    async def _infer(self, request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        call = Call(gone=context.cancelled)
        view = self.plane.model(request.model_name, request.model_version or None)
        req, binary = infer_request(request)
        texts, pairs = oip.parse_inputs(req, binary, view)
        requested = oip.requested_outputs(req)
        truncate, timeout = oip.infer_options(req)
        remaining = context.time_remaining()
        if remaining is not None:
            if remaining <= 0:
                raise DeadlineExceeded("the call's deadline passed before it was computed")
            timeout = remaining if timeout is None else min(timeout, remaining)
        result = await self.plane.infer(view, texts, pairs, call, truncate=truncate, timeout_s=timeout)
        header, chunks = oip.encode_outputs(req, result, requested, binary_default=True)
        response = pb.ModelInferResponse(model_name=view.name, model_version=view.version, id=request.id)
        offset = 0
        for tensor in header["outputs"]:
            size = tensor["parameters"]["binary_data_size"]
            response.outputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
            response.raw_output_contents.append(chunks[offset : offset + size])
            offset += size
        context.set_trailing_metadata(tuple((k.decode(), v.decode()) for k, v in call.timing.headers("grpc")[1:]))
        return response


class GrpcServer:
    """The gRPC server's start and stop, for the lifecycle (nothing when the gRPC port is 0)."""

    def __init__(self, settings: Settings, plane: DataPlane, kit: Kit) -> None:
        self.settings, self.plane, self.kit = settings, plane, kit
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        settings = self.settings
        server = grpc.aio.server(
            options=[
                # several API processes share the port; a lone process must fail on a port in use
                ("grpc.so_reuseport", 1 if settings.api_workers > 1 else 0),
                ("grpc.max_receive_message_length", settings.max_body_bytes),  # larger requests: RESOURCE_EXHAUSTED
                ("grpc.max_send_message_length", 64 << 20),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(settings, self.plane, self.kit), server)
        address = f"{settings.host}:{settings.grpc_listen_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            port, reason = 0, str(exc)
        else:
            reason = "bind failed (address already in use?)"
        if not port:
            raise RuntimeError(f"cannot serve gRPC on {address}: {reason} (set BERTSERVE_GRPC_PORT=0 to turn it off)")
        await server.start()
        self.server = server
        log.info("gRPC (KServe v2) listening on %s", address)

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.stop(self.settings.drain_timeout_s)
