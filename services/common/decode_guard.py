"""Undecodable request bytes get INVALID_ARGUMENT, not UNKNOWN.

grpcio deserializes a request before any servicer code runs and answers a parse failure with UNKNOWN.
This interceptor moves the parse into the handler, where a failure becomes a clear INVALID_ARGUMENT;
valid requests are parsed exactly once, as before.
"""

from __future__ import annotations

import grpc


async def _parse(parse, raw: bytes, context):
    """The decoded request, or the call aborted with INVALID_ARGUMENT."""
    try:
        return parse(raw)
    except Exception as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid protobuf message: {exc}")


class DecodeGuard(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, serialize = handler.request_deserializer, handler.response_serializer

        async def parsed_stream(raw_requests, context):
            async for raw in raw_requests:
                yield await _parse(parse, raw, context)

        if handler.unary_unary:
            async def unary_unary(raw, context):
                return await handler.unary_unary(await _parse(parse, raw, context), context)
            return grpc.unary_unary_rpc_method_handler(unary_unary, None, serialize)
        if handler.unary_stream:
            async def unary_stream(raw, context):
                async for response in handler.unary_stream(await _parse(parse, raw, context), context):
                    yield response
            return grpc.unary_stream_rpc_method_handler(unary_stream, None, serialize)
        if handler.stream_stream:
            async def stream_stream(raw_requests, context):
                async for response in handler.stream_stream(parsed_stream(raw_requests, context), context):
                    yield response
            return grpc.stream_stream_rpc_method_handler(stream_stream, None, serialize)

        async def stream_unary(raw_requests, context):
            return await handler.stream_unary(parsed_stream(raw_requests, context), context)
        return grpc.stream_unary_rpc_method_handler(stream_unary, None, serialize)
