"""One example of a domain's corpus, as the worker records it and `kd-client data` reads it.

The corpus is the memory of the continual loop: every example a job of the domain trained or held
out, stored once under its content address (`jobs.records.example_key`), with where it came from.
Later jobs replay its training members; the held-out ones feed the regression set of the publish
gate. The records live in Redis (several workers on several machines share one Redis, not a disk);
the Redis operations are `kd_client.corpus`'s, this module only says what a record is.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.records import Message, example_key

CORPUS_SCHEMA_VERSION = 1
PROVENANCE_MAX = 16  # entries kept per example: the first recording and the latest ones

Role = Literal["train", "held_out"]


class Provenance(BaseModel):
    """One job that submitted the example, and what the job's split made of it."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    job_id: Annotated[str, Field(min_length=1, max_length=200)]
    submitter: Annotated[str, Field(max_length=100)]
    at: datetime
    role: Role


class CorpusRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    schema_version: Literal[1] = 1  # CORPUS_SCHEMA_VERSION
    key: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    seq: Annotated[int, Field(ge=1)]  # insertion order within the domain (1 = oldest)
    prompt: Annotated[tuple[Message, ...], Field(min_length=1)]  # messages up to the assistant's turn
    response: str | None  # a correction's response; None: the teacher generates it
    provenance: Annotated[tuple[Provenance, ...], Field(min_length=1, max_length=PROVENANCE_MAX)]
    recorded: Annotated[int, Field(ge=1)]  # recordings by distinct jobs (provenance keeps at most PROVENANCE_MAX)
    offered: bool = False  # offered to the regression reservoir already (each example once)

    @model_validator(mode="after")
    def _key_matches_content(self) -> "CorpusRecord":
        if self.key != example_key(self.messages(), self.response):
            raise ValueError(f"key {self.key[:12]} does not match the record's content (corrupt or tampered)")
        return self

    @property
    def kind(self) -> Literal["prompts", "corrections"]:
        return "prompts" if self.response is None else "corrections"

    @property
    def held_out(self) -> bool:
        """Held out by some job's split: never replayed (it measures, it does not teach)."""
        return any(p.role == "held_out" for p in self.provenance)

    def messages(self) -> tuple[dict[str, str], ...]:
        """The prompt in the engine's normal form (what `example_key` hashes)."""
        return tuple({"role": m.role, "content": m.content} for m in self.prompt)

    def with_provenance(self, entry: Provenance) -> "CorpusRecord":
        """Recorded again by `entry.job_id`; a job already named (a retry) changes nothing."""
        if any(p.job_id == entry.job_id for p in self.provenance):
            return self
        kept = (*self.provenance, entry)
        if len(kept) > PROVENANCE_MAX:  # keep the first recording and the latest ones
            kept = (kept[0], *kept[len(kept) - PROVENANCE_MAX + 1 :])
        return self.model_copy(update={"provenance": kept, "recorded": self.recorded + 1})

    def as_training_record(self) -> dict[str, Any]:
        """The record as `kd-client submit` / `KDClient.submit` take it (same content key)."""
        out: dict[str, Any] = {"messages": list(self.messages())}
        if self.response is not None:
            out["response"] = self.response
        return out


def new_record(
    key: str, seq: int, prompt: tuple[dict[str, str], ...], response: str | None, entry: Provenance
) -> CorpusRecord:
    return CorpusRecord(
        key=key,
        seq=seq,
        prompt=tuple(Message(role=m["role"], content=m["content"]) for m in prompt),  # type: ignore[arg-type]
        response=response,
        provenance=(entry,),
        recorded=1,
    )


def parse_corpus_record(raw: bytes | str) -> CorpusRecord:
    """A stored record; a newer schema or a record that does not validate is a ValueError naming the key."""
    return CorpusRecord.model_validate_json(raw)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
