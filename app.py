"""A Django backend for assistant-ui's useAssistantTransportRuntime, in one file.

The frontend POSTs commands with the state it holds (LangChain-style messages); this file applies them, runs an
agent (a mock, or an OpenAI model when OPENAI_API_KEY is set) and streams every change to the state as it happens.

Usage:
    python app.py                # serve with uvicorn on HOST:PORT (default 127.0.0.1:8002)
    python app.py runserver      # the same, reloading when app.py or .env changes; [addr:]port, --noreload
    uvicorn app:application      # the same app, with uvicorn's own options (--workers, ...)
    python app.py check          # any other Django management command
    path("", include("app"))     # in your own project's urls.py: nothing else to add
"""

import argparse
import asyncio
import bisect
import gc
import inspect
import json
import logging
import os
import re
import sys
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, available_timezones

from asgiref.sync import ThreadSensitiveContext
from assistant_stream import RunController, create_run
from assistant_stream.serialization import AssistantTransportEncoder, DataStreamEncoder
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.exceptions import DisallowedHost
from django.core.management import execute_from_command_line
from django.core.management.commands.runserver import naiveip_re
from django.db import close_old_connections, transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.urls import path
from django.utils.cache import patch_vary_headers
from django.utils.decorators import async_only_middleware
from django.views.decorators.csrf import csrf_exempt
from dotenv import dotenv_values
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, JsonValue, Tag, ValidationError
from pydantic_core import from_json, to_jsonable_python

try:
    import aiohttp  # noqa: F401  (the model client's transport)
    import openai
except ImportError:  # the optional "openai" extra, openai[aiohttp]: only the OpenAI agent needs it
    openai = None  # type: ignore[assignment]

__version__ = "0.4.0"

# --- Configuration: every setting from the environment (or .env), read and checked once -----------
CommaList = Annotated[list[str], BeforeValidator(lambda raw: [item.strip() for item in raw.split(",") if item.strip()])]


class Config(BaseModel):
    """Every setting .env.example documents, with its default."""

    HOST: str = "127.0.0.1"
    PORT: int = Field(8002, gt=0, lt=65536)
    ALLOWED_HOSTS: Annotated[CommaList, Field(min_length=1)] = ["localhost", "127.0.0.1", "[::1]"]
    CORS_ORIGINS: CommaList = ["http://localhost:3000"]
    OPENAI_API_KEY: str = Field("", pattern="^[!-~]*$")  # printable ASCII: it goes into an HTTP header
    OPENAI_MODEL: str = "gpt-4o-mini"
    OPENAI_BASE_URL: str = ""
    OPENAI_TIMEOUT: float = Field(30, gt=0)  # the SDK's own 600 s, tried three times, is half an hour
    OPENAI_MAX_RETRIES: int = Field(1, ge=0, le=10)
    MOCK_DELAY: float = Field(0.05, ge=0, le=60)
    STREAM_PROTOCOL: Literal["data-stream", "assistant-transport"] = "data-stream"
    HEARTBEAT_SECONDS: Annotated[float, Field(ge=1, le=3600)] | Annotated[float, Field(ge=0, le=0)] = 15  # 0: none
    MAX_REQUEST_BYTES: int = Field(10 * 1024 * 1024, gt=0)
    MAX_MODEL_STEPS: int = Field(5, ge=1, le=100)
    TOOL_TIMEOUT: float = Field(30, gt=0)
    TOOL_THREADS: int = Field(4, ge=1, le=100)  # a request's sync tool calls at once, each in a thread
    TOOL_THREADS_TOTAL: int = Field(32, ge=1, le=1000)  # the process's sync tool calls at once
    TOOL_RESULT_LIMIT: int = Field(100_000, gt=0)  # bytes of a tool result's JSON


STANDALONE = not settings.configured  # app.py serves itself; included by a project, it configures nothing
# The environment wins over the .env beside this file (read, not copied); a project's serving settings are its own.
environment = {**dotenv_values(Path(__file__).with_name(".env")), **os.environ}
read = [name for name in Config.model_fields if STANDALONE or name not in ("HOST", "PORT", "ALLOWED_HOSTS")]
values = {name: (environment.get(name) or "").strip() for name in read}
try:  # an empty value means the default
    config = Config.model_validate({name: value for name, value in values.items() if value})
except ValidationError as error:  # one clear line, not a traceback; not the value, which may be a key
    problems = error.errors()
    name = problems[0]["loc"][0]
    message = " or ".join(problem["msg"] for problem in problems if problem["loc"][0] == name)
    raise SystemExit(f"app.py: invalid setting {name}: {message}.") from None
if config.OPENAI_API_KEY and openai is None:
    raise SystemExit("app.py: OPENAI_API_KEY is set, but the openai package is not: pip install 'openai[aiohttp]'")

if STANDALONE:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.configure(  # no built-in middleware: each is sync-first, and takes a thread for every request
        ROOT_URLCONF=__name__, ALLOWED_HOSTS=config.ALLOWED_HOSTS, MIDDLEWARE=[f"{__name__}.cors_middleware"]
    )
    gc.freeze()  # the imported modules live as long as the process: frozen, the collector stops walking them
logger = logging.getLogger("assistant_transport")
MAX_ITEMS = 100  # commands in a request, parts in a message, tool calls in a model's step


# --- Request models: what useAssistantTransportRuntime sends ----------------------------------------
class Part(BaseModel):
    """A part of the user's message: text, or an image as a URL or a data: URL."""

    type: Literal["text", "image"]
    text: str = ""
    image: str = ""


class UserMessage(BaseModel):
    """The message an add-message command carries: the user's text and images."""

    role: Literal["user"]
    id: str | None = None  # sent by newer clients; the human message keeps it unless the thread has it already
    parts: list[Part] = Field(max_length=MAX_ITEMS)  # a million parts stop at once


class AddMessage(BaseModel):
    """Append a user message; a parentId or sourceId naming an earlier message branches (an edit)."""

    type: Literal["add-message"]
    message: UserMessage
    parentId: str | None = None
    sourceId: str | None = None


class AddToolResult(BaseModel):
    """The frontend ran a tool call; its result becomes a tool message."""

    type: Literal["add-tool-result"]
    toolCallId: str
    result: JsonValue = None
    isError: bool = False
    artifact: JsonValue = None
    modelContent: JsonValue = Field(None, serialization_alias="model_content")


def command_type(command: object) -> str | None:
    """Route a command to its model; any other (useAssistantTransportSendCommand's) is kept as it came."""
    kind = command.get("type") if isinstance(command, dict) else None
    if not isinstance(kind, str):
        return None  # no model: a command without a type is a client's bug, refused with a 400
    return kind if kind in ("add-message", "add-tool-result") else "custom"


Command = Annotated[
    Annotated[AddMessage, Tag("add-message")]
    | Annotated[AddToolResult, Tag("add-tool-result")]
    | Annotated[dict[str, JsonValue], Tag("custom")],
    Discriminator(command_type),
]


class StateMessage(BaseModel):
    """A LangChain-style message in the state (human, ai, tool, ...); other fields are kept as sent."""

    model_config = ConfigDict(extra="allow")
    type: str
    id: str | None = None
    content: JsonValue  # text or content blocks; a tool message's result, as the frontend sent it
    tool_calls: list[dict[str, JsonValue]] = []
    tool_call_id: str | None = None


class AgentState(BaseModel):
    """The state the client holds; fields this backend does not know are kept as sent."""

    model_config = ConfigDict(extra="allow")
    messages: list[StateMessage] = []


class AssistantRequest(BaseModel):
    """The POST body. Other fields (threadId, config with its apiKey/baseUrl, ...) are ignored."""

    commands: list[Command] = Field(max_length=MAX_ITEMS)  # the client sends a few; a cap bounds the work
    state: AgentState | None = None
    system: str | None = None
    tools: dict[str, dict[str, JsonValue]] | None = None  # name -> description, parameters, disabled
    callSettings: dict[str, JsonValue] = {}  # maxTokens, temperature, ...: the model server checks them


def parse_object(text: str | bytes | bytearray) -> dict[str, Any]:
    """A JSON object, refusing what the client's strict decoder refuses (NaN, Infinity) and deep nesting."""
    if not isinstance(parsed := from_json(text, allow_inf_nan=False), dict):
        raise ValueError(f"{type(parsed).__name__} where a JSON object belongs")
    return parsed


def json_error(status: int, message: str, details: object = None, **headers: str) -> JsonResponse:
    """The one shape of every error answered before a stream starts."""
    body: dict[str, object] = {"error": message} if details is None else {"error": message, "details": details}
    return JsonResponse(body, status=status, headers=headers)


# --- Middleware: CORS by hand, and the Host check that no built-in middleware does for us ----------
CORS_METHODS = ("GET", "POST", "OPTIONS")


@async_only_middleware
def cors_middleware(get_response: Callable[..., Any]) -> Callable[..., Any]:
    """Check the Host, answer preflights, and put CORS headers on every answer, errors too."""
    if not STANDALONE and get_response not in (assistant, health):  # an older README put it in MIDDLEWARE
        raise SystemExit("app.py: take app.cors_middleware out of MIDDLEWARE; include('app') is all it needs")

    async def middleware(request: HttpRequest) -> HttpResponseBase:
        origin, origins = request.META.get("HTTP_ORIGIN"), config.CORS_ORIGINS
        method = request.META.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD") if request.method == "OPTIONS" else None
        any_origin = "*" in origins
        allowed = origin is not None and (any_origin or origin in origins) and method in (None, *CORS_METHODS)
        response: HttpResponseBase
        try:
            request.get_host()
            if method is None:  # not a preflight
                response = await get_response(request)
            elif allowed:
                response = HttpResponse(status=204, headers={"Access-Control-Max-Age": "600"})
                response["Access-Control-Allow-Methods"] = ", ".join(CORS_METHODS)
                response["Access-Control-Allow-Headers"] = request.META.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "")
            else:  # a refusal carries no Access-Control-Allow-* header at all
                response = json_error(403, f"CORS preflight from {origin} for {method} refused (see CORS_ORIGINS)")
        except DisallowedHost as error:
            response = json_error(400, "Host not allowed (see ALLOWED_HOSTS)", str(error))
        if allowed:  # credentials go only with an origin listed exactly, never with *
            response["Access-Control-Allow-Origin"] = "*" if any_origin else str(origin)
            if not any_origin:
                response["Access-Control-Allow-Credentials"] = "true"
        if not any_origin:
            patch_vary_headers(response, ["Origin"])
        return response

    return middleware


# --- The state: the commands applied to the LangChain messages the client holds ---------------------
Message = dict[str, Any]  # a LangChain-style message, as JSON


def tool_message(call: Message, result: JsonValue, failed: bool) -> Message:
    """The tool message answering a call, holding the result as the tool gave it, so its UI reads it back."""
    message = {"id": uuid.uuid4().hex, "type": "tool", "tool_call_id": call["id"], "name": call["name"]}
    return message | {"content": result, "status": "error" if failed else "success"}


def apply_commands(sent: list[Message], commands: list[Any]) -> list[Message]:
    """The thread after every command, in order; the messages the client sent are not changed."""
    thread: list[Message] = []
    at: dict[tuple[str, object], int] = {}  # where each id's message is: built once, kept right as commands go
    outside_replies: list[int] = []  # the places of the messages that are not ai or tool messages, in order
    reply = ("ai", "tool")  # messages assistant-ui shows in a row as one reply, under the first one's id

    def ids_of(message: Message) -> list[tuple[str, object]]:  # its own id, its calls' ids, the call it answers
        names = [("message", message.get("id")), ("answer", message.get("tool_call_id"))]
        names += [("call", call.get("id")) for call in message.get("tool_calls", [])]
        return [(kind, name) for kind, name in names if isinstance(name, str)]  # a client may write anything

    def append(message: Message) -> None:
        at.update(dict.fromkeys(ids_of(message), len(thread)))
        if message["type"] not in reply:
            outside_replies.append(len(thread))
        thread.append(message)

    def cut(end: int) -> None:  # drop the messages from this place on, and what the index holds of them
        for message in thread[end:]:
            for name in ids_of(message):
                at.pop(name, None)  # an id the client repeated went with the first message cut
        del outside_replies[bisect.bisect_left(outside_replies, end) :]
        del thread[end:]

    for message in sent:
        append(message)
    for command in commands:
        if isinstance(command, AddMessage):  # after its parent, if it names one: an edit drops what followed
            if (parent := at.get(("message", command.parentId))) is not None:
                end = parent + 1
                if thread[parent]["type"] in reply:  # the cut goes after the whole reply the parent is part of
                    later = bisect.bisect_right(outside_replies, parent)
                    end = outside_replies[later] if later < len(outside_replies) else len(thread)
                cut(end)
            elif (source := at.get(("message", command.sourceId))) is not None:  # the first message, edited
                cut(source)
            content = [
                {"type": "image_url", "image_url": {"url": part.image}}
                if part.type == "image"
                else part.model_dump(exclude={"image"})
                for part in command.message.parts
            ]
            new_id = command.message.id
            if not new_id or ("message", new_id) in at:
                new_id = uuid.uuid4().hex
            append({"id": new_id, "type": "human", "content": content})
        elif isinstance(command, AddToolResult):
            holder = at.get(("call", command.toolCallId))  # the ai message that made the call
            calls = [] if holder is None else thread[holder].get("tool_calls", [])
            call = next((call for call in calls if call.get("id") == command.toolCallId), None)
            if call is None:
                raise LookupError(command.toolCallId)  # the view answers 400: a call no ai message in the state holds
            message = tool_message(call, command.result, command.isError)
            message |= command.model_dump(include={"artifact", "modelContent"}, exclude_none=True, by_alias=True)
            if (answered := at.get(("answer", command.toolCallId))) is None:
                append(message)
            else:  # a retried request's result replaces the first one, under its id, instead of repeating it
                thread[answered] = message | {"id": thread[answered]["id"]}
    return thread


def reply_awaited(thread: list[Message]) -> bool:
    """Whether the agent speaks: a user message is last, or every call of the last ai message has its result."""
    answered = set()
    for message in reversed(thread):
        if message["type"] == "tool":
            answered.add(message.get("tool_call_id"))
        elif message["type"] == "ai":
            return bool(answered) and all(call["id"] in answered for call in message.get("tool_calls", []))
        else:
            return message["type"] == "human" and not answered
    return False


# --- Agents: a mock or an OpenAI model streams chunks; one writer turns them into state operations ---
Chunk = dict[str, Any]  # one chat.completion.chunk of a model's stream, as JSON
REPLY_LIMIT = 200_000  # bytes of JSON all one request writes (text, reasoning, arguments, tool results, all steps)


class ModelError(Exception):
    """The model's answer broke the protocol or a limit; the message is what the user reads."""


def json_size(value: object) -> int:
    """The bytes a value costs in the state's JSON, as the client sends it back: what REPLY_LIMIT counts."""
    return len(json.dumps(value, ensure_ascii=False).encode())


async def write_reply(controller: RunController, chunks: AsyncIterator[Chunk], allowance: int) -> int:
    """Write a model's streamed chunks into a new ai message as they arrive; return the bytes written."""
    messages = controller.state["messages"]
    messages.append({"id": uuid.uuid4().hex, "type": "ai", "content": "", "tool_calls": []})
    ai = len(messages) - 1  # the new message's place: every write goes through it
    written = 0
    stopped = None  # the model's finish_reason, once it gives one
    # The model's index -> (its id, the call's place), which only pair pieces: servers reuse ids and indexes.
    calls: dict[object, tuple[object, int]] = {}

    def append(path: list[str | int], text: str) -> None:
        """Grow a string by append-text, the only way the client's strict decoder lets a string grow."""
        nonlocal written
        written += json_size(text) - 2  # a piece of a string: its quotes are counted once, not per piece
        if written > allowance:
            raise ModelError(f"The reply passed {REPLY_LIMIT} bytes")
        controller.append_state_text(["messages", ai, *path], text)

    async for chunk in chunks:
        if error := chunk.get("error"):  # a model server's error after its 200, inside the stream
            raise ModelError(error.get("message") if isinstance(error, dict) else str(error))
        choice = (chunk.get("choices") or [{}])[0]
        delta = choice.get("delta") or {}
        stopped = choice.get("finish_reason") or stopped
        if reasoning := delta.get("reasoning_content") or delta.get("reasoning"):  # vLLM, DeepSeek; Ollama
            if "additional_kwargs" not in messages[ai]:  # where convertLangChainMessages reads reasoning
                summary = {"type": "reasoning", "summary": [{"type": "summary_text", "text": ""}]}
                messages[ai]["additional_kwargs"] = {"reasoning": summary}
            append(["additional_kwargs", "reasoning", "summary", 0, "text"], reasoning)
        if delta.get("content"):
            append(["content"], delta["content"])
        for piece in delta.get("tool_calls") or []:
            function = piece.get("function") or {}
            index = piece.get("index", 0)
            model_id = piece.get("id") or None  # some servers send "" on the pieces that go on with a call
            if index not in calls or model_id not in (None, calls[index][0]):  # a new index, or a new id: a new call
                if len(messages[ai]["tool_calls"]) == MAX_ITEMS:
                    raise ModelError(f"The model called more than {MAX_ITEMS} tools in one step")
                calls[index] = (model_id, len(messages[ai]["tool_calls"]))
                call: Message = {"id": f"call_{uuid.uuid4().hex}", "name": "", "args": {}, "partial_json": ""}
                messages[ai]["tool_calls"].append(call)
            for key, field in (("name", "name"), ("arguments", "partial_json")):  # both may come in pieces
                if isinstance(function.get(key), str) and function[key]:
                    append(["tool_calls", calls[index][1], field], function[key])
    if stopped in ("length", "content_filter"):  # cut off by the model server: the frontend says so
        messages[ai]["status"] = {"type": "incomplete", "reason": stopped.replace("_", "-")}
    for position, call in enumerate(messages[ai]["tool_calls"]):  # plain values; writes go through the index
        if not call["name"]:
            raise ModelError("The model called a tool without naming it")
        try:  # args once the arguments are complete; small local models may write ones that are not JSON
            messages[ai]["tool_calls"][position]["args"] = storable(parse_object(call["partial_json"] or "{}"))
        except ValueError as error:
            raise ModelError(f"The arguments for {call['name']} are not a JSON object we can keep: {error}") from None
    return written


def storable(value: object, limit: int = REPLY_LIMIT) -> JsonValue:
    """A value as the next request will read it: JSON within limit bytes, lone surrogates replaced, not too deep."""
    text = bytearray()  # built piece by piece, so that a huge value stops at the limit
    for piece in json.JSONEncoder(ensure_ascii=False, allow_nan=False, default=to_jsonable_python).iterencode(value):
        text += piece.encode(errors="replace")
        if len(text) > limit:
            raise ValueError(f"more than {limit} bytes of JSON")
    from_json(b"[" * 64 + text + b"]" * 64)  # it sits deep in the next request, whose parser stops at 200 levels
    return from_json(text)  # type: ignore[no-any-return]


def as_text(value: object) -> str:
    """A value as text: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def text_of(content: JsonValue) -> str:
    """The text of a message's content: a string, or its text blocks joined."""
    blocks = content if isinstance(content, list) else []
    texts = (str(block["text"]) for block in blocks if isinstance(block, dict) and block.get("type") == "text")
    return content if isinstance(content, str) else "".join(texts)


TIME_ZONES = sorted(available_timezones())  # read once: listing them reads the time zone database
PLACE = re.compile(r"\b(?:in|for|at)\s+([A-Z][\w'-]{0,40}(?:\s+[A-Z][\w'-]{0,40}){0,3})")  # "in San Francisco today?"
MOCK_QUOTE = 500  # characters of the user's text (or a tool result) the mock repeats


async def mock_agent(thread: list[Message], request: AssistantRequest) -> AsyncIterator[Chunk]:
    """A scripted model: echo the user; asked the weather or the time, call the tool, then use its result."""
    last, asks = thread[-1], []  # asks: the tools that know the answer, with their arguments
    said = "" if last["type"] == "tool" else text_of(last["content"])
    place = match.group(1) if (match := PLACE.search(said)) else None
    if (request.tools is None or "get_weather" in frontend_tools(request)) and re.search(r"\bweather\b", said, re.I):
        asks.append(("get_weather", {"location": place or "San Francisco"}))
    if re.search(r"\btime\b", said, re.IGNORECASE):  # the zone named after the place, as Asia/Tokyo is; else the place
        zone = next((zone for zone in TIME_ZONES if zone.endswith(f"/{place}".replace(" ", "_"))), place or "UTC")
        asks.append(("get_current_time", {"timezone": zone}))
    reply = f'You said: "{said[:MOCK_QUOTE]}".'
    reply = f"{last['name']} answered: {as_text(last['content'])[:MOCK_QUOTE]}" if last["type"] == "tool" else reply
    deltas: list[Chunk] = [{"content": word} for word in re.findall(r"\s*\S+", reply)]
    for index, (name, arguments) in enumerate(asks):
        pieces = [{"name": name}, *({"arguments": piece} for piece in re.findall(r"\s*\S+", json.dumps(arguments)))]
        deltas += [{"tool_calls": [{"index": index, "function": piece}]} for piece in pieces]
    for delta in deltas:
        await asyncio.sleep(config.MOCK_DELAY)
        yield {"choices": [{"index": 0, "delta": delta}]}


model_client: "openai.AsyncOpenAI | None" = None
if config.OPENAI_API_KEY:  # one client for the process: it keeps its connections to the model server open
    model_client = openai.AsyncOpenAI(
        api_key=config.OPENAI_API_KEY,
        base_url=config.OPENAI_BASE_URL or None,
        timeout=config.OPENAI_TIMEOUT,
        max_retries=config.OPENAI_MAX_RETRIES,
        http_client=openai.DefaultAioHttpClient(),  # not httpx, whose per-read cancel scopes took half the CPU
    )


def model_messages(thread: list[Message], system: str | None) -> list[Any]:
    """The thread as chat-completion messages, one for one, the system prompt first."""
    answered = {message.get("tool_call_id") for message in thread if message["type"] == "tool"}
    result: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for message in thread:
        calls = [call for call in message.get("tool_calls", []) if call["name"]]  # a nameless one failed its step
        if message["type"] == "human":
            result.append({"role": "user", "content": message["content"]})
        elif message["type"] == "ai" and (text_of(message["content"]) or calls):
            result.append({"role": "assistant", "content": text_of(message["content"]) or None})
            for call in calls:  # the parsed args, not partial_json, which a step that failed may have left cut off
                function = {"name": call["name"], "arguments": as_text(call.get("args") or {})}
                result[-1].setdefault("tool_calls", []).append(
                    {"id": call["id"], "type": "function", "function": function}
                )
            unanswered = [call["id"] for call in calls if call["id"] not in answered]  # the chat API refuses those
            result += [{"role": "tool", "tool_call_id": id_, "content": "The tool was not run."} for id_ in unanswered]
        elif message["type"] == "tool":
            # The model reads modelContent (text, or parts with text) when the frontend sent it, else the result.
            content = message.get("model_content", message["content"])
            text = text_of(content) if "model_content" in message and isinstance(content, list) else as_text(content)
            text = f"Error: {text}" if message.get("status") == "error" else text
            result.append({"role": "tool", "tool_call_id": message.get("tool_call_id"), "content": text})
    return result


MODEL_LINE_LIMIT = 1024 * 1024  # bytes of one line of the model's stream
ERROR_LIMIT = 2000  # characters of an error the user reads: a model server's own words may run to megabytes
SAMPLING = ("max_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed")  # callSettings


async def openai_agent(thread: list[Message], request: AssistantRequest) -> AsyncIterator[Chunk]:
    """Stream a chat completion with the frontend's and the server's tools, as the plain chunks the server sends."""
    assert model_client is not None  # openai_agent runs only when OPENAI_API_KEY is set
    sampling = {re.sub("([A-Z])", r"_\1", key).lower(): value for key, value in request.callSettings.items()}
    options: dict[str, Any] = {key: value for key, value in sampling.items() if key in SAMPLING and value is not None}
    offered = {
        name: {key: tool[key] for key in ("description", "parameters") if key in tool}
        for name, tool in frontend_tools(request).items()
    }
    tools: list[Any] = [{"type": "function", "function": {"name": name, **tool}} for name, tool in offered.items()]
    tools += [openai.pydantic_function_tool(model, name=name) for name, (model, _) in SERVER_TOOLS.items()]
    # The body as plain JSON in extra_body (typed, 1,000 messages cost the event loop 340 ms); the raw lines, not its
    # typed chunks (5x the tokens per core). It still brings auth, retries, timeouts, typed errors; leaving closes it.
    body = {"messages": model_messages(thread, request.system), **options} | ({"tools": tools} if tools else {})
    async with model_client.chat.completions.with_streaming_response.create(
        model=config.OPENAI_MODEL, messages=[], stream=True, extra_body=body
    ) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            raise ModelError(f"The model server answered {response.headers.get('content-type')}, not a stream")
        unfinished = bytearray()  # the server-sent events come in pieces of any size: read them line by line
        try:
            async for piece in response.iter_bytes():
                unfinished += piece
                lines: list[bytearray] = []
                if b"\n" in piece:  # split only when a line ends: a long line in small pieces is not split again
                    *lines, unfinished = unfinished.split(b"\n")
                if len(unfinished) > MODEL_LINE_LIMIT:  # a line that never ends is an error, not a leak
                    raise ModelError(f"The model server sent a line over {MODEL_LINE_LIMIT} bytes")
                for line in lines:
                    if line.startswith(b"data:") and (data := line.removeprefix(b"data:").strip()) != b"[DONE]":
                        yield parse_object(data)
        except ModelError:
            raise
        except Exception as error:  # the SDK types errors up to the headers; a timeout after them is the transport's
            raise ModelError(f"{type(error).__name__} while the reply streamed") from error


def describe(error: Exception) -> str:
    """A failed run in words the user can act on, never holding the key; the log keeps the whole error."""
    text = "The assistant failed while replying. The server log has the details."
    if openai is not None and isinstance(error, openai.APIStatusError):  # the server's words: a bad key, a limit
        detail = error.body.get("message") if isinstance(error.body, dict) else None
        text = f"The model server answered {error.status_code}: {detail or error.message}"
    elif isinstance(error, ModelError) or (openai is not None and isinstance(error, openai.APIError)):
        cause = str(error.__cause__ or "")  # the transport's words: on aiohttp a refused connection "timed out"
        text = f"The model request failed: {error}" + (f" ({cause})" if cause else "")
    if config.OPENAI_API_KEY:  # a model server or a proxy may quote the Authorization header it was sent
        text = text.replace(config.OPENAI_API_KEY, "[OPENAI_API_KEY]")
    return text[:ERROR_LIMIT].encode(errors="replace").decode()  # a lone surrogate as "?": JSON refuses them


run_agent = openai_agent if model_client else mock_agent  # the agent every run uses
ENCODER = AssistantTransportEncoder() if config.STREAM_PROTOCOL == "assistant-transport" else DataStreamEncoder()


# --- Server tools: your Python functions, which the model may call and this backend runs -----------
class CurrentTime(BaseModel):
    """Get the current date and time in a time zone."""

    timezone: str = Field(description="An IANA time zone name, such as Asia/Tokyo or Europe/Paris")


def get_current_time(arguments: CurrentTime) -> dict[str, str]:
    """The date and time now in a time zone; for a zone that does not exist, the model reads what ZoneInfo raised."""
    now = datetime.now(ZoneInfo(arguments.timezone))
    return {"timezone": arguments.timezone, "time": now.isoformat(timespec="seconds"), "weekday": now.strftime("%A")}


# Each tool: the model of its arguments (its docstring is what the model reads) and a sync or async function.
SERVER_TOOLS: dict[str, tuple[type[BaseModel], Any]] = {"get_current_time": (CurrentTime, get_current_time)}
TOOL_SLOTS = asyncio.Semaphore(config.TOOL_THREADS_TOTAL)  # a call left behind keeps its place till it returns


async def run_sync_tool(function: Callable[[Any], object], arguments: BaseModel) -> JsonValue:
    """Call a sync tool, make its result JSON and close its database connection, in a daemon thread (not waited for)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[JsonValue | BaseException] = loop.create_future()

    def work() -> None:
        try:
            outcome: JsonValue | BaseException = storable(function(arguments), config.TOOL_RESULT_LIMIT)
        except BaseException as error:  # raised below; no traceback, whose frames would hold the result
            outcome = error.with_traceback(None)
        finally:
            close_old_connections()
        loop.call_soon_threadsafe(finish, outcome)

    def finish(outcome: JsonValue | BaseException) -> None:  # back on the event loop: the thread is done
        TOOL_SLOTS.release()
        if not answer.done():  # unless its caller gave up on it
            answer.set_result(outcome)

    await TOOL_SLOTS.acquire()
    threading.Thread(target=work, name="server-tool", daemon=True).start()
    if isinstance(outcome := await answer, BaseException):
        raise outcome
    return outcome


async def run_server_tool(call: Message, request_threads: asyncio.Semaphore) -> tuple[JsonValue, bool]:
    """A server tool's result, and whether it failed: whatever it raised."""
    arguments_model, function = SERVER_TOOLS[call["name"]]
    try:
        arguments = arguments_model.model_validate(call["args"])
        if inspect.iscoroutinefunction(function):
            return storable(await function(arguments), config.TOOL_RESULT_LIMIT), False
        async with request_threads:  # a call left behind at TOOL_TIMEOUT counts no more here, only in TOOL_SLOTS
            return await run_sync_tool(function, arguments), False
    except BaseException as error:  # SystemExit (argparse) and KeyboardInterrupt too: they must not end the server
        if (task := asyncio.current_task()) and task.cancelling():  # not the tool's: left behind, or the client gone
            raise
        failure = f"{call['name']} failed: {type(error).__name__}: {error}"
        return failure.encode(errors="replace").decode(), True  # a lone surrogate (a path, say) as "?", as above


async def run_server_tools(controller: RunController, allowance: int, request_threads: asyncio.Semaphore) -> int:
    """Run the server tools the last reply calls, side by side, answer each with a tool message; return their size."""
    calls = [call for call in controller.state["messages"][-1]["tool_calls"] if call["name"] in SERVER_TOOLS]
    # Each a task of its own: one past TOOL_TIMEOUT is left behind even if it ignores cancellation.
    running = [asyncio.create_task(run_server_tool(call, request_threads)) for call in calls]
    try:
        await asyncio.wait(running, timeout=config.TOOL_TIMEOUT) if running else None
    finally:  # the run's own cancellation reaches the tools; a sync tool's thread cannot be stopped, and runs on
        for task in running:
            task.cancel()  # nothing once it has finished
    written = 0
    late = f"did not finish within TOOL_TIMEOUT ({config.TOOL_TIMEOUT:g} seconds)"
    for call, task in zip(calls, running, strict=True):
        result, failed = task.result() if task.done() else (f"{call['name']} {late}", True)
        if written + json_size(result) > allowance:  # counted as what is stored: the error, not the result
            result, failed = f"{call['name']} answered more than the reply may hold ({REPLY_LIMIT} bytes)", True
        written += json_size(result)
        controller.state["messages"].append(tool_message(call, result, failed))
    return written


def frontend_tools(request: AssistantRequest) -> dict[str, dict[str, JsonValue]]:
    """The frontend's tools the model may call: those it sent, less disabled ones and server tools' names."""
    tools = request.tools or {}
    return {name: tool for name, tool in tools.items() if not tool.get("disabled") and name not in SERVER_TOOLS}


# --- The endpoint: parse the body, apply its commands, run the agent, stream the state -------------
async def with_keepalives(stream: AsyncIterator[str]) -> AsyncGenerator[str]:
    """The stream, and a keep-alive line every HEARTBEAT_SECONDS while it lasts, busy or idle alike."""
    lines = asyncio.Queue[str | None]()

    async def read() -> None:  # one task for the whole stream, where add_keepalive made one for every chunk
        try:
            async for line in stream:
                lines.put_nowait(line)
        finally:
            lines.put_nowait(None)  # the end; if the stream failed, awaiting this task raises its error

    async def beat() -> None:  # a line each interval: cheaper than watching every chunk for silence
        while True:
            await asyncio.sleep(config.HEARTBEAT_SECONDS)
            lines.put_nowait(ENCODER.get_keepalive_token())

    reader, beater = asyncio.create_task(read()), asyncio.create_task(beat())  # the stream's two tasks
    try:
        while (line := await lines.get()) is not None:
            yield line
        await reader
    finally:  # finished, failed or the client gone: both tasks end with the stream, and nothing holds its state
        beater.cancel()
        reader.cancel()  # when the client went away, this stops the run, which closes the model request
        del reader, beater  # a traceback may keep this frame (Django 6's TaskGroup): the tasks hold the state


@dataclass
class Closable:
    """The stream, with the close() Django calls when done with a response: left open otherwise, if the client left."""

    stream: AsyncGenerator[str]
    loop: asyncio.AbstractEventLoop

    def __aiter__(self) -> AsyncGenerator[str]:
        return self.stream

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.stream.aclose(), self.loop)


async def assistant(request: HttpRequest) -> HttpResponseBase:
    """POST /assistant: apply the commands to the state the client sent, then stream the agent's changes."""
    if request.method != "POST":
        return json_error(405, "Method not allowed here; use POST", Allow="POST")
    if request.content_type != "application/json":
        return json_error(415, "Send the body as Content-Type: application/json")
    if len(raw_body := request.read(config.MAX_REQUEST_BYTES + 1)) > config.MAX_REQUEST_BYTES:
        return json_error(413, f"Body larger than MAX_REQUEST_BYTES ({config.MAX_REQUEST_BYTES} bytes)")
    try:
        body = AssistantRequest.model_validate(parse_object(raw_body))
        state = body.state.model_dump(exclude_unset=True) if body.state is not None else None
        sent: list[Message] = state.get("messages", []) if state else []
        thread = apply_commands(sent, body.commands)
    except ValidationError as error:  # a body can hold a million mistakes; a few dozen tell what is wrong
        problems = error.errors(include_url=False, include_context=False, include_input=False)
        message = f"Body does not match the request schema: {len(problems)} problem(s), the first 20 listed"
        return json_error(400, message, problems[:20])
    except ValueError as error:  # not JSON, not UTF-8, NaN, nested too deep
        return json_error(400, "Body is not a JSON object", str(error))
    except LookupError as error:  # apply_commands' own, or a call the client wrote without a name
        return json_error(400, "add-tool-result for a tool call that is not in the state", list(error.args))

    async def run(controller: RunController) -> None:
        """Send the new messages; then, while a reply is awaited, the agent takes a step and server tools answer it."""
        if controller.state is None:
            controller.state = {"messages": thread}
        elif "messages" in controller.state and thread[: len(sent)] == sent:  # only what is new goes out
            controller.state["messages"].extend(thread[len(sent) :])
        else:  # an edit cut the thread the client sent
            controller.state["messages"] = thread
        written = 0
        request_threads = asyncio.Semaphore(config.TOOL_THREADS)  # its sync tool calls at once, over all steps
        try:
            for step in range(config.MAX_MODEL_STEPS + 1):
                if thread == sent or not reply_awaited(messages := list(controller.state["messages"])):
                    return  # only custom commands came; or the agent answered in text, or called a frontend tool
                if step == config.MAX_MODEL_STEPS:
                    raise ModelError(f"The model still called tools after {step} steps (MAX_MODEL_STEPS)")
                written += await write_reply(controller, run_agent(messages, body), REPLY_LIMIT - written)
                written += await run_server_tools(controller, REPLY_LIMIT - written, request_threads)
        except Exception as error:  # an error frame, and a stream that still ends cleanly with the conversation
            logger.exception("Run failed")
            message, now = describe(error), list(controller.state["messages"])
            failure = {"type": "incomplete", "reason": "error", "error": message}  # shown where the reply would be
            if replies := [at for at in range(len(thread), len(now)) if now[at]["type"] == "ai"]:
                controller.state["messages"][replies[-1]]["status"] = failure
            controller.add_error(message)

    lines = ENCODER.encode_stream(create_run(run, state=state))
    stream = Closable(with_keepalives(lines) if config.HEARTBEAT_SECONDS else lines, asyncio.get_running_loop())
    # No proxy may cache or buffer the stream (nginx reads X-Accel-Buffering); charset= saves 6% per chunk.
    headers, media_type = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, ENCODER.get_media_type()
    return StreamingHttpResponse(stream, content_type=f"{media_type}; charset=utf-8", charset="utf-8", headers=headers)


# --- Health: what an operator wants to see at a glance, never a secret ------------------------------
async def health(request: HttpRequest) -> HttpResponseBase:
    """GET /health: liveness, and which agent answers."""
    if request.method not in ("GET", "HEAD"):
        return json_error(405, "Method not allowed here; use GET or HEAD", Allow="GET, HEAD")
    agent, model = ("openai", config.OPENAI_MODEL) if model_client else ("mock", None)
    service = {"status": "healthy", "service": "assistant-transport-backend-django", "version": __version__}
    return JsonResponse({**service, "agent": agent, "model": model, "protocol": config.STREAM_PROTOCOL})


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponseBase:
    """JSON for unknown paths when this file serves itself, instead of Django's HTML page."""
    return json_error(404, f"No endpoint at {request.path}; use POST /assistant or GET /health")


# --- URLs and the ASGI application -----------------------------------------------------------------
def own(view: Callable[..., Any]) -> Callable[..., Any]:
    """Inside a project only this file's views pass its CORS, and skip CSRF (CORS guards a cookieless JSON API)."""
    return view if STANDALONE else transaction.non_atomic_requests(csrf_exempt(cors_middleware(view)))


urlpatterns = [path("assistant", own(assistant)), path("health", own(health))]
handler404 = not_found  # used only where this file is the root URLconf

if STANDALONE:  # what app.py's own server needs; a project serves itself with its asgi.py, these untouched
    django_application = get_asgi_application()
    SYNC_WORKER = ThreadPoolExecutor(max_workers=1)  # Django's sync thread a request holds all its stream: share one


async def application(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """The ASGI app: Django with one shared sync worker; uvicorn's start-up and shut-down messages answered."""
    if scope["type"] == "lifespan":  # Django would answer these with an error; it has nothing to start or stop
        await receive()  # lifespan.startup
        agent = f"openai, model {config.OPENAI_MODEL}" if model_client else "mock (no OPENAI_API_KEY)"
        hosts = f"CORS_ORIGINS={','.join(config.CORS_ORIGINS)}; ALLOWED_HOSTS={','.join(config.ALLOWED_HOSTS)}"
        logger.info(f"Agent: {agent}; server tools: {','.join(SERVER_TOOLS)}; {config.STREAM_PROTOCOL}; {hosts}")
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})
    elif scope["type"] == "websocket":  # no endpoint here takes one: refused (403), not a traceback in the log
        await send({"type": "websocket.close"})
    else:
        async with ThreadSensitiveContext(executor=SYNC_WORKER):
            await django_application(scope, receive, send)


# --- main: serve with uvicorn, or run any other Django management command ---------------------------
def main() -> None:
    """Serve with uvicorn (`runserver` too, with reload), or run any other Django management command."""
    if (command := sys.argv[1:2]) not in ([], ["runserver"]):
        execute_from_command_line(sys.argv)
        return
    # Django's runserver, a WSGI server, would hold a stream back until it ends: as Daphne does, use uvicorn.
    parser = argparse.ArgumentParser(f"{sys.argv[0]} runserver", description="Serve app.py with uvicorn.")
    parser.add_argument("addrport", nargs="?", default=str(config.PORT), help="port, or address:port")
    parser.add_argument("--noreload", action="store_true", help="do not reload when app.py or .env changes")
    options = parser.parse_args(sys.argv[2:])
    address = naiveip_re.match(options.addrport)
    if not address or not 0 < int(address["port"]) < 65536:
        parser.error(f"{options.addrport!r} is not a port (1-65535) or an address:port")
    here, host = Path(__file__).resolve(), (address["addr"] or config.HOST).strip("[]")
    uvicorn_command = ["uvicorn", f"{here.stem}:application", f"--app-dir={here.parent}", f"--host={host}"]
    uvicorn_command += [f"--port={address['port']}"]
    if command == ["runserver"] and not options.noreload:
        uvicorn_command += ["--reload", f"--reload-dir={here.parent}", "--reload-exclude=*.py"]
        uvicorn_command += [f"--reload-include={here.name}", "--reload-include=.env"]
    os.execv(sys.executable, [sys.executable, "-m", *uvicorn_command])  # uvicorn's command line, in this process


if __name__ == "__main__":
    main()
