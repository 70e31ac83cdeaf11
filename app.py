"""A Django backend for assistant-ui's useAssistantTransportRuntime, in one file.

The frontend POSTs commands (a new message, a tool result) plus the agent state it
holds; this file applies the commands, runs an agent, and streams every change to
the state back as it happens.

Usage:
    python app.py                # serve with uvicorn on HOST:PORT (default 127.0.0.1:8002)
    uvicorn app:application      # the same, with uvicorn's own options (--workers, ...)
    python app.py check          # any other Django management command

Not `python app.py runserver`: Django's dev server is WSGI and would hold a
streamed reply back until it ends.
"""

import asyncio
import gc
import json
import logging
import os
import re
import secrets
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial, wraps
from typing import Annotated, Any, Literal, TypeVar

import uvicorn
from asgiref.sync import ThreadSensitiveContext
from assistant_stream import RunController, create_run
from assistant_stream.serialization import AssistantTransportEncoder, DataStreamEncoder
from assistant_stream.serialization.heartbeat import add_keepalive
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.exceptions import DisallowedHost, RequestDataTooBig
from django.core.management import execute_from_command_line
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, reset_queries
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponse, HttpResponseBase
from django.urls import path, re_path
from django.utils.cache import patch_vary_headers
from django.utils.decorators import async_only_middleware
from dotenv import load_dotenv
from pydantic import BaseModel, ConfigDict, Discriminator, Field, JsonValue, Tag, ValidationError

try:
    import openai
except ImportError:  # the optional "openai" extra: only the OpenAI agent needs it
    openai = None  # type: ignore[assignment]

__version__ = "0.1.0"

# --- Configuration: read once from the environment (and .env) --------------------------

load_dotenv()
T = TypeVar("T")


def setting(
    name: str, default: T, parse: Callable[[str], T], valid: Callable[[T], bool] = lambda _: True, expected: str = ""
) -> T:
    """One setting from the environment; a bad value stops start-up with one clear line."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except (ValueError, KeyError):
        pass
    else:
        if valid(value):
            return value
    raise SystemExit(f"Invalid setting {name}={raw!r}: expected {expected}.")


BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The wire formats: data-stream lines (the client's default), or SSE for a frontend created
# with `protocol: "assistant-transport"`. Encoders keep no state, so one serves every request.
PROTOCOLS = {"data-stream": DataStreamEncoder(), "assistant-transport": AssistantTransportEncoder()}


def comma_list(raw: str) -> list[str]:
    """Parse a comma-separated list, ignoring blanks."""
    return [item.strip() for item in raw.split(",") if item.strip()]


HOST = setting("HOST", "127.0.0.1", str)
PORT = setting("PORT", 8002, int, lambda port: 0 < port < 65536, "a port number, 1-65535")
DEBUG = setting("DEBUG", False, lambda raw: BOOLEANS[raw.lower()], expected="true or false")
SECRET_KEY = setting("SECRET_KEY", secrets.token_urlsafe(40), str)
ALLOWED_HOSTS = setting("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"], comma_list)
CORS_ORIGINS = setting("CORS_ORIGINS", ["http://localhost:3000"], comma_list)
LOG_LEVEL = setting("LOG_LEVEL", "INFO", str.upper, lambda level: level in LOG_LEVELS, " or ".join(LOG_LEVELS))
MOCK_DELAY = setting("MOCK_DELAY", 0.05, float, lambda delay: 0 <= delay <= 60, "seconds, 0-60")
STREAM_PROTOCOL = setting(
    "STREAM_PROTOCOL", "data-stream", str, lambda name: name in PROTOCOLS, "data-stream or assistant-transport"
)
HEARTBEAT_SECONDS = setting("HEARTBEAT_SECONDS", 15.0, float, lambda s: 0 <= s <= 3600, "seconds, 0 disables")
OPENAI_API_KEY = setting("OPENAI_API_KEY", "", str)
OPENAI_MODEL = setting("OPENAI_MODEL", "gpt-4o-mini", str)
OPENAI_BASE_URL = setting("OPENAI_BASE_URL", "", str)
MAX_REQUEST_BYTES = setting("MAX_REQUEST_BYTES", 10 * 1024 * 1024, int, lambda size: size > 0, "a byte count")

ENCODER = PROTOCOLS[STREAM_PROTOCOL]
if OPENAI_API_KEY and openai is None:
    raise SystemExit("OPENAI_API_KEY is set, but the openai package is not installed: pip install openai")

logging.basicConfig(level=LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logger = logging.getLogger("assistant_transport")

settings.configure(
    DEBUG=DEBUG,
    SECRET_KEY=SECRET_KEY,  # nothing is signed yet; set one before you add sessions
    ALLOWED_HOSTS=ALLOWED_HOSTS,
    ROOT_URLCONF=__name__,
    # No built-in middleware: each is sync-first and would move every request to a thread.
    MIDDLEWARE=[f"{__name__}.cors_middleware"],
    DATA_UPLOAD_MAX_MEMORY_SIZE=MAX_REQUEST_BYTES,
    LOGGING_CONFIG=None,  # logging is configured above, once
)

# --- Request models: what useAssistantTransportRuntime sends ---------------------------


class TextPart(BaseModel):
    """Text the user typed."""

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    """An image the user attached, as a URL or a data: URL."""

    type: Literal["image"]
    image: str


class NewMessage(BaseModel):
    """The message an add-message command carries."""

    role: Literal["user", "assistant"] = "user"
    parts: list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]


class AddMessage(BaseModel):
    """Append a message; a parentId or sourceId naming an earlier message branches (edit)."""

    type: Literal["add-message"]
    message: NewMessage
    parentId: str | None = None
    sourceId: str | None = None


class AddToolResult(BaseModel):
    """The frontend ran a tool; its result goes onto the tool-call part with this id."""

    type: Literal["add-tool-result"]
    toolCallId: str
    toolName: str | None = None
    result: JsonValue = None
    isError: bool = False
    artifact: JsonValue = None
    modelContent: JsonValue = None


class CustomCommand(BaseModel):
    """Any other command, from useAssistantTransportSendCommand; agents may ignore it."""

    model_config = ConfigDict(extra="allow")
    type: str


def command_type(command: object) -> str:
    """Route a command to its model; unknown types are custom commands, not errors."""
    kind = command.get("type") if isinstance(command, dict) else getattr(command, "type", None)
    return kind if kind in ("add-message", "add-tool-result") else "custom"


Command = Annotated[
    Annotated[AddMessage, Tag("add-message")]
    | Annotated[AddToolResult, Tag("add-tool-result")]
    | Annotated[CustomCommand, Tag("custom")],
    Discriminator(command_type),
]


class StatePart(BaseModel):
    """A part of a message in the state: text, image or tool-call, with its own fields."""

    model_config = ConfigDict(extra="allow")
    type: str


class StateMessage(BaseModel):
    """A message in the state, in assistant-ui's ThreadMessageLike shape."""

    model_config = ConfigDict(extra="allow")
    role: Literal["user", "assistant", "system"]
    parts: list[StatePart]


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

    # The client flushes a few queued commands at a time. Each state write copies the thread,
    # so thousands in one body would hold the event loop for seconds.
    commands: list[Command] = Field(max_length=100)
    state: AgentState | None = None
    system: str | None = None
    tools: dict[str, ToolDefinition] | None = None
    callSettings: CallSettings | None = None


def json_error(status: int, message: str, details: object = None) -> JsonResponse:
    """The one shape of every error answered before a stream starts."""
    body = {"error": message} if details is None else {"error": message, "details": details}
    return JsonResponse(body, status=status)


# --- CORS, and the Host check no built-in middleware does for us -----------------------

ANY_ORIGIN = "*" in CORS_ORIGINS
View = Callable[[HttpRequest], Coroutine[Any, Any, HttpResponseBase]]
CORS_METHODS = ("GET", "POST", "OPTIONS")


@async_only_middleware
def cors_middleware(get_response: View) -> View:
    """Check the Host, answer preflights, and put CORS headers on every answer, errors too."""

    async def middleware(request: HttpRequest) -> HttpResponseBase:
        origin = request.META.get("HTTP_ORIGIN")  # request.headers would build a dict of every header
        origin_allowed = origin is not None and (ANY_ORIGIN or origin in CORS_ORIGINS)
        response: HttpResponseBase
        try:
            request.get_host()
        except DisallowedHost as error:
            logger.warning("%s", error)
            response = json_error(400, "Host not allowed (see ALLOWED_HOSTS)")
        else:
            if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                response = preflight(request, origin_allowed)
            else:
                response = await get_response(request)
        if origin_allowed:
            # Never reflect an origin together with credentials unless it was listed exactly.
            response["Access-Control-Allow-Origin"] = "*" if ANY_ORIGIN else str(origin)
            if not ANY_ORIGIN:
                response["Access-Control-Allow-Credentials"] = "true"
        if not ANY_ORIGIN:
            patch_vary_headers(response, ["Origin"])
        return response

    return middleware


def preflight(request: HttpRequest, origin_allowed: bool) -> HttpResponse:
    """Answer a CORS preflight; a refused one carries no Access-Control-Allow-* header."""
    if not origin_allowed or request.headers["Access-Control-Request-Method"] not in CORS_METHODS:
        return json_error(403, "CORS preflight refused: origin or method not allowed")
    response = HttpResponse(status=204)
    response["Access-Control-Allow-Methods"] = ", ".join(CORS_METHODS)
    if requested_headers := request.headers.get("Access-Control-Request-Headers"):
        response["Access-Control-Allow-Headers"] = requested_headers
    response["Access-Control-Max-Age"] = "600"
    return response


# --- State helpers: every write becomes an operation the client replays -----------------


def new_id() -> str:
    """A unique id for a message the backend adds."""
    return uuid.uuid4().hex


def kept_messages(messages: list[dict[str, Any]], parent_id: str | None, source_id: str | None) -> int:
    """How many messages stay before an added one: an edit branches the thread."""
    ids = [message.get("id") for message in messages]
    if parent_id is not None and parent_id in ids:
        return ids.index(parent_id) + 1
    # Editing the first message has no parent; its sourceId names the message it replaces.
    if source_id is not None and source_id in ids:
        return ids.index(source_id)
    return len(messages)


def find_tool_call(messages: list[dict[str, Any]], tool_call_id: str) -> tuple[int, int] | None:
    """The (message, part) index of the tool-call part with this id, if any."""
    for message_index, message in enumerate(messages):
        for part_index, part in enumerate(message["parts"]):
            if part["type"] == "tool-call" and part.get("toolCallId") == tool_call_id:
                return message_index, part_index
    return None


def apply_command(controller: RunController, command: AddMessage | AddToolResult | CustomCommand) -> None:
    """Apply one command to the state."""
    messages = list(controller.state["messages"])
    if isinstance(command, AddMessage):
        keep = kept_messages(messages, command.parentId, command.sourceId)
        if keep < len(messages):
            controller.state["messages"] = messages[:keep]
        controller.state["messages"].append({"id": new_id(), **command.message.model_dump()})
    elif isinstance(command, AddToolResult):
        location = find_tool_call(messages, command.toolCallId)
        if location is None:  # an earlier command in this request removed it
            raise LookupError(f"tool call {command.toolCallId} is no longer in the thread")
        part = controller.state["messages"][location[0]]["parts"][location[1]]
        part["result"] = command.result
        part["isError"] = command.isError
        for extra in ("artifact", "modelContent"):
            if (value := getattr(command, extra)) is not None:
                part[extra] = value
    # A custom command changes nothing here; an agent that knows it reads request.commands.


def add_part(controller: RunController, part: dict[str, Any]) -> list[str | int]:
    """Append a part to the last message (the reply being written); return its path."""
    message_index = len(controller.state["messages"]) - 1
    parts = controller.state["messages"][message_index]["parts"]
    parts.append(part)
    return ["messages", message_index, "parts", len(parts) - 1]


def add_text_part(controller: RunController) -> list[str | int]:
    """Start an empty text part in the reply (append-text needs a string to extend); return its path."""
    return [*add_part(controller, {"type": "text", "text": ""}), "text"]


def as_text(value: object) -> str:
    """A tool result as text: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


async def type_text(controller: RunController, field_path: list[str | int], text: str) -> None:
    """Stream text into a string field word by word, as append-text operations."""
    for piece in re.findall(r"\s*\S+", text):
        await asyncio.sleep(MOCK_DELAY)
        controller.append_state_text(field_path, piece)


# --- The agent ----------------------------------------------------------------------------

WEATHER_QUESTION = re.compile(r"\bweather\b", re.IGNORECASE)
PLACE = re.compile(r"\b(?:in|for|at)\s+([^?.!,;]+)")


def offers_tool(request: AssistantRequest, name: str) -> bool:
    """Whether the frontend offers this tool; a client that sends no tools (curl) gets the demo."""
    if request.tools is None:
        return True
    tool = request.tools.get(name)
    return tool is not None and not tool.disabled


def tool_results_arrived(message: dict[str, Any]) -> bool:
    """Whether a turn ended in tool calls that all have their results now."""
    parts = message["parts"]
    calls = [part for part in parts if part["type"] == "tool-call"]
    return bool(parts) and parts[-1]["type"] == "tool-call" and all("result" in call for call in calls)


async def mock_agent(controller: RunController, request: AssistantRequest) -> None:
    """Echo the user in streamed pieces; for weather, call the frontend's get_weather tool."""
    messages = list(controller.state["messages"])
    if messages and messages[-1]["role"] == "user":
        await echo(controller, request, messages[-1])
    elif messages and tool_results_arrived(messages[-1]):
        await report_weather(controller, messages[-1]["parts"][-1])


async def echo(controller: RunController, request: AssistantRequest, message: dict[str, Any]) -> None:
    """Reply to a user message, and ask the frontend for the weather if it was asked about."""
    text = " ".join(part["text"] for part in message["parts"] if part["type"] == "text")
    images = sum(part["type"] == "image" for part in message["parts"])
    quote = text if len(text) <= 500 else text[:500] + "…"
    reply = f'You said: "{quote}"' + (f" and sent {images} image(s)." if images else ".")
    place = match.group(1).strip() if (match := PLACE.search(text)) else "San Francisco"
    calls_tool = WEATHER_QUESTION.search(text) is not None and offers_tool(request, "get_weather")
    if calls_tool:
        reply += f" Let me check the weather in {place}."
    controller.state["messages"].append({"id": new_id(), "role": "assistant", "parts": []})
    await type_text(controller, add_text_part(controller), reply)
    if calls_tool:
        args = {"location": place}
        call = {"type": "tool-call", "toolCallId": f"call_{new_id()}", "toolName": "get_weather", "argsText": ""}
        await type_text(controller, [*add_part(controller, call), "argsText"], json.dumps(args))
        controller.state["messages"][-1]["parts"][-1]["args"] = args
        # The run ends here; the frontend runs the tool and answers with add-tool-result.


async def report_weather(controller: RunController, call: dict[str, Any]) -> None:
    """Close the turn with a sentence that uses the tool's result (and calls nothing again)."""
    place = call.get("args", {}).get("location", "that place")
    if call.get("isError"):
        closing = f"Sorry, I could not get the weather in {place}: {as_text(call['result'])}"
    else:
        closing = f"Here is the weather in {place}: {as_text(call['result'])}"
    await type_text(controller, add_text_part(controller), closing)


# --- The OpenAI agent, when OPENAI_API_KEY is set -----------------------------------------------

# One client for the process: it keeps its connections to the model server open between runs.
model_client = openai.AsyncOpenAI(api_key=OPENAI_API_KEY, base_url=OPENAI_BASE_URL or None) if OPENAI_API_KEY else None


def openai_messages(messages: list[dict[str, Any]], system: str | None) -> list[Any]:
    """The thread as chat-completion messages, system prompt first."""
    result: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for message in messages:
        if message["role"] == "assistant":
            result += assistant_steps(message["parts"])
            continue
        content = [
            {"type": "text", "text": part["text"]}
            if part["type"] == "text"
            else {"type": "image_url", "image_url": {"url": part["image"]}}
            for part in message["parts"]
            if part["type"] in ("text", "image")
        ]
        result.append({"role": message["role"], "content": content})
    return result


def assistant_steps(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant message as model steps: text and tool calls, each call followed by its result."""
    steps: list[list[dict[str, Any]]] = [[]]
    for part in parts:
        # Text after a tool call was written in a new step, after the model read the results.
        if part["type"] == "text" and any(earlier["type"] == "tool-call" for earlier in steps[-1]):
            steps.append([])
        steps[-1].append(part)
    result: list[dict[str, Any]] = []
    for step in steps:
        text = "".join(part["text"] for part in step if part["type"] == "text")
        calls = [part for part in step if part["type"] == "tool-call"]
        if not text and not calls:
            continue
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = [
                {
                    "id": call["toolCallId"],
                    "type": "function",
                    "function": {"name": call["toolName"], "arguments": call.get("argsText") or "{}"},
                }
                for call in calls
            ]
        result.append(message)
        result += [{"role": "tool", "tool_call_id": call["toolCallId"], "content": tool_output(call)} for call in calls]
    return result


def tool_output(call: dict[str, Any]) -> str:
    """What the model reads of a tool's result: modelContent when the frontend sent it."""
    if "result" not in call:  # the user wrote on instead of letting the tool run
        return "The tool was not run."
    output = call.get("modelContent", call["result"])
    if isinstance(output, list):  # modelContent parts; a chat tool message carries their text
        output = "\n".join(part.get("text", "") for part in output if isinstance(part, dict))
    return f"Error: {as_text(output)}" if call.get("isError") else as_text(output)


async def openai_agent(controller: RunController, request: AssistantRequest) -> None:
    """Stream a chat completion into the state; when the model asks for tools, the run ends there."""
    assert model_client is not None, "openai_agent runs only when OPENAI_API_KEY is set"
    messages = list(controller.state["messages"])
    if not messages or not (messages[-1]["role"] == "user" or tool_results_arrived(messages[-1])):
        return
    if messages[-1]["role"] == "user":
        controller.state["messages"].append({"id": new_id(), "role": "assistant", "parts": []})
    options = request.callSettings.model_dump(exclude_none=True) if request.callSettings else {}
    offered = {name: tool for name, tool in (request.tools or {}).items() if not tool.disabled}
    if offered:
        options["tools"] = [
            {"type": "function", "function": {"name": name, **tool.model_dump(exclude={"disabled"}, exclude_none=True)}}
            for name, tool in offered.items()
        ]
    try:
        stream = await model_client.chat.completions.create(
            model=OPENAI_MODEL, messages=openai_messages(messages, request.system), stream=True, **options
        )
        # Leaving this block closes the upstream response, also when a disconnect cancels the run.
        async with stream:
            await write_completion(controller, stream)
    except openai.APIError as error:
        logger.warning("Model request failed: %s", error, exc_info=True)
        controller.add_error(describe(error))


async def write_completion(controller: RunController, stream: AsyncIterator[Any]) -> None:
    """Write streamed text and tool calls into the reply, piece by piece as they arrive."""
    text_path: list[str | int] | None = None
    call_paths: dict[int, list[str | int]] = {}
    async for chunk in stream:
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta and delta.content:
            if text_path is None:
                text_path = add_text_part(controller)
            controller.append_state_text(text_path, delta.content)
        for call in (delta and delta.tool_calls) or []:
            if call.index not in call_paths:
                part = {
                    "type": "tool-call",
                    "toolCallId": call.id or f"call_{new_id()}",
                    "toolName": call.function.name if call.function else "",
                    "argsText": "",
                }
                call_paths[call.index] = add_part(controller, part)
            if call.function and call.function.arguments:
                controller.append_state_text([*call_paths[call.index], "argsText"], call.function.arguments)
    for call_path in call_paths.values():
        call = controller.state["messages"][call_path[1]]["parts"][call_path[3]]
        if not call["argsText"]:
            call["argsText"] = "{}"
        call["args"] = json.loads(call["argsText"])


def describe(error: Exception) -> str:
    """A model error in words the user can act on; the log keeps the whole error."""
    if isinstance(error, openai.APITimeoutError):
        return "The model server did not answer in time."
    if isinstance(error, openai.APIConnectionError):
        return "Could not reach the model server."
    if isinstance(error, openai.AuthenticationError):
        return "The model server rejected this server's API key."
    if isinstance(error, openai.APIStatusError):
        detail = error.body.get("message") if isinstance(error.body, dict) else None
        return f"The model server answered {error.status_code}: {detail or error.message}"
    return f"The model failed: {error}"


# The agent every run uses.
run_agent: Callable[[RunController, AssistantRequest], Awaitable[None]] = openai_agent if model_client else mock_agent


async def run_turn(controller: RunController, request: AssistantRequest) -> None:
    """One run: apply the request's commands to the state, then let the agent reply."""
    try:
        if controller.state is None:
            controller.state = {"messages": []}
        elif "messages" not in controller.state:
            controller.state["messages"] = []
        for command in request.commands:
            apply_command(controller, command)
        await run_agent(controller, request)
    except asyncio.CancelledError:
        logger.info("Client disconnected; run stopped")
        raise
    except Exception:
        # create_run would re-raise after its error frame and cut the response short;
        # ending normally keeps the stream (and the user's message in the state) intact.
        logger.exception("Run failed")
        controller.add_error("The assistant failed while replying. The server log has the details.")


# Tell every proxy on the way not to cache or buffer the stream (nginx reads X-Accel-Buffering).
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def encoded_reply(request: AssistantRequest, state: dict[str, Any] | None) -> AsyncIterator[str]:
    """The run, encoded in the wire format, with keep-alives while it is idle."""
    stream: AsyncIterator[str] = ENCODER.encode_stream(create_run(partial(run_turn, request=request), state=state))
    if HEARTBEAT_SECONDS:
        stream = add_keepalive(stream, HEARTBEAT_SECONDS, ENCODER.get_keepalive_token())
    return stream


# --- Views --------------------------------------------------------------------------------


def allow(method: str) -> Callable[[View], View]:
    """Answer any other method with a JSON 405 naming the one allowed."""

    def decorate(view: View) -> View:
        @wraps(view)
        async def only_method(request: HttpRequest) -> HttpResponseBase:
            if request.method != method:
                response = json_error(405, f"Method {request.method} not allowed here; use {method}")
                response["Allow"] = method
                return response
            return await view(request)

        return only_method

    return decorate


@allow("POST")
async def assistant(request: HttpRequest) -> HttpResponseBase:
    """Apply the commands, run the agent, and stream each state change back."""
    if request.content_type != "application/json":
        return json_error(415, "Send the body as Content-Type: application/json")
    try:
        body = AssistantRequest.model_validate_json(request.body)
    except RequestDataTooBig:
        return json_error(413, f"Body larger than MAX_REQUEST_BYTES ({MAX_REQUEST_BYTES} bytes)")
    except ValidationError as error:
        problems = error.errors(include_url=False, include_context=False, include_input=False)
        if problems[0]["type"] == "json_invalid":
            return json_error(400, "Body is not valid JSON", problems[0]["msg"])
        return json_error(400, "Body does not match the request schema", problems)
    state = body.state.model_dump(exclude_unset=True) if body.state is not None else None
    messages = state.get("messages", []) if state else []
    unknown_calls = [
        command.toolCallId
        for command in body.commands
        if isinstance(command, AddToolResult) and find_tool_call(messages, command.toolCallId) is None
    ]
    if unknown_calls:
        return json_error(400, "add-tool-result for a tool call that is not in the state", unknown_calls)

    # charset= as well as the header spares Django re-parsing the content type for every chunk.
    media_type = f"{ENCODER.get_media_type()}; charset=utf-8"
    return StreamingHttpResponse(
        encoded_reply(body, state), content_type=media_type, charset="utf-8", headers=STREAM_HEADERS
    )


# What /health says cannot change while the process runs, so it is encoded once.
HEALTH = json.dumps(
    {
        "status": "healthy",
        "service": "assistant-transport-backend-django",
        "version": __version__,
        "agent": "openai" if model_client else "mock",
        "model": OPENAI_MODEL if model_client else None,
        "protocol": STREAM_PROTOCOL,
    }
)


@allow("GET")
async def health(request: HttpRequest) -> HttpResponseBase:
    """Liveness, and what an operator wants to see at a glance (never a secret)."""
    return HttpResponse(HEALTH, content_type="application/json")


async def not_found(request: HttpRequest) -> HttpResponseBase:
    """JSON for unknown paths, instead of Django's HTML page (which DEBUG would also show)."""
    return json_error(404, f"No endpoint at {request.path}; use POST /assistant or GET /health")


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
    """Serve with uvicorn, or run the Django management command given on the command line."""
    if len(sys.argv) == 1:
        uvicorn.run(application, host=HOST, port=PORT, log_level=LOG_LEVEL.lower())
    elif sys.argv[1] == "runserver":
        sys.exit("runserver is Django's WSGI server and holds streamed replies back; run `python app.py`.")
    else:
        execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
