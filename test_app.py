"""Tests for app.py, through a real uvicorn server read chunk by chunk with a real HTTP client."""

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from assistant_stream import RunController
from django.conf import settings
from django.core.signals import request_finished, request_started

# Hermetic settings: a developer's .env never overrides a variable that is already set,
# and an empty one means "use the default".
SETTINGS = [
    "HOST",
    "PORT",
    "DEBUG",
    "SECRET_KEY",
    "ALLOWED_HOSTS",
    "CORS_ORIGINS",
    "LOG_LEVEL",
    "MOCK_DELAY",
    "STREAM_PROTOCOL",
    "HEARTBEAT_SECONDS",
    "MAX_REQUEST_BYTES",
    "OPENAI_API_KEY",
    "OPENAI_MODEL",
    "OPENAI_BASE_URL",
]
os.environ.update(dict.fromkeys(SETTINGS, ""))
import app  # noqa: E402

Json = Any
HERE = Path(__file__).parent
FRONTEND = "http://localhost:3000"
PROTOCOLS = ["data-stream", "assistant-transport"]


# --- A real server on a free port -----------------------------------------------------------


@dataclass
class Server:
    url: str
    loop: asyncio.AbstractEventLoop

    def task_count(self) -> int:
        """Tasks alive in the server's event loop, not counting the one asking."""

        async def count() -> int:
            return len(asyncio.all_tasks()) - 1

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(timeout=5)


@contextmanager
def serving(asgi_app: Callable[..., Awaitable[None]]) -> Iterator[Server]:
    """Run an ASGI app under uvicorn in a thread, on a free port of this machine."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    uvicorn_server = uvicorn.Server(uvicorn.Config(asgi_app, lifespan="off", log_level="warning"))
    loops: list[asyncio.AbstractEventLoop] = []

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        await uvicorn_server.serve(sockets=[listener])

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uvicorn_server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert uvicorn_server.started, "uvicorn did not start"
    yield Server(f"http://127.0.0.1:{listener.getsockname()[1]}", loops[0])
    uvicorn_server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    with serving(app.application) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        yield http


@pytest.fixture(autouse=True)
def defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from the shipped defaults, with a mock that does not wait."""
    monkeypatch.setattr(app, "MOCK_DELAY", 0)
    monkeypatch.setattr(app, "HEARTBEAT_SECONDS", 0)


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(app, "ENCODER", app.PROTOCOLS[request.param])
    return str(request.param)


# --- Reading a reply the way the client does ------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    state: Json = None
    operations: list[Json] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    keepalives: int = 0

    @property
    def body(self) -> str:
        return b"".join(chunk for _, chunk in self.chunks).decode()

    @property
    def messages(self) -> list[Json]:
        return list(self.state["messages"])


def apply_operation(target: Json, path: list[str], operation: Json) -> Json:
    """Apply one state operation with the client's strict rules."""
    if not path:
        if operation["type"] == "set":
            return operation["value"]
        assert operation["type"] == "append-text", operation
        assert isinstance(target, str), f"append-text onto {target!r} at {operation['path']}"
        return target + operation["value"]
    container = {} if target is None else target
    key, rest = path[0], path[1:]
    if isinstance(container, list):
        index = int(key)
        assert str(index) == key, f"not an array index: {key} in {operation['path']}"
        assert 0 <= index <= len(container), f"index {key} out of bounds in {operation['path']}"
        items = [*container, None] if index == len(container) else list(container)
        items[index] = apply_operation(items[index], rest, operation)
        return items
    assert isinstance(container, dict), f"path {operation['path']} goes through {container!r}"
    return {**container, key: apply_operation(container.get(key), rest, operation)}


def decode(reply: Reply, state: Json, protocol: str) -> None:
    """Replay the stream onto the state the request sent; fail on anything the client would drop."""
    if protocol == "data-stream":
        for line in reply.body.splitlines():
            if not line:
                reply.keepalives += 1
                continue
            kind, _, payload = line.partition(":")
            if kind == "aui-state":
                reply.operations += json.loads(payload)
            elif kind == "3":
                reply.errors.append(json.loads(payload))
            else:
                raise AssertionError(f"unexpected data-stream line {line!r}")
    else:
        events = reply.body.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""], "SSE stream must end with [DONE]"
        for event in events[:-2]:
            if event.startswith(":"):
                reply.keepalives += 1
                continue
            assert event.startswith("data: "), f"unexpected SSE event {event!r}"
            frame = json.loads(event.removeprefix("data: "))
            if frame["type"] == "update-state":
                reply.operations += frame["operations"]
            elif frame["type"] == "error":
                reply.errors.append(frame["error"])
            else:
                raise AssertionError(f"unexpected frame {frame}")
    for operation in reply.operations:
        state = apply_operation(state, operation["path"], operation)
    reply.state = state


def appended(reply: Reply, field_name: str) -> list[str]:
    """The pieces streamed into fields of this name by append-text operations."""
    return [op["value"] for op in reply.operations if op["type"] == "append-text" and op["path"][-1] == field_name]


def send(client: httpx.Client, body: Json, protocol: str = "data-stream", **headers: str) -> Reply:
    """POST /assistant and read the reply chunk by chunk, noting when each arrived."""
    with client.stream("POST", "/assistant", json=body, headers=headers) as response:
        reply = Reply(response.status_code, response.headers)
        for chunk in response.iter_raw():
            reply.chunks.append((time.monotonic(), chunk))
    if reply.status == 200:
        decode(reply, body.get("state"), protocol)
    return reply


def user_says(text: str, parent_id: str | None = None, source_id: str | None = None) -> Json:
    message = {"role": "user", "parts": [{"type": "text", "text": text}]}
    return {"type": "add-message", "message": message, "parentId": parent_id, "sourceId": source_id}


def tool_result(state: Json, result: Json, is_error: bool = False) -> Json:
    call = state["messages"][-1]["parts"][-1]
    return {
        "type": "add-tool-result",
        "toolCallId": call["toolCallId"],
        "toolName": call["toolName"],
        "result": result,
        "isError": is_error,
    }


def chat(client: httpx.Client, state: Json, *commands: Json, protocol: str = "data-stream", **extra: Json) -> Reply:
    reply = send(client, {"commands": list(commands), "state": state, **extra}, protocol)
    assert reply.status == 200, reply.body
    assert reply.errors == []
    return reply


def texts(message: Json) -> str:
    return "".join(part["text"] for part in message["parts"] if part["type"] == "text")


def tool_calls(state: Json) -> list[Json]:
    return [part for message in state["messages"] for part in message["parts"] if part["type"] == "tool-call"]


# --- The conversation ---------------------------------------------------------------------


def test_health_says_which_agent_serves(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "healthy",
        "service": "assistant-transport-backend-django",
        "version": app.__version__,
        "agent": "mock",
        "model": None,
        "protocol": "data-stream",
    }


@pytest.mark.parametrize("start", [{"state": None}, {}], ids=["state-null", "state-absent"])
def test_new_thread_gets_the_user_message_and_a_reply(client: httpx.Client, start: Json, protocol: str) -> None:
    reply = send(client, {"commands": [user_says("hello there")], **start}, protocol)
    assert reply.status == 200
    user, assistant = reply.messages
    assert user["role"] == "user"
    assert user["parts"] == [{"type": "text", "text": "hello there"}]
    assert assistant["role"] == "assistant"
    assert texts(assistant) == 'You said: "hello there".'


def test_reply_arrives_in_pieces_over_time(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "MOCK_DELAY", 0.05)
    reply = chat(client, None, user_says("one two three four five six"))
    text_chunks = [(at, chunk) for at, chunk in reply.chunks if b"append-text" in chunk]
    assert len(text_chunks) >= 8, "each word should arrive in its own chunk"
    assert text_chunks[-1][0] - text_chunks[0][0] >= 0.3, "the pieces arrived in one lump"
    assert texts(reply.messages[1]) == 'You said: "one two three four five six".'


def test_reply_is_written_with_append_text_operations(client: httpx.Client) -> None:
    reply = chat(client, None, user_says("stream me"))
    assert appended(reply, "text") == ["You", " said:", ' "stream', ' me".']


def test_long_messages_are_quoted_only_in_part(client: httpx.Client) -> None:
    reply = chat(client, None, user_says("word " * 5000))
    assert reply.messages[0]["parts"][0]["text"] == "word " * 5000
    assert len(texts(reply.messages[1])) < 600


def test_image_parts_are_kept_and_acknowledged(client: httpx.Client) -> None:
    message = {
        "role": "user",
        "parts": [{"type": "text", "text": "look"}, {"type": "image", "image": "data:image/png;base64,iVBORw0KGgo="}],
    }
    reply = chat(client, None, {"type": "add-message", "message": message})
    assert reply.messages[0]["parts"] == message["parts"]
    assert texts(reply.messages[1]) == 'You said: "look" and sent 1 image(s).'


def test_every_added_message_has_a_unique_id(client: httpx.Client) -> None:
    first = chat(client, None, user_says("one"))
    second = chat(client, first.state, user_says("two"))
    ids = [message["id"] for message in second.messages]
    assert len(ids) == 4
    assert all(ids)
    assert len(set(ids)) == 4


def test_unknown_state_fields_are_kept(client: httpx.Client) -> None:
    state: Json = {
        "messages": [
            {
                "id": "m1",
                "role": "user",
                "parts": [{"type": "text", "text": "hi", "note": 1}],
                "metadata": {"pinned": True},
            }
        ],
        "draft": {"title": "kept"},
    }
    reply = chat(client, state, user_says("again", parent_id="m1"))
    assert reply.state["draft"] == {"title": "kept"}
    assert reply.messages[0] == state["messages"][0]


def test_all_commands_of_a_request_are_applied_in_order(client: httpx.Client) -> None:
    reply = chat(client, None, user_says("first"), user_says("second"))
    assert [texts(message) for message in reply.messages] == ["first", "second", 'You said: "second".']


def test_edit_drops_the_messages_after_its_parent(client: httpx.Client) -> None:
    first = chat(client, None, user_says("one"))
    second = chat(client, first.state, user_says("two"))
    parent = second.messages[1]["id"]
    edited = chat(client, second.state, user_says("two, edited", parent_id=parent, source_id=second.messages[2]["id"]))
    assert [texts(message) for message in edited.messages] == [
        "one",
        'You said: "one".',
        "two, edited",
        'You said: "two, edited".',
    ]


def test_editing_the_first_message_starts_the_thread_over(client: httpx.Client) -> None:
    first = chat(client, None, user_says("one"))
    second = chat(client, first.state, user_says("two"))
    edited = chat(client, second.state, user_says("uno", parent_id=None, source_id=second.messages[0]["id"]))
    assert [texts(message) for message in edited.messages] == ["uno", 'You said: "uno".']


def test_parent_id_naming_no_message_appends(client: httpx.Client) -> None:
    first = chat(client, None, user_says("one"))
    second = chat(client, first.state, user_says("two", parent_id="not-in-the-thread"))
    assert [texts(message) for message in second.messages][:3] == ["one", 'You said: "one".', "two"]


def test_custom_command_is_accepted_and_changes_nothing(client: httpx.Client) -> None:
    first = chat(client, None, user_says("one"))
    reply = chat(client, first.state, {"type": "set-mood", "mood": "cheerful"})
    assert reply.state == first.state


# --- The weather tool round trip ----------------------------------------------------------------


def test_weather_question_streams_a_get_weather_call_and_stops(client: httpx.Client, protocol: str) -> None:
    reply = chat(client, None, user_says("What's the weather in Paris?"), protocol=protocol)
    assistant = reply.messages[-1]
    assert texts(assistant).endswith("Let me check the weather in Paris.")
    call = assistant["parts"][-1]
    assert call["type"] == "tool-call"
    assert call["toolName"] == "get_weather"
    assert call["toolCallId"]
    assert json.loads(call["argsText"]) == call["args"] == {"location": "Paris"}
    assert "result" not in call, "the frontend runs the tool, not the backend"
    assert len(appended(reply, "argsText")) >= 2, "the arguments should stream in pieces"


def test_tool_result_gets_a_closing_sentence_and_no_second_call(client: httpx.Client, protocol: str) -> None:
    asked = chat(client, None, user_says("weather in Oslo?"), protocol=protocol)
    answered = chat(
        client, asked.state, tool_result(asked.state, {"temperature": "3°C", "sky": "snow"}), protocol=protocol
    )
    (call,) = tool_calls(answered.state)
    assert call["result"] == {"temperature": "3°C", "sky": "snow"}
    assert call["isError"] is False
    closing = answered.messages[-1]["parts"][-1]
    assert closing == {"type": "text", "text": 'Here is the weather in Oslo: {"temperature": "3°C", "sky": "snow"}'}
    again = chat(client, answered.state, {"type": "refresh"}, protocol=protocol)
    assert again.state == answered.state, "the run loop must end after the closing sentence"


@pytest.mark.parametrize("result", ["Sunny", 21.5, [1, 2], None, True, {"nested": {"deep": [1]}}])
def test_tool_result_may_be_any_json_value(client: httpx.Client, result: Json) -> None:
    asked = chat(client, None, user_says("weather?"))
    answered = chat(client, asked.state, tool_result(asked.state, result))
    assert tool_calls(answered.state)[0]["result"] == result


def test_tool_error_is_reported_to_the_user(client: httpx.Client) -> None:
    asked = chat(client, None, user_says("weather in Rome?"))
    answered = chat(client, asked.state, tool_result(asked.state, "service down", is_error=True))
    assert tool_calls(answered.state)[0]["isError"] is True
    assert texts(answered.messages[-1]).endswith("Sorry, I could not get the weather in Rome: service down")


def test_tool_result_artifact_is_stored_on_the_part(client: httpx.Client) -> None:
    asked = chat(client, None, user_says("weather?"))
    command = {**tool_result(asked.state, "ok"), "artifact": {"chart": [1, 2]}, "modelContent": [{"type": "text"}]}
    answered = chat(client, asked.state, command)
    assert tool_calls(answered.state)[0]["artifact"] == {"chart": [1, 2]}


def test_no_tool_call_when_the_frontend_does_not_offer_get_weather(client: httpx.Client) -> None:
    tools = {
        "get_weather": {"description": "weather", "parameters": {"type": "object"}, "disabled": True},
        "search": {"parameters": {"type": "object"}},
    }
    reply = chat(client, None, user_says("weather in Lima?"), tools=tools)
    assert tool_calls(reply.state) == []


def test_request_fields_the_backend_does_not_use_are_accepted(client: httpx.Client) -> None:
    extra: dict[str, Any] = {
        "system": "Be brief.",
        "threadId": "t1",
        "parentId": None,
        "runConfig": {},
        "custom": [1],
        "callSettings": {"temperature": 0.2},
        "config": {"apiKey": "sk-client", "baseUrl": "http://evil"},
        "temperature": 0.2,
        "apiKey": "sk-client",
    }
    reply = chat(client, None, user_says("hi"), **extra)
    assert texts(reply.messages[1]) == 'You said: "hi".'


# --- Streams: headers, keep-alives, errors inside a run, disconnects -----------------------------


def test_stream_headers_tell_proxies_not_to_buffer(client: httpx.Client, protocol: str) -> None:
    reply = chat(client, None, user_says("hi"), protocol=protocol)
    media_type = "text/plain" if protocol == "data-stream" else "text/event-stream"
    assert reply.headers["content-type"] == f"{media_type}; charset=utf-8"
    assert reply.headers["cache-control"] == "no-cache"
    assert reply.headers["x-accel-buffering"] == "no"


def test_keepalives_flow_while_the_run_is_idle(
    client: httpx.Client, protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "MOCK_DELAY", 0.3)
    monkeypatch.setattr(app, "HEARTBEAT_SECONDS", 0.05)
    reply = chat(client, None, user_says("slow"), protocol=protocol)
    assert reply.keepalives >= 4
    assert texts(reply.messages[1]) == 'You said: "slow".'


def test_error_mid_run_reaches_the_client_and_keeps_the_conversation(
    client: httpx.Client, protocol: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def failing_agent(controller: RunController, request: app.AssistantRequest) -> None:
        controller.state["messages"].append({"id": "a1", "role": "assistant", "parts": []})
        await app.type_text(controller, app.add_text_part(controller), "Half a")
        raise RuntimeError("model exploded")

    first = chat(client, None, user_says("one"), protocol=protocol)
    monkeypatch.setattr(app, "run_agent", failing_agent)
    reply = send(client, {"commands": [user_says("two")], "state": first.state}, protocol)
    assert reply.status == 200
    assert reply.errors == ["The assistant failed while replying. The server log has the details."]
    assert [texts(message) for message in reply.messages] == ["one", 'You said: "one".', "two", "Half a"]
    assert "model exploded" in caplog.text
    assert "Traceback" in caplog.text
    assert client.get("/health").status_code == 200


def test_client_disconnect_stops_the_run(
    server: Server, client: httpx.Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(app, "MOCK_DELAY", 0.05)
    caplog.set_level(logging.INFO, logger="assistant_transport")
    baseline = server.task_count()
    body = {"commands": [user_says("word " * 200)], "state": None}
    with client.stream("POST", "/assistant", json=body) as response:
        next(response.iter_raw())
    client.close()  # the tab closes: the connection goes away
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline and (server.task_count() > baseline or "run stopped" not in caplog.text):
        time.sleep(0.02)
    assert "Client disconnected; run stopped" in caplog.text
    assert server.task_count() == baseline, "a task outlived the disconnected stream"


# --- Errors before the stream: JSON, with CORS headers, and the server keeps going ---------------

GOOD_BODY = json.dumps({"commands": []})
Case = tuple[str, str, dict[str, str], bytes, int]
ERRORS: dict[str, Case] = {
    "invalid-json": ("POST", "/assistant", {}, b"{nope", 400),
    "not-utf8": ("POST", "/assistant", {}, b'{"commands": ["\xff"]}', 400),
    "nested-too-deep": (
        "POST",
        "/assistant",
        {},
        b'{"commands": [], "state": {"x": ' + b"[" * 300 + b"]" * 300 + b"}}",
        400,
    ),
    "missing-commands": ("POST", "/assistant", {}, b'{"state": null}', 400),
    "wrong-types": ("POST", "/assistant", {}, b'{"commands": "add-message"}', 400),
    "malformed-add-message": ("POST", "/assistant", {}, b'{"commands": [{"type": "add-message"}]}', 400),
    "bad-state": ("POST", "/assistant", {}, b'{"commands": [], "state": {"messages": [{"role": "robot"}]}}', 400),
    "too-many-commands": ("POST", "/assistant", {}, json.dumps({"commands": [{"type": "x"}] * 101}).encode(), 400),
    "unknown-tool-call": (
        "POST",
        "/assistant",
        {},
        b'{"commands": [{"type": "add-tool-result", "toolCallId": "x"}]}',
        400,
    ),
    "not-json-content-type": ("POST", "/assistant", {"Content-Type": "text/plain"}, GOOD_BODY.encode(), 415),
    "wrong-method": ("GET", "/assistant", {}, b"", 405),
    "wrong-method-health": ("POST", "/health", {}, b"", 405),
    "unknown-path": ("GET", "/nope", {}, b"", 404),
    "host-not-allowed": ("GET", "/health", {"Host": "evil.example"}, b"", 400),
}


def request(client: httpx.Client, method: str, path: str, headers: dict[str, str], body: bytes) -> httpx.Response:
    return client.request(method, path, content=body, headers={"Content-Type": "application/json", **headers})


@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS.keys())
def test_bad_request_gets_a_json_error_and_the_server_keeps_serving(client: httpx.Client, case: Case) -> None:
    method, path, headers, body, status = case
    response = request(client, method, path, headers, body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["error"], str)
    assert response.json()["error"]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS.keys())
def test_error_responses_carry_cors_headers(client: httpx.Client, case: Case) -> None:
    method, path, headers, body, status = case
    response = request(client, method, path, {"Origin": FRONTEND, **headers}, body)
    assert response.status_code == status
    assert response.headers["access-control-allow-origin"] == FRONTEND
    assert "Origin" in response.headers["vary"]


def test_schema_errors_list_what_is_wrong(client: httpx.Client) -> None:
    response = request(client, "POST", "/assistant", {}, b'{"commands": [{"type": "add-message"}]}')
    details = response.json()["details"]
    assert [problem["loc"] for problem in details] == [["commands", 0, "add-message", "message"]]


def test_wrong_method_names_the_allowed_one(client: httpx.Client) -> None:
    assert client.get("/assistant").headers["allow"] == "POST"
    assert client.delete("/health").headers["allow"] == "GET"


def test_unknown_tool_call_is_named(client: httpx.Client) -> None:
    body = b'{"commands": [{"type": "add-tool-result", "toolCallId": "call_gone", "result": 1}]}'
    assert request(client, "POST", "/assistant", {}, body).json()["details"] == ["call_gone"]


def test_body_over_the_size_limit_is_refused_with_413(client: httpx.Client) -> None:
    padding = "x" * (app.MAX_REQUEST_BYTES + 1)
    body = json.dumps({"commands": [], "padding": padding}).encode()
    response = request(client, "POST", "/assistant", {"Origin": FRONTEND}, body)
    assert response.status_code == 413
    assert str(app.MAX_REQUEST_BYTES) in response.json()["error"]
    assert response.headers["access-control-allow-origin"] == FRONTEND


# --- CORS ---------------------------------------------------------------------------------------


def preflight(client: httpx.Client, origin: str, method: str = "POST") -> httpx.Response:
    return client.options(
        "/assistant",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "content-type,x-trace",
        },
    )


def test_preflight_from_an_allowed_origin_is_answered(client: httpx.Client) -> None:
    response = preflight(client, FRONTEND)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == FRONTEND
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"] == "content-type,x-trace"
    assert int(response.headers["access-control-max-age"]) > 0
    assert "Origin" in response.headers["vary"]


@pytest.mark.parametrize(
    ("origin", "method"), [("https://evil.example", "POST"), (FRONTEND, "DELETE"), (FRONTEND, "ST")]
)
def test_preflight_for_another_origin_or_method_is_refused(client: httpx.Client, origin: str, method: str) -> None:
    response = preflight(client, origin, method)
    assert response.status_code == 403
    assert "access-control-allow-methods" not in response.headers
    if origin != FRONTEND:
        assert not [name for name in response.headers if name.lower().startswith("access-control-allow")]


def test_stream_to_an_allowed_origin_carries_cors_headers(client: httpx.Client) -> None:
    reply = send(client, {"commands": [user_says("hi")]}, Origin=FRONTEND)
    assert reply.headers["access-control-allow-origin"] == FRONTEND
    assert "Origin" in reply.headers["vary"]


def test_other_origins_get_no_cors_headers(client: httpx.Client) -> None:
    reply = send(client, {"commands": [user_says("hi")]}, Origin="https://evil.example")
    assert reply.status == 200
    assert "access-control-allow-origin" not in reply.headers


def test_any_origin_means_star_without_credentials(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "ANY_ORIGIN", True)
    for response in (
        preflight(client, "https://anywhere.example"),
        client.get("/nope", headers={"Origin": "https://a.example"}),
    ):
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers


# --- Running it: python app.py, uvicorn app:application, management commands, settings -----------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_app(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=HERE, env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )


@contextmanager
def app_process(command: list[str], **env: str) -> Iterator[httpx.Client]:
    """Start the app as a user would, and wait until it answers."""
    port = free_port()
    extra = ["--port", str(port)] if "uvicorn" in command else []
    process = subprocess.Popen(
        [sys.executable, *command, *extra],
        cwd=HERE,
        env={**os.environ, "PORT": str(port), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    http.get("/health")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the server did not start"
                    time.sleep(0.1)
            yield http
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize(
    "command", [["app.py"], ["-m", "uvicorn", "app:application", "--lifespan", "on"]], ids=["python-app", "uvicorn"]
)
def test_the_documented_commands_serve_streams(command: list[str]) -> None:
    with app_process(command) as http:
        assert http.get("/health").json()["agent"] == "mock"
        reply = chat(http, None, user_says("hello"))
        assert texts(reply.messages[1]) == 'You said: "hello".'


def test_bad_setting_stops_startup_with_one_clear_line() -> None:
    result = run_app("app.py", "check", PORT="abc")
    assert result.returncode != 0
    assert result.stderr.strip() == "Invalid setting PORT='abc': expected a port number, 1-65535."


def test_app_py_doubles_as_manage_py() -> None:
    result = run_app("app.py", "check")
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_runserver_says_plainly_that_it_cannot_stream() -> None:
    result = run_app("app.py", "runserver")
    assert result.returncode != 0
    assert "python app.py" in result.stderr
    assert "WSGI" in result.stderr


def test_debug_is_off_unless_set() -> None:
    assert settings.DEBUG is False
    assert run_app("-c", "import app; print(app.settings.DEBUG)", DEBUG="true").stdout.strip() == "True"


# --- The OpenAI agent, against a local server that streams like the OpenAI API -------------------


@dataclass
class Completion:
    """One scripted answer: streamed deltas, or an HTTP error."""

    deltas: list[Json] = field(default_factory=list)
    finish_reason: str = "stop"
    delay: float = 0
    status: int = 200
    error: Json = None


def says(*tokens: str, delay: float = 0) -> Completion:
    return Completion([{"role": "assistant", "content": ""}, *({"content": token} for token in tokens)], delay=delay)


def calls_tools(*calls: tuple[str, str, list[str]]) -> Completion:
    """Tool calls as the API streams them: id and name first, then the arguments in pieces."""
    deltas: list[Json] = [{"role": "assistant", "content": None}]
    for index, (call_id, name, pieces) in enumerate(calls):
        function = {"name": name, "arguments": ""}
        deltas.append({"tool_calls": [{"index": index, "id": call_id, "type": "function", "function": function}]})
        deltas += [{"tool_calls": [{"index": index, "function": {"arguments": piece}}]} for piece in pieces]
    return Completion(deltas, finish_reason="tool_calls")


def fails(status: int, message: str) -> Completion:
    return Completion(status=status, error={"message": message, "type": "error", "param": None, "code": None})


@dataclass
class FakeOpenAI:
    """An OpenAI-compatible server: streams scripted chat.completion.chunk events, records requests."""

    script: list[Completion] = field(default_factory=list)
    requests: list[Json] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    disconnected_at: float | None = None

    async def __call__(
        self, scope: Json, receive: Callable[[], Awaitable[Json]], send: Callable[[Json], Awaitable[None]]
    ) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        self.requests.append(json.loads(body))
        self.authorizations.append(dict(scope["headers"]).get(b"authorization", b"").decode())
        answer = self.script.pop(0) if self.script else says("ok")
        if answer.status != 200:
            await send(
                {
                    "type": "http.response.start",
                    "status": answer.status,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": json.dumps({"error": answer.error}).encode()})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        hung_up = asyncio.ensure_future(receive())  # resolves with http.disconnect when the client goes
        chunks = [
            *({"delta": delta, "finish_reason": None} for delta in answer.deltas),
            {"delta": {}, "finish_reason": answer.finish_reason},
        ]
        for choice in chunks:
            done, _ = await asyncio.wait({hung_up}, timeout=answer.delay)
            if done:
                self.disconnected_at = time.monotonic()
                return
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": "gpt-4o-mini",
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "logprobs": None, **choice}],
            }
            await send(
                {"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        hung_up.cancel()


@pytest.fixture(scope="session")
def fake_openai_server() -> Iterator[tuple[FakeOpenAI, Server]]:
    fake = FakeOpenAI()
    with serving(fake) as running:
        yield fake, running


@pytest.fixture
def fake_openai(
    fake_openai_server: tuple[FakeOpenAI, Server], server: Server, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeOpenAI]:
    """The OpenAI agent serves the next requests, with the fake as its model server."""
    fake, running = fake_openai_server
    fake.script, fake.requests, fake.authorizations, fake.disconnected_at = [], [], [], None
    model_client = openai.AsyncOpenAI(api_key="sk-server", base_url=f"{running.url}/v1", max_retries=0, timeout=5)
    monkeypatch.setattr(app, "model_client", model_client)
    monkeypatch.setattr(app, "run_agent", app.openai_agent)
    yield fake
    asyncio.run_coroutine_threadsafe(model_client.close(), server.loop).result(timeout=5)


def test_openai_reply_streams_token_by_token(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.script = [says("Hel", "lo", " from", " the", " model", delay=0.05)]
    reply = chat(client, None, user_says("hi"))
    assert texts(reply.messages[1]) == "Hello from the model"
    assert appended(reply, "text") == ["Hel", "lo", " from", " the", " model"]
    text_chunks = [at for at, chunk in reply.chunks if b"append-text" in chunk]
    assert text_chunks[-1] - text_chunks[0] >= 0.15, "the tokens arrived in one lump"
    assert fake_openai.requests[0]["model"] == "gpt-4o-mini"
    assert fake_openai.requests[0]["stream"] is True


def test_history_maps_to_openai_messages(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    image = "data:image/png;base64,iVBORw0KGgo="
    state = {
        "messages": [
            {
                "id": "u1",
                "role": "user",
                "parts": [{"type": "text", "text": "Weather here?"}, {"type": "image", "image": image}],
            },
            {
                "id": "a1",
                "role": "assistant",
                "parts": [
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool-call",
                        "toolCallId": "call_1",
                        "toolName": "get_weather",
                        "argsText": '{"location": "Oslo"}',
                        "args": {"location": "Oslo"},
                        "result": {"temp": 3},
                        "isError": False,
                    },
                    {
                        "type": "tool-call",
                        "toolCallId": "call_2",
                        "toolName": "get_time",
                        "argsText": "{}",
                        "args": {},
                        "result": "raw",
                        "modelContent": [{"type": "text", "text": "12:00"}],
                        "isError": False,
                    },
                    {"type": "text", "text": "It is 3 degrees at noon."},
                    {
                        "type": "tool-call",
                        "toolCallId": "call_3",
                        "toolName": "get_radar",
                        "argsText": "{}",
                        "args": {},
                        "result": "radar offline",
                        "isError": True,
                    },
                ],
            },
        ]
    }
    chat(client, state, user_says("Thanks!"), system="You are terse.")
    assert fake_openai.requests[0]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather here?"}, {"type": "image_url", "image_url": {"url": image}}],
        },
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "Oslo"}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {
            "role": "assistant",
            "content": "It is 3 degrees at noon.",
            "tool_calls": [
                {"id": "call_3", "type": "function", "function": {"name": "get_radar", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_3", "content": "Error: radar offline"},
        {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]},
    ]


def test_enabled_tools_are_offered_with_their_schemas(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    schema = {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}
    tools = {
        "get_weather": {"description": "Weather for a place", "parameters": schema},
        "delete_all": {"description": "Dangerous", "parameters": {"type": "object"}, "disabled": True},
    }
    chat(client, None, user_says("hi"), tools=tools)
    assert fake_openai.requests[0]["tools"] == [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Weather for a place", "parameters": schema},
        }
    ]


def test_no_tools_offered_means_no_tools_field(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    chat(client, None, user_says("hi"))
    assert "tools" not in fake_openai.requests[0]


def test_tool_call_arguments_stream_in_pieces_and_the_run_stops(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.script = [calls_tools(("call_w", "get_weather", ['{"loc', 'ation"', ': "Li', 'ma"', "}"]))]
    reply = chat(client, None, user_says("Weather in Lima?"))
    (call,) = tool_calls(reply.state)
    assert appended(reply, "argsText") == ['{"loc', 'ation"', ': "Li', 'ma"', "}"]
    assert call["toolCallId"] == "call_w"
    assert call["toolName"] == "get_weather"
    assert call["args"] == {"location": "Lima"}
    assert "result" not in call
    assert len(fake_openai.requests) == 1, "the frontend runs the tool; the backend must not call the model again"


def test_two_tool_calls_in_one_turn(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.script = [calls_tools(("call_a", "get_weather", ['{"location": "Oslo"}']), ("call_b", "get_time", []))]
    reply = chat(client, None, user_says("Weather and time?"))
    calls = tool_calls(reply.state)
    assert [(call["toolCallId"], call["args"]) for call in calls] == [("call_a", {"location": "Oslo"}), ("call_b", {})]
    assert calls[1]["argsText"] == "{}"


def test_tool_result_continues_the_run(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.script = [calls_tools(("call_w", "get_weather", ['{"location": "Lima"}'])), says("Sunny", " in Lima.")]
    asked = chat(client, None, user_says("Weather in Lima?"))
    answered = chat(client, asked.state, tool_result(asked.state, {"sky": "sunny"}))
    assert fake_openai.requests[1]["messages"][-2:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_w",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "Lima"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_w", "content": '{"sky": "sunny"}'},
    ]
    assert len(answered.messages) == 2, "the continuation belongs to the same assistant message"
    assert answered.messages[1]["parts"][-1] == {"type": "text", "text": "Sunny in Lima."}


def test_call_settings_pass_through(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    settings_ = {
        "maxTokens": 50,
        "temperature": 0.3,
        "topP": 0.9,
        "presencePenalty": 0.1,
        "frequencyPenalty": 0.2,
        "seed": 7,
    }
    chat(client, None, user_says("hi"), callSettings=settings_)
    sent = fake_openai.requests[0]
    assert {
        key: sent[key]
        for key in ("max_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed")
    } == {
        "max_tokens": 50,
        "temperature": 0.3,
        "top_p": 0.9,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "seed": 7,
    }


def test_call_settings_out_of_range_are_refused(client: httpx.Client) -> None:
    body = json.dumps({"commands": [], "callSettings": {"temperature": 9}}).encode()
    response = request(client, "POST", "/assistant", {}, body)
    assert response.status_code == 400
    assert response.json()["details"][0]["loc"] == ["callSettings", "temperature"]


def test_client_sent_api_key_and_base_url_are_ignored(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    config = {"apiKey": "sk-stranger", "baseUrl": "http://127.0.0.1:9/v1", "modelName": "gpt-evil"}
    reply = chat(client, None, user_says("hi"), config=config, apiKey="sk-stranger", baseUrl="http://127.0.0.1:9/v1")
    assert texts(reply.messages[1]) == "ok"
    assert fake_openai.authorizations == ["Bearer sk-server"]
    assert fake_openai.requests[0]["model"] == "gpt-4o-mini"


MODEL_ERRORS = {
    "bad-key": (
        fails(401, "Incorrect API key provided: sk-se***er."),
        "The model server rejected this server's API key.",
    ),
    "rate-limit": (
        fails(429, "Rate limit reached for requests"),
        "The model server answered 429: Rate limit reached for requests",
    ),
    "server-error": (fails(500, "The server had an error"), "The model server answered 500: The server had an error"),
    "timeout": (says("late", delay=2), "The model server did not answer in time."),
}


@pytest.mark.parametrize("case", MODEL_ERRORS.values(), ids=MODEL_ERRORS.keys())
def test_model_errors_become_a_readable_error_frame(
    client: httpx.Client,
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    protocol: str,
    caplog: pytest.LogCaptureFixture,
    case: tuple[Completion, str],
) -> None:
    failure, message = case
    monkeypatch.setattr(app.model_client, "timeout", 0.5)
    fake_openai.script = [failure]
    reply = send(client, {"commands": [user_says("hi")], "state": None}, protocol)
    assert reply.status == 200
    assert reply.errors == [message]
    assert reply.messages[0]["parts"] == [{"type": "text", "text": "hi"}], "the user's message must survive"
    assert "Model request failed" in caplog.text
    assert "sk-server" not in reply.body


def test_unreachable_model_server_becomes_an_error_frame(
    client: httpx.Client, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    unreachable = openai.AsyncOpenAI(api_key="sk-server", base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0)
    monkeypatch.setattr(app, "model_client", unreachable)
    reply = send(client, {"commands": [user_says("hi")], "state": None})
    assert reply.errors == ["Could not reach the model server."]
    assert texts(reply.messages[0]) == "hi"


def test_disconnect_closes_the_upstream_request_within_a_second(
    server: Server, client: httpx.Client, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="assistant_transport")
    fake_openai.script = [says(*["token "] * 200, delay=0.05)]
    baseline = server.task_count()
    with client.stream("POST", "/assistant", json={"commands": [user_says("talk")], "state": None}) as response:
        for chunk in response.iter_raw():
            if b"append-text" in chunk:
                break
    client.close()
    closed_at = time.monotonic()
    while fake_openai.disconnected_at is None and time.monotonic() < closed_at + 2:
        time.sleep(0.01)
    assert fake_openai.disconnected_at is not None, "the upstream request was never closed"
    print(f"disconnect to upstream close: {(fake_openai.disconnected_at - closed_at) * 1000:.0f} ms")
    assert fake_openai.disconnected_at - closed_at < 1
    deadline = time.monotonic() + 1
    while server.task_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.task_count() == baseline, "a task outlived the disconnected stream"


def test_openai_settings_choose_the_agent(fake_openai_server: tuple[FakeOpenAI, Server]) -> None:
    fake, running = fake_openai_server
    fake.script = [says("Hi", " there")]
    with app_process(
        ["app.py"], OPENAI_API_KEY="sk-env", OPENAI_BASE_URL=f"{running.url}/v1", OPENAI_MODEL="local-model"
    ) as http:
        assert http.get("/health").json() | {"version": None} == {
            "status": "healthy",
            "service": "assistant-transport-backend-django",
            "version": None,
            "agent": "openai",
            "model": "local-model",
            "protocol": "data-stream",
        }
        reply = chat(http, None, user_says("hello"))
    assert texts(reply.messages[1]) == "Hi there"
    assert fake.requests[-1]["model"] == "local-model"
    assert fake.authorizations[-1] == "Bearer sk-env"


def test_model_reads_the_tool_results_model_content(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.script = [calls_tools(("call_c", "render_chart", ["{}"])), says("Done.")]
    asked = chat(client, None, user_says("Chart it"))
    command = {
        **tool_result(asked.state, {"svg": "<svg>…</svg>"}),
        "modelContent": [{"type": "text", "text": "A bar chart."}],
    }
    chat(client, asked.state, command)
    assert fake_openai.requests[1]["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_c",
        "content": "A bar chart.",
    }


def test_readme_shows_the_runtime_provider_the_browser_check_runs() -> None:
    provider = (HERE / "e2e" / "page" / "MyRuntimeProvider.tsx").read_text()
    assert provider in (HERE / "README.md").read_text()


def test_signal_receivers_you_connect_still_run(client: httpx.Client) -> None:
    seen: list[str] = []

    def on_start(**kwargs: object) -> None:
        seen.append("started")

    def on_finish(**kwargs: object) -> None:
        seen.append("finished")

    request_started.connect(on_start)
    request_finished.connect(on_finish)
    try:
        chat(client, None, user_says("hi"))
        deadline = time.monotonic() + 1  # request_finished comes when Django closes the response, after the last byte
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        request_started.disconnect(on_start)
        request_finished.disconnect(on_finish)
    assert seen == ["started", "finished"]


def test_open_streams_do_not_each_hold_a_thread(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    def sync_receiver(**kwargs: object) -> None:
        """A plain sync receiver, as a project adds: Django runs it in a worker thread."""

    monkeypatch.setattr(app, "MOCK_DELAY", 0.5)
    request_started.connect(sync_receiver)
    threads_before = threading.active_count()
    try:
        with httpx.Client(base_url=server.url, timeout=10, limits=httpx.Limits(max_connections=200)) as http:
            body = {"commands": [user_says("a b c")]}
            streams = [http.stream("POST", "/assistant", json=body) for _ in range(100)]
            for stream in streams:
                next(stream.__enter__().iter_raw())
            assert threading.active_count() - threads_before <= 3
            for stream in streams:
                stream.__exit__(None, None, None)
    finally:
        request_started.disconnect(sync_receiver)


def test_lifespan_is_answered_so_uvicorn_starts_cleanly() -> None:
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Json] = []

    async def receive() -> Json:
        return messages.pop(0)

    async def send(message: Json) -> None:
        sent.append(message)

    asyncio.run(app.application({"type": "lifespan"}, receive, send))
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
