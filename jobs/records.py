"""Training records as producers write them (one JSON object per JSONL line).

Prompts:      {"prompt": "..."}  or  {"messages": [{"role": "user", "content": "..."}, ...]}
Corrections:  {"prompt": "...", "response": "..."}
              or {"messages": [..., {"role": "assistant", "content": "..."}]}
Optional on both: "id" (a short string) and "meta" (a JSON object, ignored by training).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs import jsonsafe
from jobs.errors import DataError

MAX_RECORD_CHARS = 200_000  # one prompt of ~50k tokens; beyond that it is a mistake, not data

DataKind = Literal["prompts", "corrections"]
DATA_KINDS: tuple[DataKind, ...] = get_args(DataKind)


def data_kind(value: str) -> DataKind:
    """A dataset kind read back from a file or an argument: one of DATA_KINDS, else a DataError."""
    for kind in DATA_KINDS:
        if value == kind:
            return kind
    raise DataError(f"data kind {value!r} is not one of {', '.join(DATA_KINDS)}")


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_RECORD_CHARS)


class Record(BaseModel):
    """One conversation: a prompt (or messages) and, for corrections, the wanted response."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    prompt: str | None = Field(default=None, max_length=MAX_RECORD_CHARS)
    messages: tuple[Message, ...] | None = Field(default=None, strict=False)  # a JSON list; messages stay strict
    response: str | None = Field(default=None, max_length=MAX_RECORD_CHARS)
    id: str | None = Field(default=None, max_length=200)
    meta: dict[str, Any] | None = None

    @field_validator("prompt", "response")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty or whitespace")
        return v

    @model_validator(mode="after")
    def _one_prompt_form(self) -> "Record":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError('give exactly one of "prompt" or "messages"')
        if self.messages is not None:
            if not self.messages:
                raise ValueError('"messages" must not be empty')
            if any(not m.content.strip() for m in self.messages):
                raise ValueError("a message has empty content")
            if self.messages[-1].role == "assistant" and self.response is not None:
                raise ValueError('the response is given twice (final assistant message and "response")')
        return self

    def conversation(self) -> tuple[tuple[dict[str, str], ...], str | None]:
        """(prompt messages, response or None): the one normal form the engine consumes."""
        if self.prompt is not None:
            return ({"role": "user", "content": self.prompt},), self.response
        msgs = tuple({"role": m.role, "content": m.content} for m in self.messages or ())
        if msgs[-1]["role"] == "assistant":
            return msgs[:-1], msgs[-1]["content"]
        return msgs, self.response


def example_key(prompt: Sequence[dict[str, str]], response: str | None) -> str:
    """The content address of one conversation in its normal form (`Record.conversation()`): the
    engine de-duplicates a job's examples by it and the domain corpus stores them under it."""
    blob = json.dumps({"p": list(prompt), "r": response}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def parse_record(obj: Any, kind: DataKind, where: str) -> Record:
    try:
        rec = Record.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "record"
        raise DataError(f"{where}: {loc}: {first['msg'].removeprefix('Value error, ')}") from e
    prompt, response = rec.conversation()
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the conversation must end with a user message before the response")
    if kind == "corrections" and response is None:
        raise DataError(f'{where}: a correction needs a "response" (or a final assistant message)')
    if kind == "prompts" and response is not None:
        raise DataError(f"{where}: a prompt record has a response; submit it as --corrections instead")
    return rec


def iter_jsonl(lines: Iterable[bytes], kind: DataKind, name: str) -> Iterator[Record]:
    """Parse and validate JSONL lines; the first bad line raises a DataError naming it."""
    for n, raw in enumerate(lines, start=1):
        where = f"{name} line {n}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from e
        if not text.strip():
            continue
        try:
            obj = jsonsafe.loads(text)
        except jsonsafe.TooDeep as e:
            raise DataError(f"{where}: {e}; records are flat objects") from e
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        yield parse_record(obj, kind, where)


def read_records(data: bytes, kind: DataKind, name: str) -> list[Record]:
    records = list(iter_jsonl(data.splitlines(), kind, name))
    if not records:
        raise DataError(f"{name}: no records (the file is empty); give at least one JSON line")
    return records


def dump_records(records: Iterable[Record | dict[str, Any]]) -> bytes:
    """Canonical JSONL bytes (sorted keys, no None fields) so equal data hashes equal."""
    lines = []
    for r in records:
        obj = r.model_dump(mode="json", exclude_none=True) if isinstance(r, Record) else r
        lines.append(json.dumps(obj, sort_keys=True, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode("utf-8")
