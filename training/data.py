"""Task data: JSONL records in three formats -> token ids with a loss mask on the answer only.

Formats (one JSON object per line):
  instruction        {"instruction": str, "input": str (optional), "output": str}
  chat               {"messages": [{"role": ..., "content": ...}, ...]}  loss on assistant turns
  prompt_completion  {"prompt": str, "completion": str}                 raw text, no template

Instruction and chat records are rendered with the base model's chat template where it has one
(what the served model will see); without one, a plain "### Instruction / ### Response" layout.
Prompt and answer spans are tokenized separately and concatenated, so the loss mask falls exactly
on token boundaries.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from training.data_prep import PrepSettings, negative_samples, prepare_records

DATA_FORMATS = ("instruction", "chat", "prompt_completion")
OVERLONG_POLICIES = ("truncate", "drop")


class DataError(ValueError):
    """A data file or one of its lines cannot be used; the message names file and line."""


class TextTokenizer(Protocol):
    """What training needs of a tokenizer (backbone.tokenizer.Tokenizer provides it)."""

    eos_token_ids: list[int]

    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str: ...


@dataclass
class Example:
    """One tokenized training example of one task."""

    input_ids: list[int]
    loss_mask: list[bool]  # True where the token is an answer token the loss predicts

    @property
    def num_answer_tokens(self) -> int:
        return sum(self.loss_mask)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TaskData:
    """A task's tokenized examples plus what happened on the way (reported in the log)."""

    examples: list[Example] = field(default_factory=list)
    lines: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_answer: int = 0
    prep: dict[str, int] = field(default_factory=dict)  # data preparation counts, if any
    negatives: int = 0  # negative samples added

    def report(self) -> dict[str, int]:
        return {
            "lines": self.lines,
            "examples": len(self.examples),
            "truncated": self.truncated,
            "dropped_overlong": self.dropped_overlong,
            "dropped_no_answer": self.dropped_no_answer,
            **({"prep": self.prep} if self.prep else {}),
            **({"negatives_added": self.negatives} if self.negatives else {}),
        }


def has_chat_template(tokenizer: TextTokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _plain_conversation(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """The layout used when the model has no chat template."""
    parts = []
    for message in messages:
        heading = {"user": "### Instruction", "assistant": "### Response", "system": "### System"}.get(
            message["role"], f"### {message['role'].capitalize()}"
        )
        parts.append(f"{heading}:\n{message['content']}\n\n")
    if add_generation_prompt:
        parts.append("### Response:\n")
    return "".join(parts)


def _render(tokenizer: TextTokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return _plain_conversation(messages, add_generation_prompt)


def conversation_spans(tokenizer: TextTokenizer, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_answer) spans: each assistant turn's text
    (with the template's end-of-turn marker) is an answer span, everything else context."""
    spans: list[tuple[str, bool]] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], add_generation_prompt=True) if index else ""
        through = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not before.startswith(rendered) or not through.startswith(before):
            raise DataError(
                "the chat template does not render conversations as growing prefixes, so assistant "
                "turns cannot be located; use the prompt_completion format for this model"
            )
        spans.append((before[len(rendered) :], False))
        answer = through[len(before) :]
        spans.append((answer, True))
        rendered = through
    return [(text, is_answer) for text, is_answer in spans if text]


def record_spans(record: Any, data_format: str, tokenizer: TextTokenizer) -> list[tuple[str, bool]]:
    """(text, is_answer) spans of one JSON record, or a DataError naming the missing field."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")

    def text_field(name: str, required: bool = True) -> str:
        value = record.get(name)
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            raise DataError(f"format {data_format!r} needs a string field {name!r}; found {value!r}")
        return value

    if data_format == "instruction":
        instruction, extra, output = text_field("instruction"), text_field("input", False), text_field("output")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return conversation_spans(tokenizer, [{"role": "user", "content": user}, {"role": "assistant", "content": output}])
    if data_format == "chat":
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError("format 'chat' needs a non-empty list field 'messages'")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise DataError(f"each message needs string 'role' and 'content'; found {message!r}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("a chat record needs at least one assistant message to learn from")
        return conversation_spans(tokenizer, messages)
    if data_format == "prompt_completion":
        return [(text_field("prompt"), False), (text_field("completion"), True)]
    raise DataError(f"unknown data format {data_format!r}; choose one of {', '.join(DATA_FORMATS)}")


def tokenize_spans(
    spans: Sequence[tuple[str, bool]], tokenizer: TextTokenizer, append_eos: bool
) -> Example:
    input_ids: list[int] = []
    loss_mask: list[bool] = []
    for text, is_answer in spans:
        ids = tokenizer.encode(text)
        input_ids += ids
        loss_mask += [is_answer] * len(ids)
    if append_eos and tokenizer.eos_token_ids:
        input_ids.append(tokenizer.eos_token_ids[0])  # the model learns to stop after its answer
        loss_mask.append(True)
    return Example(input_ids, loss_mask)


def fit_length(example: Example, max_length: int, policy: str) -> Example | None:
    """Apply the over-long policy: 'truncate' keeps the first `max_length` tokens (the prompt and
    as much answer as fits), 'drop' discards the example. None = dropped."""
    if len(example) <= max_length:
        return example
    if policy == "drop":
        return None
    return Example(example.input_ids[:max_length], example.loss_mask[:max_length])


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for each non-blank line; bad JSON names the file and line."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg}); each line must be one JSON object") from None


def load_task_file(
    path: str | Path,
    data_format: str,
    tokenizer: TextTokenizer,
    max_length: int,
    overlong: str = "truncate",
    prep: PrepSettings | None = None,
    negatives: int = 0,
) -> TaskData:
    """Read, (optionally) prepare, render and tokenize one JSONL file; each bad line raises a
    DataError naming it. `negatives` > 0 adds that many negative samples per record
    (classification tasks, instruction format)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; fix the path in the config")
    if overlong not in OVERLONG_POLICIES:
        raise DataError(f"unknown over-long policy {overlong!r}; choose one of {', '.join(OVERLONG_POLICIES)}")
    # Chat templates end the assistant turn themselves; raw completions need an explicit EOS.
    append_eos = data_format == "prompt_completion" or not has_chat_template(tokenizer)
    data = TaskData()
    records = []
    for number, record in jsonl_records(path):
        try:
            record_spans(record, data_format, tokenizer)  # validate now, while the line is known
        except (DataError, ValueError) as err:
            raise DataError(f"{path}:{number}: {err}") from None
        records.append(record)
    data.lines = len(records)
    if prep is not None:
        records, data.prep = prepare_records(records, prep)
    if negatives:
        if data_format != "instruction":
            raise DataError(f"{path}: negative samples need the instruction format (a label in `output`), not {data_format!r}")
        added = negative_samples(records, per_record=negatives)
        data.negatives = len(added)
        records = records + added
    for record in records:
        full = tokenize_spans(record_spans(record, data_format, tokenizer), tokenizer, append_eos)
        example = fit_length(full, max_length, overlong)
        if example is None:
            data.dropped_overlong += 1
            continue
        if example.num_answer_tokens == 0:
            data.dropped_no_answer += 1  # truncation cut the whole answer: nothing to learn
            continue
        data.truncated += example is not full
        data.examples.append(example)
    return data
