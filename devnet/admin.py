"""A tiny JSON-over-gRPC side channel: `/devnet.Admin/Call`.

The simulators serve it next to their CITA-Cloud services so that the devnet
command, tests and peer controllers (block sync) can ask and steer them:
`{"op": "...", ...}` in, a JSON object out. It is devnet-private; nothing of
CITA-Cloud uses it.
"""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import grpc

METHOD = "/devnet.Admin/Call"


def _dumps(obj) -> bytes:
    return json.dumps(obj).encode()


def _loads(raw: bytes):
    return json.loads(raw.decode()) if raw else {}


def aio_handler(dispatch: Callable[[dict], Awaitable[dict]]) -> grpc.GenericRpcHandler:
    """A generic handler for a grpc.aio server; `dispatch` gets the request dict."""

    async def call(request: dict, context) -> dict:
        try:
            return await dispatch(request)
        except (KeyError, ValueError, TypeError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad admin request {request}: {e}")

    return grpc.method_handlers_generic_handler("devnet.Admin", {
        "Call": grpc.unary_unary_rpc_method_handler(call, request_deserializer=_loads,
                                                    response_serializer=_dumps)})


def call(port: int, request: dict, timeout: float = 3.0) -> dict:
    """Blocking admin call to 127.0.0.1:port (raises grpc.RpcError on failure)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = ch.unary_unary(METHOD, request_serializer=_dumps, response_deserializer=_loads)
        return stub(request, timeout=timeout)


def aio_stub(channel: grpc.aio.Channel):
    """An async admin callable on an existing grpc.aio channel."""
    return channel.unary_unary(METHOD, request_serializer=_dumps, response_deserializer=_loads)
