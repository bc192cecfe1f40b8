"""The SSE lines of chat and completion streams, driven by a scripted choice waiter: the chunks of
each event in arrival order, the usage chunk once every choice has finished, `[DONE]` at the end;
and how a failed choice, a timeout or a gone client ends a stream. Timers see each event before
its chunks are sent."""

import asyncio
import json

import pytest

from server.choice_waiter import ClientGone
from server.completion_streams import Prompt, Reply, StreamPlan, stream_chat, stream_completion
from server.http_errors import RequestTimeoutError
from server.request_handle import Finished, TextDelta

PROMPT = Prompt(ids=[5, 6, 7], text="w5 w6 w7")


class ScriptedWaiter:
    """`next()` returns the scripted (choice, event) pairs in order and raises scripted errors."""

    def __init__(self, script: list) -> None:
        self.script = list(script)

    async def next(self):
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


class RecordingTimer:
    def __init__(self, index: int, calls: list) -> None:
        self.index, self.calls = index, calls

    def on_tokens(self, count: int) -> None:
        self.calls.append(("tokens", self.index, count))

    def on_finished(self, prompt_tokens: int, completion_tokens: int, finish_reason: str) -> None:
        self.calls.append(("finished", self.index, prompt_tokens, completion_tokens, finish_reason))


def _finished(reason: str, completion_tokens: int, error: str | None = None) -> Finished:
    return Finished(reason, "", [], prompt_tokens=3, completion_tokens=completion_tokens, error=error)


def _run(stream, script: list, chat: bool, include_usage: bool, echo: bool = False) -> tuple[list, list]:
    """The stream's lines (JSON payloads parsed, `[DONE]` as is) and every timer call, in one order."""
    calls: list = []
    plan = StreamPlan(prompts=[PROMPT], n=2, chat=chat, logprobs=None, echo=echo, echo_texts=[PROMPT.text] if echo else [])
    reply = Reply(id="cmpl-1", model="tiny", created=7, include_usage=include_usage, request_id="req-1")
    timers = [RecordingTimer(index, calls) for index in range(plan.choices)]

    async def collect() -> list:
        out = []
        async for line in stream(reply, ScriptedWaiter(script), timers, plan, None):
            assert line.startswith("data: ") and line.endswith("\n\n"), line
            body = line[len("data: "):-2]
            out.append(body if body == "[DONE]" else json.loads(body))
            calls.append(("sent", len(out) - 1))
        return out

    return asyncio.run(collect()), calls


def _chat_summary(line) -> tuple:
    if line == "[DONE]" or not line["choices"]:
        return line if line == "[DONE]" else ("usage", line["usage"])
    choice = line["choices"][0]
    return choice["index"], choice["delta"], choice["finish_reason"]


SCRIPT = [(0, TextDelta("w9", [9])), (1, TextDelta("w4 w8", [4, 8])), (1, _finished("stop", 2)),
          (0, TextDelta("", [3])), (0, _finished("length", 2))]  # an empty delta (text held back) sends nothing


def test_chat_stream_sends_roles_deltas_finishes_usage_then_done():
    lines, calls = _run(stream_chat, SCRIPT, chat=True, include_usage=True)
    assert [_chat_summary(line) for line in lines] == [
        (0, {"role": "assistant", "content": ""}, None),
        (1, {"role": "assistant", "content": ""}, None),
        (0, {"content": "w9"}, None),
        (1, {"content": "w4 w8"}, None),
        (1, {}, "stop"),
        (0, {}, "length"),
        ("usage", {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
        "[DONE]",
    ]
    assert all(line["usage"] is None for line in lines[:-2]) and all(line["id"] == "cmpl-1" for line in lines[:-1])
    assert calls == [
        ("sent", 0), ("sent", 1),
        ("tokens", 0, 1), ("sent", 2), ("tokens", 1, 2), ("sent", 3), ("finished", 1, 3, 2, "stop"), ("sent", 4),
        ("tokens", 0, 1), ("finished", 0, 3, 2, "length"), ("sent", 5), ("sent", 6), ("sent", 7),
    ]  # fmt: skip


def test_completion_stream_echoes_each_prompt_first_then_texts_finishes_and_done():
    lines, calls = _run(stream_completion, SCRIPT, chat=False, include_usage=False, echo=True)
    summary = [line if line == "[DONE]" else (line["choices"][0]["index"], line["choices"][0]["text"], line["choices"][0]["finish_reason"])
               for line in lines]  # fmt: skip
    assert summary == [(0, PROMPT.text, None), (0, "w9", None), (1, PROMPT.text, None), (1, "w4 w8", None),
                       (1, "", "stop"), (0, "", "length"), "[DONE]"]  # fmt: skip
    assert all("usage" not in line for line in lines[:-1])
    assert calls[:3] == [("tokens", 0, 1), ("sent", 0), ("sent", 1)]


@pytest.mark.parametrize("stream", [stream_chat, stream_completion])
def test_a_failed_choice_ends_the_stream_with_an_error_event_and_no_usage(stream):
    script = [(0, TextDelta("w9", [9])), (1, _finished("error", 0, error="out of memory")), (0, _finished("stop", 1))]
    lines, calls = _run(stream, script, chat=stream is stream_chat, include_usage=True)
    assert lines[-2:] == [
        {"error": {"message": "generation failed: out of memory", "type": "internal_error", "param": None,
                   "code": "generation_error"}},
        "[DONE]",
    ]  # fmt: skip
    assert ("finished", 1, 3, 0, "error") in calls and not any(call[0] == "finished" and call[1] == 0 for call in calls)
    assert not any(isinstance(line, dict) and line.get("choices") == [] for line in lines)  # no usage chunk


@pytest.mark.parametrize("stream", [stream_chat, stream_completion])
def test_a_timeout_mid_stream_becomes_an_error_event_then_done(stream):
    lines, _ = _run(stream, [(0, TextDelta("w9", [9])), RequestTimeoutError(2.5)], chat=stream is stream_chat, include_usage=True)
    assert lines[-2]["error"]["code"] == "request_timeout" and "2.5 s" in lines[-2]["error"]["message"]
    assert lines[-1] == "[DONE]"


@pytest.mark.parametrize("stream", [stream_chat, stream_completion])
def test_a_gone_client_ends_the_stream_with_done_only(stream):
    lines, _ = _run(stream, [*SCRIPT[:2], ClientGone()], chat=stream is stream_chat, include_usage=True)
    assert lines[-1] == "[DONE]" and not any("error" in line for line in lines[:-1])
    texts = [line["choices"][0].get("delta", {}).get("content") or line["choices"][0].get("text") for line in lines[:-1]]
    assert [text for text in texts if text] == ["w9", "w4 w8"]
