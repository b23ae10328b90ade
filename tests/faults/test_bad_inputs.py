"""The bad-input corpus: each input reaches a real worker as a raw job (what a buggy or hostile
producer with access to Redis can enqueue, past every client-side check) and, where a producer
could send it, through kd_client's own validation too. Every one must end in a clear, typed
error to the submitter, with the worker alive and no other job lost; payload-level mistakes
must be refused before the worker touches a single file.

One worker serves the whole corpus (module scope): the bad jobs are enqueued interleaved with
good ones, and the good ones must all publish."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from faultkit import client_settings, raw_enqueue, store_blob, submit
from helpers import SAMPLES, WorkerProcess, connect, row, wait_status, worker_env
from rq import Queue
from rq.serializers import JSONSerializer

from jobs.errors import KDError
from jobs.models import TASK_FUNC, blob_key
from kd_client import queue as Q

MAX_EXAMPLES, MAX_DATA_BYTES = 50, 16 * 1024 * 1024  # the corpus worker's limits
GOOD = b'{"prompt": "What should be remembered about this user?"}\n'


@dataclass
class Case:
    """One bad input. By default it is a payload built from these fields, enqueued raw; `inject`
    replaces that for inputs that are not payloads (pickle, functions, job metadata)."""

    name: str
    error: str  # the typed error the submitter sees (worker side)
    says: str  # a fragment of its message
    data: bytes | None = None  # default: one good prompt naming the case (distinct blobs per case)
    kind: str = "prompts"
    domain: str = "memory"
    overrides: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)  # other payload fields (teacher, student, ...)
    ref: dict[str, Any] = field(default_factory=dict)  # DataRef fields to override (sha256, size, ...)
    client: str | None = None  # kd_client's error for the same input; None: only the worker can tell
    before_files: bool = False  # refused before the worker writes anything (its data blob included)
    inject: Callable[[Any, "Case", Path], str] | None = None  # (redis, case, scratch dir) -> job id

    def __post_init__(self) -> None:
        if self.data is None:
            self.data = json.dumps({"prompt": f"What should be remembered about {self.name}?"}).encode() + b"\n"


def payload_of(conn, case: Case) -> dict[str, Any]:
    blob = store_blob(conn, case.data)
    ref = {
        "kind": case.kind,
        "sha256": blob["sha256"],
        "records": 1,
        "size": blob["size"],
        "name": f"{case.name}.jsonl",
        **case.ref,
    }
    return {"schema_version": 1, "domain": case.domain, "data": [ref], "overrides": case.overrides, **case.fields}


def enqueue_payload(conn, case: Case, tmp: Path) -> str:
    return raw_enqueue(conn, {"payload": payload_of(conn, case)}, job_id=f"bad-{case.name}")


# --- inputs that are not a payload ----------------------------------------------------------------
class Gadget:
    """Unpickling this runs a shell command: the worker must never unpickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def enqueue_pickled(conn, case: Case, tmp: Path) -> str:
    """A job hash whose data is a pickle (rq's default serializer), pushed onto the queue by hand."""
    q = Queue("kd", connection=conn, serializer=JSONSerializer)
    job = q.create_job(TASK_FUNC, kwargs={"payload": payload_of(conn, case)}, job_id=f"bad-{case.name}")
    job.save()
    conn.hset(job.key, "data", zlib.compress(pickle.dumps(Gadget(tmp / "pwned"))))
    conn.rpush(q.key, job.id)
    return job.id


def enqueue_other_function(conn, case: Case, tmp: Path) -> str:
    return raw_enqueue(
        conn,
        {"payload": payload_of(conn, case)},
        func="kd_worker.daemon.task.materialize_data",
        job_id=f"bad-{case.name}",
    )


def enqueue_positional(conn, case: Case, tmp: Path) -> str:
    return raw_enqueue(conn, None, args=(payload_of(conn, case),), job_id=f"bad-{case.name}")


def enqueue_extra_kwarg(conn, case: Case, tmp: Path) -> str:
    return raw_enqueue(conn, {"payload": payload_of(conn, case), "overrides": {"x": 1}}, job_id=f"bad-{case.name}")


def enqueue_bad_ticket(conn, case: Case, tmp: Path) -> str:
    return raw_enqueue(
        conn, {"payload": payload_of(conn, case)}, meta={"ticket": "../../escaped"}, job_id=f"bad-{case.name}"
    )


def enqueue_wrong_sha(conn, case: Case, tmp: Path) -> str:
    p = payload_of(conn, case)
    tampered = case.data.replace(b"remembered", b"forgotten!")
    conn.set(blob_key(p["data"][0]["sha256"]), tampered)  # same size, other bytes
    return raw_enqueue(conn, {"payload": p}, job_id=f"bad-{case.name}")


def enqueue_missing_blob(conn, case: Case, tmp: Path) -> str:
    p = payload_of(conn, case)
    conn.delete(blob_key(p["data"][0]["sha256"]))
    return raw_enqueue(conn, {"payload": p}, job_id=f"bad-{case.name}")


LONG_PROMPT = json.dumps({"prompt": " ".join(f"word{i}" for i in range(400))}).encode() + b"\n"

CASES = [
    # data files
    Case(
        "malformed_jsonl",
        "DataError",
        "line 2: not valid JSON",
        data=GOOD + b'{"prompt": "unterminated\n',
        client="DataError",
    ),
    Case(
        "json_array_line",
        "DataError",
        "line 1: record: Input should be a valid dictionary",
        data=b"[1, 2, 3]\n",
        client="DataError",
    ),
    Case(
        "wrong_field_type",
        "DataError",
        "line 1: prompt: Input should be a valid string",
        data=b'{"prompt": 123}\n',
        client="DataError",
    ),
    Case(
        "unknown_record_field",
        "DataError",
        "Extra inputs are not permitted",
        data=b'{"prompt": "hi", "answer": "x"}\n',
        client="DataError",
    ),
    Case("empty_prompt", "DataError", "must not be empty", data=b'{"prompt": "   "}\n', client="DataError"),
    Case("empty_file", "DataError", "no records (the file is empty)", data=b"\n\n", client="DataError"),
    Case(
        "ten_mb_prompt",
        "DataError",
        "at most 200000 characters",
        data=json.dumps({"prompt": "x" * (10 * 1024 * 1024)}).encode() + b"\n",
        client="DataError",
    ),
    Case("non_utf8", "DataError", "not valid UTF-8", data=b'{"prompt": "caf\xe9 \xff"}\n', client="DataError"),
    Case(
        "prompt_longer_than_max_length",
        "DataError",
        "longer than max_seq_length=16",
        data=LONG_PROMPT,
        overrides={"max_seq_length": 16},
    ),
    Case(
        "correction_without_response",
        "DataError",
        'a correction needs a "response"',
        kind="corrections",
        data=b'{"prompt": "no answer here"}\n',
        client="DataError",
    ),
    Case(
        "conversation_not_ending_with_user",
        "DataError",
        "must end with a user message",
        data=b'{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}\n',
        client="DataError",
    ),
    Case(
        "too_many_examples",
        "DataError",
        f"more than {MAX_EXAMPLES} examples",
        data=b"".join(json.dumps({"prompt": f"q{i}"}).encode() + b"\n" for i in range(MAX_EXAMPLES + 5)),
    ),
    Case("blob_over_max_data_bytes", "DataError", "exceeds KD_MAX_DATA_BYTES", ref={"size": MAX_DATA_BYTES + 1}),
    Case("sha256_mismatch", "DataError", "does not match its sha256", inject=enqueue_wrong_sha),
    Case("missing_data_blob", "DataError", "missing or expired in Redis", inject=enqueue_missing_blob),
    # the payload itself
    Case(
        "domain_dotdot_etc",
        "ConfigError",
        "domain '../etc' is not allowed",
        domain="../etc",
        client="ConfigError",
        before_files=True,
    ),
    Case(
        "domain_with_slash",
        "ConfigError",
        "domain 'a/b' is not allowed",
        domain="a/b",
        client="ConfigError",
        before_files=True,
    ),
    Case("domain_unicode", "ConfigError", "is not allowed", domain="mémoire", client="ConfigError", before_files=True),
    Case("domain_empty", "ConfigError", "domain '' is not allowed", domain="", client="ConfigError", before_files=True),
    Case(
        "unknown_config_key",
        "ConfigError",
        "did you mean 'temperature'",
        overrides={"temprature": 2.0},
        client="ConfigError",
        before_files=True,
    ),
    Case(
        "temperature_out_of_range",
        "ConfigError",
        "temperature=0.01",
        overrides={"temperature": 0.01},
        client="ConfigError",
        before_files=True,
    ),
    Case(
        "alpha_out_of_range",
        "ConfigError",
        "alpha=1.5",
        overrides={"alpha": 1.5},
        client="ConfigError",
        before_files=True,
    ),
    Case(
        "rank_out_of_range",
        "ConfigError",
        "lora_rank=0",
        overrides={"lora_rank": 0},
        client="ConfigError",
        before_files=True,
    ),
    Case(
        "huge_learning_rate",
        "ConfigError",
        "learning_rate=1000000.0",
        overrides={"learning_rate": 1e6},
        client="ConfigError",
        before_files=True,
    ),
    Case(
        "lora_keys_matching_nothing",
        "ConfigError",
        "match no layer of the student",
        overrides={"lora_keys": ["no_such_proj"]},
    ),
    Case(
        "future_schema_version",
        "ConfigError",
        "schema_version 99 is newer than this worker supports",
        fields={"schema_version": 99},
        before_files=True,
    ),
    Case(
        "unknown_payload_field",
        "ConfigError",
        "Extra inputs are not permitted",
        fields={"run_as": "root"},
        before_files=True,
    ),
    Case(
        "model_name_escaping_root",
        "ConfigError",
        "must be a directory name under the worker's models root",
        fields={"teacher": "../teacher"},
        client="ConfigError",
        before_files=True,
    ),
    # models named by the job (under the corpus worker's KD_MODELS_ROOT)
    Case(
        "model_symlinked_out_of_root",
        "SecurityError",
        "resolves outside KD_MODELS_ROOT",
        fields={"student": "escape"},
        before_files=True,
    ),
    Case(
        "missing_model_dir",
        "ConfigError",
        "is not a model directory",
        fields={"student": "nothing-here"},
        before_files=True,
    ),
    Case(
        "unreadable_model_dir",
        "ConfigError",
        "is not a model directory",
        fields={"student": "unreadable"},
        before_files=True,
    ),
    Case("corrupt_config_json", "ModelError", "config.json cannot be read as JSON", fields={"student": "bad-config"}),
    Case("corrupt_safetensors", "ModelError", "cannot load model", fields={"student": "corrupt-weights"}),
    Case(
        "tokenizer_model_vocab_mismatch",
        "ModelError",
        "tokenizer and weights do not belong together",
        fields={"student": "vocab-mismatch"},
    ),
    Case("incompatible_architecture", "ModelError", "not supported", fields={"student": "unknown-arch"}),
    # what runs, and how it is serialized
    Case("non_allow_listed_function", "SecurityError", "is not allowed on this worker", inject=enqueue_other_function),
    Case("pickle_serialized_payload", "SecurityError", "reads JSON only and never unpickles", inject=enqueue_pickled),
    Case(
        "positional_arguments",
        "ConfigError",
        "job arguments must be kwargs",
        inject=enqueue_positional,
        before_files=True,
    ),
    Case(
        "extra_keyword_argument",
        "ConfigError",
        "job arguments must be kwargs",
        inject=enqueue_extra_kwarg,
        before_files=True,
    ),
    Case(
        "ticket_path_traversal",
        "ConfigError",
        "ticket: Input should be a valid integer",
        inject=enqueue_bad_ticket,
        before_files=True,
    ),
]


def build_bad_models(root: Path, good: Path) -> None:
    """Model directories a job may name under KD_MODELS_ROOT, each broken in one way root cannot bypass."""
    root.mkdir(parents=True)
    (root / "escape").symlink_to(good / "student")  # a link out of the root
    (root / "unreadable").mkdir()
    (root / "unreadable" / "config.json").mkdir()  # no file can be read there, even by root
    for name, source in (
        ("bad-config", "student"),
        ("corrupt-weights", "student"),
        ("vocab-mismatch", "student-llama"),
        ("unknown-arch", "student"),
    ):
        shutil.copytree(good / source, root / name)
    (root / "bad-config" / "config.json").write_text("{ not json")
    weights = root / "corrupt-weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # truncated mid-tensor
    for f in ("tokenizer.json", "tokenizer_config.json"):  # the teacher's 1,003 tokens on 832 embedding rows
        shutil.copy(good / "teacher" / f, root / "vocab-mismatch" / f)
    cfg = json.loads((root / "unknown-arch" / "config.json").read_text())
    (root / "unknown-arch" / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_arch"}))


@dataclass
class Corpus:
    env: dict[str, str]
    conn: Any
    worker: WorkerProcess
    ids: dict[str, str]
    good: list[str]
    work: Path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, models_root, redis_server):
    redis_server.client().flushall()
    tmp = tmp_path_factory.mktemp("corpus")
    build_bad_models(tmp / "models", models_root)
    env = worker_env(
        tmp,
        models_root,
        redis_server.url,
        "0.5",
        KD_MODELS_ROOT=str(tmp / "models"),
        KD_WORKER_NAME="kd-corpus",
        KD_MAX_EXAMPLES=str(MAX_EXAMPLES),
        KD_MAX_DATA_BYTES=str(MAX_DATA_BYTES),
    )
    w = WorkerProcess(env, tmp / "worker.log").start()
    conn = connect(env)
    ids, good = {}, []
    for i, case in enumerate(CASES):
        if i % 10 == 0:  # good jobs in between: none may be lost or delayed into failure
            good.append(
                submit(env, "memory", prompts=[SAMPLES / "memory.jsonl"], overrides={"seed": i}, force_publish=True)
            )
        ids[case.name] = (case.inject or enqueue_payload)(conn, case, tmp)
    good.append(submit(env, "debug", prompts=[SAMPLES / "debug.jsonl"]))
    for job_id in [*ids.values(), *good]:
        wait_status(conn, job_id, {"finished", "failed"}, timeout=300)
    yield Corpus(env, conn, w, ids, good, tmp / "work")
    w.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_worker_fails_the_job_with_a_clear_typed_error(corpus, case):
    st = row(corpus.conn, corpus.ids[case.name])
    assert st["status"] == "failed", st
    assert st["error"].split(":")[0].endswith(case.error) and case.says in st["error"], st["error"]
    assert "Traceback" in st["traceback"]  # the whole story reaches the submitter (kd-client status)
    if case.before_files:
        sha = hashlib.sha256(case.data).hexdigest()
        assert not (corpus.work / "data" / sha).exists(), "the data blob was written before the payload was checked"


def test_the_worker_lived_through_the_corpus_and_lost_nothing(corpus):
    assert corpus.worker.proc.poll() is None
    for job_id in corpus.good:
        assert row(corpus.conn, job_id)["outcome"]["published"]
    failures = corpus.worker.events("job_failed")
    assert sorted(e["job_id"] for e in failures) == sorted(corpus.ids.values())  # each once: none retried
    assert not (corpus.work.parent / "pwned").exists()  # nothing was unpickled
    assert not (corpus.work / "escaped").exists() and not list(corpus.work.rglob("*escaped*"))
    assert not Q.list_jobs(corpus.conn, client_settings(corpus.env), {"queued", "started"})


CLIENT_CASES = [c for c in CASES if c.client]


@pytest.mark.parametrize("case", CLIENT_CASES, ids=[c.name for c in CLIENT_CASES])
def test_the_client_refuses_what_it_can_check_before_anything_is_sent(case):
    """kd-client and EGO's KDClient validate the same input at submit time (no Redis needed)."""
    with pytest.raises(KDError) as e:
        ds = Q.prepare_dataset(case.kind, case.data, f"{case.name}.jsonl", 64 * 1024 * 1024)
        Q.build_job(
            case.domain, [ds], case.overrides, **{k: v for k, v in case.fields.items() if k != "schema_version"}
        )
    assert type(e.value).__name__ == case.client
