"""A Django backend for assistant-ui's useAssistantTransportRuntime, in one file.

The frontend POSTs commands (a new message, a tool result) with the state it holds: LangChain-style
messages, which assistant-ui's example reads with convertLangChainMessages. This file applies the
commands, runs an agent, and streams every change to the state back as it happens.

Usage:
    python app.py                # serve with uvicorn on HOST:PORT (default 127.0.0.1:8002)
    python app.py runserver      # the same, reloading when app.py changes; [addr:]port, --noreload
    uvicorn app:application      # the same app, with uvicorn's own options (--workers, ...)
    python app.py check          # any other Django management command

Your own Python functions can serve the model too: see "Server tools" below.
"""

import argparse
import asyncio
import gc
import inspect
import json
import logging
import math
import os
import re
import secrets
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, available_timezones

import uvicorn
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from assistant_stream import RunController, create_run
from assistant_stream.assistant_stream_chunk import UpdateStateChunk
from assistant_stream.serialization import AssistantTransportEncoder, DataStreamEncoder
from assistant_stream.serialization.heartbeat import add_keepalive
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.exceptions import DisallowedHost, RequestDataTooBig
from django.core.management import execute_from_command_line
from django.core.management.commands.runserver import naiveip_re
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, reset_queries
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponse, HttpResponseBase
from django.urls import path, re_path
from django.utils.cache import patch_vary_headers
from django.utils.decorators import async_only_middleware
from dotenv import load_dotenv
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, JsonValue, Tag, ValidationError
from pydantic_core import to_jsonable_python

try:
    import openai
except ImportError:  # the optional "openai" extra: only the OpenAI agent needs it
    openai = None  # type: ignore[assignment]

__version__ = "0.2.0"

# --- Settings: from the environment (and .env), checked once, then handed to Django ---------

load_dotenv()
CommaList = Annotated[list[str], BeforeValidator(lambda raw: [item.strip() for item in raw.split(",") if item.strip()])]


class Environment(BaseModel):
    """Every setting .env.example documents, with its default."""

    HOST: str = "127.0.0.1"
    PORT: int = Field(8002, gt=0, lt=65536)
    DEBUG: bool = False
    SECRET_KEY: str = Field(default_factory=lambda: secrets.token_urlsafe(40))  # nothing is signed yet
    ALLOWED_HOSTS: CommaList = ["localhost", "127.0.0.1", "[::1]"]
    CORS_ORIGINS: CommaList = ["http://localhost:3000"]
    LOG_LEVEL: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(str.upper)] = "INFO"
    MOCK_DELAY: float = Field(0.05, ge=0, le=60)
    # data-stream lines (the client's default), or SSE for a frontend made with protocol: "assistant-transport"
    STREAM_PROTOCOL: Literal["data-stream", "assistant-transport"] = "data-stream"
    HEARTBEAT_SECONDS: float = Field(15, ge=0, le=3600)
    OPENAI_API_KEY: str = ""
    OPENAI_MODEL: str = "gpt-4o-mini"
    OPENAI_BASE_URL: str = ""
    # The model request's time limit (seconds to connect, and between two reads) and retries: the SDK's
    # own 600 s and 2 retries let a hung model server keep a user waiting half an hour.
    OPENAI_TIMEOUT: float = Field(30, gt=0)
    OPENAI_MAX_RETRIES: int = Field(1, ge=0, le=10)
    # Model calls one request may make while server tools answer, and seconds one server tool may take.
    MAX_MODEL_STEPS: int = Field(5, ge=1, le=100)
    TOOL_TIMEOUT: float = Field(30, gt=0)
    MAX_REQUEST_BYTES: int = Field(10 * 1024 * 1024, gt=0)
    # For `python app.py`: connections served at once (past it, 503), seconds an idle connection is
    # kept, and the proxies whose X-Forwarded-For is believed (none, unless you name yours).
    LIMIT_CONCURRENCY: int = Field(4000, gt=0)
    TIMEOUT_KEEP_ALIVE: int = Field(5, gt=0)
    FORWARDED_ALLOW_IPS: CommaList = []


raw = {name: os.environ[name].strip() for name in Environment.model_fields if os.environ.get(name, "").strip()}
try:
    env = Environment.model_validate(raw)
except ValidationError as error:  # one clear line, not a traceback
    name, message = error.errors()[0]["loc"][0], error.errors()[0]["msg"]
    raise SystemExit(f"Invalid setting {name}={raw[str(name)]!r}: {message}.") from None
if env.OPENAI_API_KEY and openai is None:
    raise SystemExit("OPENAI_API_KEY is set, but the openai package is not installed: pip install openai")

logging.basicConfig(level=env.LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logger = logging.getLogger("assistant_transport")

settings.configure(
    **env.model_dump(),  # the code below reads them as Django settings: settings.MOCK_DELAY, ...
    ROOT_URLCONF=__name__,
    # No built-in middleware: each is sync-first and would move every request to a thread.
    MIDDLEWARE=[f"{__name__}.cors_middleware"],
    DATA_UPLOAD_MAX_MEMORY_SIZE=env.MAX_REQUEST_BYTES,
    LOGGING_CONFIG=None,  # logging is configured above, once
)
# The wire format's encoder. Encoders keep no state, so one serves every request.
ENCODER = AssistantTransportEncoder() if settings.STREAM_PROTOCOL == "assistant-transport" else DataStreamEncoder()

# --- Request models: what useAssistantTransportRuntime sends ---------------------------


class TextPart(BaseModel):
    """Text the user typed."""

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    """An image the user attached, as a URL or a data: URL."""

    type: Literal["image"]
    image: str


class UserMessage(BaseModel):
    """The message an add-message command carries: the user's text and images."""

    role: Literal["user"]
    # A cap far above what a message holds lets Pydantic stop at once on a body of a million parts.
    parts: list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] = Field(max_length=100)


class AddMessage(BaseModel):
    """Append a user message; a parentId or sourceId naming an earlier message branches (edit)."""

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
    modelContent: JsonValue = None


class CustomCommand(BaseModel):
    """Any other command, from useAssistantTransportSendCommand; the agents ignore it."""

    model_config = ConfigDict(extra="allow")
    type: str


def command_type(command: object) -> str:
    """Route a command to its model; unknown types are custom commands, not errors."""
    kind = command.get("type") if isinstance(command, dict) else None
    return kind if kind in ("add-message", "add-tool-result") else "custom"


Command = Annotated[
    Annotated[AddMessage, Tag("add-message")]
    | Annotated[AddToolResult, Tag("add-tool-result")]
    | Annotated[CustomCommand, Tag("custom")],
    Discriminator(command_type),
]


class ToolCall(BaseModel):
    """A tool call on an ai message in the state."""

    model_config = ConfigDict(extra="allow")
    id: str
    name: str


class StateMessage(BaseModel):
    """A LangChain-style message in the state (human, ai, tool, ...); other fields are kept as sent."""

    model_config = ConfigDict(extra="allow")
    type: str
    id: str | None = None
    content: JsonValue  # text or content blocks; a tool message's result, as the frontend sent it
    tool_calls: list[ToolCall] = Field([], max_length=100)
    tool_call_id: str | None = None


class AgentState(BaseModel):
    """The state the client holds; fields this backend does not know are kept as sent."""

    model_config = ConfigDict(extra="allow")
    messages: list[StateMessage] = []


class ToolDefinition(BaseModel):
    """A frontend tool the model may call."""

    description: str | None = None
    parameters: dict[str, JsonValue] = {}
    disabled: bool = False


class CallSettings(BaseModel):
    """Sampling settings from the frontend's model context, by their OpenAI names once dumped."""

    max_tokens: int | None = Field(None, alias="maxTokens", gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, alias="topP", ge=0, le=1)
    presence_penalty: float | None = Field(None, alias="presencePenalty", ge=-2, le=2)
    frequency_penalty: float | None = Field(None, alias="frequencyPenalty", ge=-2, le=2)
    seed: int | None = None


class AssistantRequest(BaseModel):
    """The POST body. Other fields (threadId, config with its apiKey/baseUrl, ...) are ignored."""

    # The client flushes a few queued commands at a time; a cap keeps one body from holding the loop.
    commands: list[Command] = Field(max_length=100)
    state: AgentState | None = None
    system: str | None = None
    tools: dict[str, ToolDefinition] | None = None
    callSettings: CallSettings | None = None


def json_error(status: int, message: str, details: object = None) -> JsonResponse:
    """The one shape of every error answered before a stream starts."""
    body: dict[str, object] = {"error": message} if details is None else {"error": message, "details": details}
    return JsonResponse(body, status=status)


# --- CORS, and the Host check no built-in middleware does for us -----------------------

ANY_ORIGIN = "*" in settings.CORS_ORIGINS
View = Callable[[HttpRequest], Coroutine[Any, Any, HttpResponseBase]]
CORS_METHODS = ("GET", "POST", "OPTIONS")


@async_only_middleware
def cors_middleware(get_response: View) -> View:
    """Check the Host, answer preflights, and put CORS headers on every answer, errors too."""

    async def middleware(request: HttpRequest) -> HttpResponseBase:
        origin = request.META.get("HTTP_ORIGIN")  # request.headers would build a dict of every header
        origin_allowed = origin is not None and (ANY_ORIGIN or origin in settings.CORS_ORIGINS)
        preflight_method = request.META.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD")
        response: HttpResponseBase
        try:
            request.get_host()
        except DisallowedHost as error:
            logger.warning("%s", error)
            response = json_error(400, "Host not allowed (see ALLOWED_HOSTS)")
        else:
            if request.method != "OPTIONS" or preflight_method is None:
                response = await get_response(request)
            elif origin_allowed and preflight_method in CORS_METHODS:
                response = HttpResponse(status=204)
                response["Access-Control-Allow-Methods"] = ", ".join(CORS_METHODS)
                response["Access-Control-Allow-Headers"] = request.META.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "")
                response["Access-Control-Max-Age"] = "600"
            else:  # a refusal carries no Access-Control-Allow-* header at all
                logger.warning("CORS preflight from %s for %s refused: see CORS_ORIGINS", origin, preflight_method)
                origin_allowed = False
                response = json_error(403, "CORS preflight refused: origin or method not allowed")
        if origin_allowed:
            # Never reflect an origin together with credentials unless it was listed exactly.
            response["Access-Control-Allow-Origin"] = "*" if ANY_ORIGIN else str(origin)
            if not ANY_ORIGIN:
                response["Access-Control-Allow-Credentials"] = "true"
        if not ANY_ORIGIN:
            patch_vary_headers(response, ["Origin"])
        return response

    return middleware


# --- The thread: the commands applied to the messages the client sent -------------------

Message = dict[str, Any]  # a LangChain-style message, as JSON
Chunk = dict[str, Any]  # one chat.completion.chunk of a model's stream, as JSON


class UnknownToolCallError(LookupError):
    """An add-tool-result names a tool call that no ai message in the thread holds."""


def tool_message(call: Message, result: JsonValue, failed: bool) -> Message:
    """The tool message answering a call, holding the result as the tool gave it, so its UI reads it back."""
    message = {"id": uuid.uuid4().hex, "type": "tool", "tool_call_id": call["id"], "name": call["name"]}
    return message | {"content": result, "status": "error" if failed else "success"}


def apply_commands(sent: list[Message], commands: list[AddMessage | AddToolResult | CustomCommand]) -> list[Message]:
    """The thread after every command, in order; the messages the client sent are not changed."""
    thread = list(sent)
    for command in commands:
        if isinstance(command, AddMessage):
            ids = [message.get("id") for message in thread]
            # A message follows its parent: anything after the parent is an older branch (an edit).
            # assistant-ui shows an ai message and the tool and ai messages after it as one message
            # with the first one's id, so that parent ends where that run of messages ends.
            if command.parentId is not None and command.parentId in ids:
                end = ids.index(command.parentId) + 1
                while end < len(thread) and {thread[end - 1]["type"], thread[end]["type"]} <= {"ai", "tool"}:
                    end += 1
                del thread[end:]
            elif command.sourceId is not None and command.sourceId in ids:  # the first message, edited
                del thread[ids.index(command.sourceId) :]
            content: list[dict[str, Any]] = [
                {"type": "text", "text": part.text}
                if isinstance(part, TextPart)
                else {"type": "image_url", "image_url": {"url": part.image}}
                for part in command.message.parts
            ]
            thread.append({"id": uuid.uuid4().hex, "type": "human", "content": content})
        elif isinstance(command, AddToolResult):
            calls = {call["id"]: call for message in thread for call in message.get("tool_calls", [])}
            if command.toolCallId not in calls:
                raise UnknownToolCallError(command.toolCallId)
            message = tool_message(calls[command.toolCallId], command.result, command.isError)
            extras = {"artifact": command.artifact, "model_content": command.modelContent}
            message |= {key: value for key, value in extras.items() if value is not None}
            earlier = [i for i, existing in enumerate(thread) if existing.get("tool_call_id") == command.toolCallId]
            if earlier:  # a retried request: the result replaces the first instead of repeating it
                thread[earlier[0]] = message
            else:
                thread.append(message)
    return thread


RESERVED_KEYS = {"__proto__", "constructor", "prototype"}


def undecodable(value: object) -> str | None:
    """What in a value the client's strict decoder would refuse, dropping the whole line with it."""
    # JSON has no NaN or Infinity (Python writes them anyway); the keys guard against prototype pollution.
    if isinstance(value, float) and not math.isfinite(value):
        return f"the number {value}"
    if isinstance(value, dict):
        if reserved := RESERVED_KEYS & value.keys():
            return f"the key {min(reserved)!r}"
        value = list(value.values())
    if isinstance(value, list):
        return next((problem for item in value if (problem := undecodable(item))), None)
    return None


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


class ModelError(Exception):
    """The model's answer broke the protocol or a limit; the message is what the user reads."""


# assistant-stream copies a string for every piece appended to it, so a reply costs the square of its
# length: a bound keeps one reply's cost sane (the longest model answers are about 64 K characters).
REPLY_LIMIT = 200_000  # characters


class Backlog:
    """Text the run has written that the client has not taken yet; the writer waits while there is too much."""

    LIMIT = 256 * 1024  # characters: all that a client which stops reading makes the server hold

    def __init__(self) -> None:
        self.waiting = 0
        self.taken = asyncio.Event()

    async def wrote(self, characters: int) -> None:
        """Count what the writer added; wait while the client is that far behind."""
        self.waiting += characters
        while self.waiting > self.LIMIT:
            self.taken.clear()
            await self.taken.wait()

    async def taking(self, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The run's chunks as the encoder takes them, each taken one counted off."""
        async for chunk in chunks:
            operations = chunk.operations if isinstance(chunk, UpdateStateChunk) else []
            self.waiting -= sum(len(op["value"]) for op in operations if op["type"] == "append-text")
            self.taken.set()
            yield chunk


async def write_reply(controller: RunController, chunks: AsyncIterator[Chunk], backlog: Backlog) -> None:
    """Write a model's streamed chunks into a new ai message, piece by piece as they arrive."""
    # Every string starts empty and grows by append-text, the only way the client's strict decoder
    # lets a string grow; a call's args are set once its partial_json is complete. Reasoning goes
    # where convertLangChainMessages shows a reasoning part, and never back to the model.
    messages = controller.state["messages"]
    messages.append({"id": uuid.uuid4().hex, "type": "ai", "content": "", "tool_calls": []})
    at = len(messages) - 1
    calls: dict[int, int] = {}  # the model's index of each call -> its place in tool_calls
    length = 0
    async for chunk in chunks:
        delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
        written = 0
        if reasoning := delta.get("reasoning_content") or delta.get("reasoning"):  # vLLM, DeepSeek; Ollama, OpenRouter
            if "additional_kwargs" not in messages[at]:
                summary = {"type": "reasoning", "summary": [{"type": "summary_text", "text": ""}]}
                messages[at]["additional_kwargs"] = {"reasoning": summary}
            controller.append_state_text(
                ["messages", at, "additional_kwargs", "reasoning", "summary", 0, "text"], reasoning
            )
            written += len(reasoning)
        if delta.get("content"):
            controller.append_state_text(["messages", at, "content"], delta["content"])
            written += len(delta["content"])
        for piece in delta.get("tool_calls") or []:
            function = piece.get("function") or {}
            if (index := piece.get("index", 0)) not in calls:  # a call's first piece carries its id and name
                calls[index] = len(calls)
                call = {"id": piece.get("id") or f"call_{uuid.uuid4().hex}", "name": function.get("name", "")}
                messages[at]["tool_calls"].append({**call, "args": {}, "partial_json": ""})
            if function.get("arguments"):
                path = ["messages", at, "tool_calls", calls[index], "partial_json"]
                controller.append_state_text(path, function["arguments"])
                written += len(function["arguments"])
        if (length := length + written) > REPLY_LIMIT:
            raise ModelError(f"The reply passed {REPLY_LIMIT} characters")
        await backlog.wrote(written)  # a client that stops reading stops the model being read
    for position in calls.values():
        call = messages[at]["tool_calls"][position]
        try:
            args = json.loads(call["partial_json"] or "{}")
        except ValueError:  # cut off, or not JSON: small local models write such arguments
            args = None
        if problem := (undecodable(args) if isinstance(args, dict) else "no JSON object"):
            raise ModelError(f"The arguments for {call['name']} hold {problem}")
        call["args"] = args


def as_text(value: object) -> str:
    """A value as text: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def text_of(content: JsonValue) -> str:
    """The text of a message's content: a string, or its text blocks joined."""
    if isinstance(content, str):
        return content
    blocks = content if isinstance(content, list) else []
    return "".join(str(block["text"]) for block in blocks if isinstance(block, dict) and block.get("type") == "text")


# --- Server tools: your Python functions, which the model may call; they run here ----------------
# To add one: a Pydantic model of its arguments (its docstring is the description the model reads),
# a function taking that model, sync or async, that returns anything JSON can hold, and an entry in
# SERVER_TOOLS. A sync function runs in a worker thread (sync_to_async), so Django ORM code works in
# it as in a sync view. What a tool raises, and a tool past TOOL_TIMEOUT, become an error result.


class CurrentTime(BaseModel):
    """Get the current date and time in a time zone."""

    timezone: str = Field(description="An IANA time zone name, such as Asia/Tokyo or Europe/Paris")


def get_current_time(arguments: CurrentTime) -> dict[str, str]:
    """The date and time now in a time zone; a zone that does not exist is an answer the model can act on."""
    try:
        now = datetime.now(ZoneInfo(arguments.timezone))
    except (ValueError, KeyError):  # no such zone, or not a zone's name at all
        return {"error": f"There is no time zone {arguments.timezone!r}; use an IANA name such as Asia/Tokyo"}
    return {"timezone": arguments.timezone, "time": now.isoformat(timespec="seconds"), "weekday": now.strftime("%A")}


SERVER_TOOLS: dict[str, tuple[type[BaseModel], Callable[[Any], Any]]] = {
    "get_current_time": (CurrentTime, get_current_time),
}
# Their own threads: a sync tool that hangs must not take the threads the event loop resolves host names in.
TOOL_THREADS = ThreadPoolExecutor(thread_name_prefix="server-tool")
shadowed: set[str] = set()  # frontend tools a server tool's name has hidden, logged once each


def enabled_tools(request: AssistantRequest) -> dict[str, ToolDefinition]:
    """The frontend's tools the model may call: the ones it sent, less disabled ones and server tools' names."""
    tools = {name: tool for name, tool in (request.tools or {}).items() if not tool.disabled}
    for name in tools.keys() & SERVER_TOOLS.keys() - shadowed:
        logger.warning("The frontend's tool %r is hidden by the server tool of the same name", name)
        shadowed.add(name)
    return {name: tool for name, tool in tools.items() if name not in SERVER_TOOLS}


def run_sync_tool(function: Callable[[Any], object], arguments: BaseModel) -> object:
    """Call a sync tool with the database housekeeping Django does around a sync request."""
    close_old_connections()
    try:
        return function(arguments)
    finally:
        close_old_connections()


async def call_server_tool(call: Message) -> tuple[JsonValue, bool]:
    """A server tool's result, and whether it failed: what it raised, or that it ran out of time."""
    arguments_model, function = SERVER_TOOLS[call["name"]]
    try:
        arguments = arguments_model.model_validate(call["args"])
        if inspect.iscoroutinefunction(function):
            running = function(arguments)
        else:
            running = sync_to_async(run_sync_tool, thread_sensitive=False, executor=TOOL_THREADS)(function, arguments)
        result = to_jsonable_python(await asyncio.wait_for(running, settings.TOOL_TIMEOUT))
    except TimeoutError:  # an async tool is cancelled; a sync one cannot be, and finishes unheard
        logger.warning("Server tool %s passed TOOL_TIMEOUT", call["name"])
        return f"{call['name']} did not finish within TOOL_TIMEOUT ({settings.TOOL_TIMEOUT:g} seconds)", True
    except Exception as error:
        logger.exception("Server tool %s failed", call["name"])
        return f"{call['name']} failed: {type(error).__name__}: {error}", True
    if problem := undecodable(result):
        return f"{call['name']} answered with {problem}, which the client cannot decode", True
    return result, False


async def run_server_tools(controller: RunController) -> None:
    """Run the server tools the last reply calls, side by side, and answer each call with a tool message."""
    calls = [call for call in controller.state["messages"][-1]["tool_calls"] if call["name"] in SERVER_TOOLS]
    results = await asyncio.gather(*(call_server_tool(call) for call in calls))
    controller.state["messages"].extend(
        tool_message(call, *result) for call, result in zip(calls, results, strict=True)
    )


# --- The agents: a scripted mock, or an OpenAI model. Both stream chat.completion.chunk dicts, ---
# --- so one writer (write_reply) puts either into the state. ------------------------------------

WEATHER_QUESTION = re.compile(r"\bweather\b", re.IGNORECASE)
TIME_QUESTION = re.compile(r"\btime\b", re.IGNORECASE)
TIME_ZONES = sorted(available_timezones())  # read once: listing them reads the time zone database
# A place is the capitalised words after "in", "for" or "at": "in San Francisco today?".
PLACE = re.compile(r"\b(?:in|for|at)\s+([A-Z][\w'-]{0,40}(?:\s+[A-Z][\w'-]{0,40}){0,3})")
MOCK_QUOTE = 500  # characters of the user's text (or a tool result) the mock repeats


def shorten(text: str) -> str:
    """At most MOCK_QUOTE characters of a text, marked when cut."""
    return text if len(text) <= MOCK_QUOTE else text[:MOCK_QUOTE] + "…"


async def mock_agent(thread: list[Message], request: AssistantRequest) -> AsyncIterator[Chunk]:
    """A scripted model: echo the user; asked the weather or the time, think, call the tool, then use its result."""
    last = thread[-1]
    thought, asks = "", []  # asks: what the user asks about, the tool that knows, and its arguments
    if last["type"] == "tool":
        verb = "failed" if last.get("status") == "error" else "answered"
        reply = f"{last.get('name', 'The tool')} {verb}: {shorten(as_text(last['content']))}"
    else:
        said = text_of(last["content"])
        images = sum(block.get("type") == "image_url" for block in last["content"] if isinstance(block, dict))
        reply = f'You said: "{shorten(said)}"' + (f" and sent {images} image(s)." if images else ".")
        place = match.group(1) if (match := PLACE.search(said)) else None
        if WEATHER_QUESTION.search(said) and (request.tools is None or "get_weather" in enabled_tools(request)):
            asks.append(("weather", "get_weather", {"location": place or "San Francisco"}))
        if TIME_QUESTION.search(said):  # get_current_time is a server tool: this backend runs it
            # The zone named after the place, as Asia/Tokyo is; a place without one is passed as it is.
            named = (zone for zone in TIME_ZONES if zone.endswith(f"/{place}".replace(" ", "_")))
            asks.append(("time", "get_current_time", {"timezone": next(named, place or "UTC")}))
        if asks:
            topics, where = " and the ".join(ask[0] for ask in asks), place or next(iter(asks[0][2].values()))
            reply += f" Let me check the {topics} in {where}."
            thought = f"The user asks for the {topics} in {where}; {' and '.join(ask[1] for ask in asks)} can tell."
    # In the order a model streams them: its reasoning, its text, then each tool call in pieces.
    deltas: list[dict[str, Any]] = [{"reasoning_content": word} for word in re.findall(r"\s*\S+", thought)]
    deltas += [{"content": word} for word in re.findall(r"\s*\S+", reply)]
    for index, (_, name, arguments) in enumerate(asks):
        call = {"index": index, "id": f"call_{uuid.uuid4().hex}", "type": "function"}
        deltas.append({"tool_calls": [{**call, "function": {"name": name, "arguments": ""}}]})
        pieces = re.findall(r"\s*\S+", json.dumps(arguments))
        deltas += [{"tool_calls": [{"index": index, "function": {"arguments": piece}}]} for piece in pieces]
    for delta in deltas:
        await asyncio.sleep(settings.MOCK_DELAY)
        yield {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}


MODEL_LINE_LIMIT = 1024 * 1024  # bytes of one line of the model's stream

# One client for the process: it keeps its connections to the model server open between runs.
model_client: "openai.AsyncOpenAI | None" = None
if settings.OPENAI_API_KEY:
    model_client = openai.AsyncOpenAI(
        api_key=settings.OPENAI_API_KEY,
        base_url=settings.OPENAI_BASE_URL or None,
        timeout=settings.OPENAI_TIMEOUT,
        max_retries=settings.OPENAI_MAX_RETRIES,
    )


def model_messages(thread: list[Message], system: str | None) -> list[Any]:
    """The thread as chat-completion messages, one for one, the system prompt first."""
    answered = {message.get("tool_call_id") for message in thread if message["type"] == "tool"}
    result: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for message in thread:
        calls = message.get("tool_calls", [])
        if message["type"] == "human":
            result.append({"role": "user", "content": message["content"]})
        elif message["type"] == "ai" and (text_of(message["content"]) or calls):
            step: dict[str, Any] = {"role": "assistant", "content": text_of(message["content"]) or None}
            # The parsed args, not partial_json: a step that failed may have left that text cut off.
            functions = [{"name": call["name"], "arguments": as_text(call.get("args") or {})} for call in calls]
            if calls:
                step["tool_calls"] = [
                    {"id": call["id"], "type": "function", "function": function}
                    for call, function in zip(calls, functions, strict=True)
                ]
            result.append(step)
            # The chat API rejects a call left unanswered, as when the user wrote on instead of letting it run.
            unanswered = [call["id"] for call in calls if call["id"] not in answered]
            result += [{"role": "tool", "tool_call_id": id_, "content": "The tool was not run."} for id_ in unanswered]
        elif message["type"] == "tool":
            # The model reads modelContent (text, or parts with text) when the frontend sent it, else the result.
            content = message.get("model_content", message["content"])
            text = text_of(content) if "model_content" in message and isinstance(content, list) else as_text(content)
            text = f"Error: {text}" if message.get("status") == "error" else text
            result.append({"role": "tool", "tool_call_id": message.get("tool_call_id"), "content": text})
    return result


async def openai_agent(thread: list[Message], request: AssistantRequest) -> AsyncIterator[Chunk]:
    """Stream a chat completion with the frontend's and the server's tools, as the plain chunks the server sends."""
    assert model_client is not None, "openai_agent runs only when OPENAI_API_KEY is set"
    options: dict[str, Any] = request.callSettings.model_dump(exclude_none=True) if request.callSettings else {}
    frontend_tools = [
        {"type": "function", "function": {"name": name, **tool.model_dump(exclude={"disabled"}, exclude_none=True)}}
        for name, tool in enabled_tools(request).items()
    ]
    server_tools = [openai.pydantic_function_tool(model, name=name) for name, (model, _) in SERVER_TOOLS.items()]
    if tools := [*frontend_tools, *server_tools]:
        options["tools"] = tools
    # The raw lines, not the SDK's typed chunks: building those objects costs about 70 µs a chunk,
    # and reading the lines relays 5x the tokens per core (bench/tokens.py). The client still brings
    # auth, retries, timeouts and typed errors, and leaving the block closes the upstream request.
    async with model_client.chat.completions.with_streaming_response.create(
        model=settings.OPENAI_MODEL, messages=model_messages(thread, request.system), stream=True, **options
    ) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            kind = response.headers.get("content-type") or "no content type"
            raise ModelError(f"The model server answered {kind}, not a stream")
        unfinished = b""  # the line being received; bounded, as a line that never ends would fill memory
        try:
            async for received in response.iter_bytes():
                *lines, unfinished = (unfinished + received).split(b"\n")
                if len(unfinished) > MODEL_LINE_LIMIT:
                    raise ModelError(f"The model server sent a line over {MODEL_LINE_LIMIT} bytes")
                for line in lines:
                    data = line.removeprefix(b"data:").strip()
                    if not line.startswith(b"data:") or data == b"[DONE]":
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:  # an error after the 200, inside the stream
                        error = chunk["error"]
                        message = error.get("message") if isinstance(error, dict) else None
                        raise openai.APIError(message or str(error), response.http_request, body=error)
                    yield chunk
        except (openai.APIError, ModelError):
            raise
        except Exception as error:  # the SDK types errors up to the headers; a timeout after them is its HTTP client's
            message = f"{type(error).__name__} while the reply streamed."
            raise openai.APIConnectionError(message=message, request=response.http_request) from error


def describe(error: Exception) -> str:
    """A failed run in words the user can act on; the log keeps the whole error."""
    if isinstance(error, ModelError):
        return f"The model request failed: {error}"
    if openai is None or not isinstance(error, openai.APIError):
        return "The assistant failed while replying. The server log has the details."
    if isinstance(error, openai.APIStatusError):  # the server's own words: a bad key, a rate limit, ...
        detail = error.body.get("message") if isinstance(error.body, dict) else None
        return f"The model server answered {error.status_code}: {detail or error.message}"
    return f"The model request failed: {error.message}"  # a timeout, a refused connection, an error mid-stream


run_agent = openai_agent if model_client else mock_agent  # the agent every run uses

# --- Views --------------------------------------------------------------------------------


def wrong_method(allowed: str) -> JsonResponse:
    """A JSON 405 naming the methods the path answers."""
    response = json_error(405, f"Method not allowed here; use {allowed}")
    response["Allow"] = allowed
    return response


async def assistant(request: HttpRequest) -> HttpResponseBase:
    """Apply the commands, run the agent, and stream each change of the state back."""
    if request.method != "POST":
        return wrong_method("POST")
    if request.content_type != "application/json":
        return json_error(415, "Send the body as Content-Type: application/json")
    try:
        body = AssistantRequest.model_validate_json(request.body)
        state = body.state.model_dump(exclude_unset=True) if body.state is not None else None
        sent: list[Message] = state.get("messages", []) if state else []
        thread = apply_commands(sent, body.commands)
    except RequestDataTooBig:
        return json_error(413, f"Body larger than MAX_REQUEST_BYTES ({settings.MAX_REQUEST_BYTES} bytes)")
    except ValidationError as error:
        problems = error.errors(include_url=False, include_context=False, include_input=False)
        if problems[0]["type"] == "json_invalid":
            return json_error(400, "Body is not valid JSON", problems[0]["msg"])
        # A body can hold a million mistakes; the first few dozen tell the client what is wrong.
        message = (
            f"Body does not match the request schema: {len(problems)} problem(s), the first {len(problems[:20])} listed"
        )
        return json_error(400, message, problems[:20])
    except UnknownToolCallError as error:
        return json_error(400, "add-tool-result for a tool call that is not in the state", [str(error)])
    if problem := undecodable({**(state or {}), "messages": thread}):  # what the stream would carry
        return json_error(400, f"Body holds {problem}, which the client's strict decoder refuses")

    backlog = Backlog()

    async def run(controller: RunController) -> None:
        try:
            # Send the thread as the commands left it: only the new messages, unless an edit cut it.
            if controller.state is None:
                controller.state = {"messages": thread}
            elif "messages" in controller.state and thread[: len(sent)] == sent:
                controller.state["messages"].extend(thread[len(sent) :])
            else:
                controller.state["messages"] = thread
            # A step at a time: the model answers; server tools it called run here and answer it, and it
            # is asked again, until it answers in text or calls a frontend tool (the browser runs that).
            for step in range(settings.MAX_MODEL_STEPS + 1):
                if not reply_awaited(messages := list(controller.state["messages"])):
                    return
                if step == settings.MAX_MODEL_STEPS:
                    raise ModelError(f"The model still called tools after {step} steps (MAX_MODEL_STEPS)")
                await write_reply(controller, run_agent(messages, body), backlog)
                await run_server_tools(controller)
        except asyncio.CancelledError:
            logger.info("Client disconnected; run stopped")
            raise
        except Exception as error:
            # create_run would re-raise after its error frame and cut the response short;
            # ending normally keeps the stream (and the user's message in the state) intact.
            logger.exception("Run failed")
            message = describe(error)
            # The failed step's ai message shows the error where its reply would have been.
            now = list(controller.state["messages"])
            if replies := [at for at in range(len(thread), len(now)) if now[at]["type"] == "ai"]:
                failure = {"type": "incomplete", "reason": "error", "error": message}
                controller.state["messages"][replies[-1]]["status"] = failure
            controller.add_error(message)

    stream = ENCODER.encode_stream(backlog.taking(create_run(run, state=state)))
    if settings.HEARTBEAT_SECONDS:
        stream = add_keepalive(stream, settings.HEARTBEAT_SECONDS, ENCODER.get_keepalive_token())
    # Tell every proxy on the way not to cache or buffer the stream (nginx reads X-Accel-Buffering).
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    # charset= as well as the header spares Django re-parsing the content type for every chunk.
    media_type = f"{ENCODER.get_media_type()}; charset=utf-8"
    return StreamingHttpResponse(stream, content_type=media_type, charset="utf-8", headers=headers)


HEALTH = {
    "status": "healthy",
    "service": "assistant-transport-backend-django",
    "version": __version__,
    "agent": "openai" if model_client else "mock",
    "model": settings.OPENAI_MODEL if model_client else None,
    "protocol": settings.STREAM_PROTOCOL,
}


async def health(request: HttpRequest) -> HttpResponseBase:
    """Liveness, and what an operator wants to see at a glance (never a secret)."""
    if request.method not in ("GET", "HEAD"):
        return wrong_method("GET, HEAD")
    return JsonResponse(HEALTH)


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponseBase:
    """JSON for unknown paths, instead of Django's HTML page (which DEBUG would also show)."""
    return json_error(404, f"No endpoint at {request.path}; use POST /assistant or GET /health")


handler404 = not_found  # for targets no route can match, such as `OPTIONS *`


urlpatterns = [
    path("assistant", assistant),
    path("health", health),
    re_path(r"", not_found),
]

django_application = get_asgi_application()

# With no database, Django's per-request connection housekeeping only costs a hop to a worker
# thread. Add DATABASES and it stays; signals you connect yourself run either way.
if not settings.DATABASES:
    request_started.disconnect(reset_queries)
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)

# Django enters a fresh thread-sensitive context per request, and each one gets its own worker
# thread for sync work (closing the response, sync signal receivers) that lives as long as the
# request: an open stream holds a thread. One shared worker keeps the thread count flat.
SYNC_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="django-sync")


async def application(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[Mapping[str, Any]], Awaitable[None]],
) -> None:
    """The ASGI app: Django, with one sync worker for every request, and lifespan answered."""
    if scope["type"] == "lifespan":  # Django has no startup or shutdown work; say so to the server
        while (await receive())["type"] != "lifespan.shutdown":
            agent = f"openai, model {settings.OPENAI_MODEL}" if model_client else "mock (no OPENAI_API_KEY)"
            agent += f"; server tools: {','.join(SERVER_TOOLS) or 'none'}"
            origins, hosts = ",".join(settings.CORS_ORIGINS), ",".join(settings.ALLOWED_HOSTS)
            logger.info(
                "Agent: %s; %s; CORS_ORIGINS=%s; ALLOWED_HOSTS=%s", agent, settings.STREAM_PROTOCOL, origins, hosts
            )
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    async with ThreadSensitiveContext(executor=SYNC_WORKER):
        await django_application(scope, receive, send)


# Django and the libraries it loads leave a large heap of objects that live as long as the process.
# Freezing them keeps the garbage collector from walking them again and again: those walks were
# pauses of tens of milliseconds under load.
gc.freeze()


def main() -> None:
    """Serve with uvicorn (`runserver` too, with reload), or run any other Django management command."""
    command = sys.argv[1:2]
    if command not in ([], ["runserver"]):
        execute_from_command_line(sys.argv)
        return
    # Django's runserver is a WSGI server and would hold a stream back until it ends. As Daphne does,
    # runserver here serves this ASGI app instead, and reloads it when this file changes.
    parser = argparse.ArgumentParser(prog=f"{sys.argv[0]} runserver")
    parser.add_argument("addrport", nargs="?", default=str(settings.PORT), help="port, or address:port")
    parser.add_argument("--noreload", action="store_true")
    options = parser.parse_args(sys.argv[2:])
    if not (address := naiveip_re.match(options.addrport)):
        parser.error(f"{options.addrport!r} is not a port or an address:port")
    # One set of serving options, for uvicorn.run and, when reloading, for uvicorn's command line.
    serving: dict[str, Any] = {
        "host": (address["addr"] or settings.HOST).strip("[]"),
        "port": int(address["port"]),
        "log_level": settings.LOG_LEVEL.lower(),
        "limit_concurrency": settings.LIMIT_CONCURRENCY,
        "timeout_keep_alive": settings.TIMEOUT_KEEP_ALIVE,
        "forwarded_allow_ips": ",".join(settings.FORWARDED_ALLOW_IPS),  # empty: no proxy is believed
    }
    if command == ["runserver"] and not options.noreload:
        # uvicorn's reloader serves the app from a child process that imports this file by name, so it
        # starts from uvicorn's own command line: that way nothing imports this file twice.
        here = Path(__file__).resolve()
        uvicorn_command = ["-m", "uvicorn", f"{here.stem}:application", "--app-dir", str(here.parent), "--reload"]
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in serving.items()]
        os.execv(sys.executable, [sys.executable, *uvicorn_command, f"--reload-dir={here.parent}", *flags])
    uvicorn.run(application, **serving)


if __name__ == "__main__":
    main()
