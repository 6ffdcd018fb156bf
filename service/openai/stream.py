"""A streamed OpenAI answer: server-sent events, one `data:` line of JSON per chunk, then `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from aiohttp import web

from engine.request import GenerationEvent
from service.openai.response import ResponseHeader, StreamState, error_response

# (status, code) of an error sent inside a stream, for its span (service/openai/middleware.py)
STREAM_ERROR = web.RequestKey("textgen.stream_error", tuple)


async def stream_answer(
    http_request: web.Request,
    headers: dict[str, str],
    header: ResponseHeader,
    state: StreamState,
    first: GenerationEvent,
    events: AsyncIterator[GenerationEvent],
) -> web.StreamResponse:
    """Send the chunks of `first` and every later event.

    A failure after the status line has gone out (a deadline, an engine fault) is sent as one more event
    holding OpenAI's error body, which the `openai` client raises.
    """
    response = web.StreamResponse(
        headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(http_request)
    try:
        for chunk in state.chunks(header, first):
            await response.write(_event(chunk))
        async for event in events:  # every completion's, interleaved; the iterator ends after the last
            for chunk in state.chunks(header, event):
                await response.write(_event(chunk))
        if state.request.include_usage:
            await response.write(_event(state.usage_chunk(header)))
    except ConnectionResetError:
        raise  # the client went away: nothing more to send
    except Exception as error:  # a grammar over its limits names the body's parameter (admission renamed it)
        answer = error_response(error)
        http_request[STREAM_ERROR] = answer.status, answer.body["error"]["code"]
        await response.write(_event(answer.body))
    await response.write(b"data: [DONE]\n\n")
    return response


def _event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
