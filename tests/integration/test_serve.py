"""`kd-client serve` as a real process on a free port, over the tiny student and adapters
published with the real publisher: every answer equals a fresh `mlx_lm.load(student,
adapter_path=<that version>)` + `mlx_lm.generate`, and names the version it came from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import mlx_lm
import pytest
from helpers import ServeProcess, kd_env, preload_blas, sse_events, venv_bin, wait_for
from lora_fixtures import adapter_config, lora_shapes, lora_weights, write_adapter

from jobs import publisher

PROMPTS = (
    "How important is it to remember the user's daughter's name?",
    "Write a function that adds two numbers.",
)
N = 16
LONG = 400  # a stream long enough to be in flight while a publish is observed (checked, not assumed)
TAGS = {"memory": 1, "code": 2, "task": 3, "action": 4, "debug": 6, "reflection": 7}


@cache
def fresh(student: Path, version: Path | None):
    return mlx_lm.load(str(student), adapter_path=None if version is None else str(version))


def expected(student: Path, version: Path | None, prompt: str, n: int = N, chat: bool = True) -> str:
    model, tok = fresh(student, version)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return mlx_lm.generate(model, tok, ids if chat else tok.encode(prompt), max_tokens=n)


def version_dir(root: Path, domain: str, n: int) -> Path:
    return (root / domain / "versions" / f"{n:04d}").resolve()


@pytest.fixture(scope="module")
def site(models_root, tmp_path_factory):
    """(student, adapters root, LoRA shapes, server): one v1 per domain, published for real."""
    student = models_root / "student"
    root = tmp_path_factory.mktemp("adapters_kd")
    shapes = lora_shapes(student)
    for domain, tag in TAGS.items():
        publisher.publish(root, domain, lambda s, t=tag: write_adapter(s, shapes, t), {"tag": tag}, keep=10)
    env = preload_blas(
        kd_env(
            KD_SERVE_WATCH_DEBOUNCE_MS="50",
            KD_SERVE_MAX_TOKENS="1024",
            KD_SERVE_MAX_PROMPT_TOKENS="256",
            KD_SERVE_MAX_BODY_BYTES="65536",
        )
    )
    server = ServeProcess(env, tmp_path_factory.mktemp("serve") / "serve.log", student, root).start()
    yield student, root, shapes, server
    server.stop()


def chat(server: ServeProcess, model: str, prompt: str, n: int = N, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": n, **extra}
    return server.request("POST", "/v1/chat/completions", body)


def check(site, status, headers, body, domain: str, version: int | None, prompt: str, n: int = N) -> None:
    student, root, _, _ = site
    assert status == 200, body
    assert headers["x-kd-adapter"] == (domain if version is None else f"{domain}/v{version}")
    assert body["kd"] == {"domain": domain, "version": version}
    where = None if version is None else version_dir(root, domain, version)
    assert body["choices"][0]["message"]["content"] == expected(student, where, prompt, n)


def test_two_domains_interleaved_and_concurrent_equal_fresh_loads(site):
    student, root, _, server = site
    plan = [(d, p) for p in PROMPTS for d in ("memory", "code")] + [("base", PROMPTS[0])]
    answers = {expected(student, None if d == "base" else version_dir(root, d, 1), p) for d, p in plan}
    assert len(answers) == len(plan), "the fixture adapters must change the output"
    for d, p in plan:  # interleaved: every request switches domain
        check(site, *chat(server, d, p), d, None if d == "base" else 1, p)
    with ThreadPoolExecutor(len(plan)) as pool:  # concurrently: queued, then served by the one MLX thread
        results = list(pool.map(lambda dp: chat(server, *dp), plan * 2))
    for (d, p), result in zip(plan * 2, results, strict=True):
        check(site, *result, d, None if d == "base" else 1, p)
    assert any(r[2]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0 for r in results), "prompt cache unused"
    assert server.health()["switches"] >= len(plan) - 1

    status, headers, body = server.request("POST", "/v1/completions", {"model": "code", "prompt": PROMPTS[1]})
    assert status == 200 and headers["x-kd-adapter"] == "code/v1" and body["kd"]["version"] == 1
    want = expected(student, version_dir(root, "code", 1), PROMPTS[1], n=512, chat=False)  # server's default
    assert body["choices"][0]["text"] == want

    full = expected(student, version_dir(root, "memory", 1), PROMPTS[0])
    stop = full[6:9]
    status, _, body = chat(server, "memory", PROMPTS[0], stop=["\u0000never", stop])
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == full[: full.index(stop)]


def test_a_publish_during_a_stream(site):
    """The stream started on v1 ends on v1 (all chunks, and its text is v1's); the next request
    gets v2; no prompt-cache entry of v1 survives or serves v2."""
    student, root, shapes, server = site
    prompt, conn = PROMPTS[0], server.connect()
    body = {"model": "task", "messages": [{"role": "user", "content": prompt}], "max_tokens": LONG, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("X-KD-Adapter") == "task/v1"
    events = sse_events(resp)
    first = next(events)  # the role chunk, sent as generation starts
    job_id = first["id"].split("-", 1)[1]

    publisher.publish(root, "task", lambda s: write_adapter(s, shapes, 33), {"tag": 33}, keep=10)
    wait_for(lambda: server.health()["observed"].get("task") == 2, 30, what="the server observing task v2")
    active = server.health()["active"]
    assert active is not None and active["job_id"] == job_id, f"the stream ended before v2 was observed: {active}"

    chunks = [first, *events]
    resp.close()
    conn.close()
    assert all(c["kd"] == {"domain": "task", "version": 1} for c in chunks)
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert sum(1 for p in pieces if p) > LONG // 4, "the text must stream as it is generated"
    text = "".join(pieces)
    assert text == expected(student, version_dir(root, "task", 1), prompt, LONG)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")

    status, headers, reply = chat(server, "task", prompt)
    check(site, status, headers, reply, "task", 2, prompt)
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # v1's KV cache was not reused
    entries = server.health()["prompt_cache"]
    assert {"neuron": "task", "version": 1} not in [{k: e[k] for k in ("neuron", "version")} for e in entries]
    assert any(e["neuron"] == "task" and e["version"] == 2 for e in entries)


def test_a_rollback_is_served(site):
    student, root, shapes, server = site
    publisher.publish(root, "action", lambda s: write_adapter(s, shapes, 44), {"tag": 44}, keep=10)
    wait_for(lambda: server.health()["served"].get("action") == 2, 30, what="action v2 installed")
    check(site, *chat(server, "action", PROMPTS[1]), "action", 2, PROMPTS[1])
    publisher.rollback(root, "action")
    wait_for(lambda: server.health()["served"].get("action") == 1, 30, what="the rollback to action v1 installed")
    check(site, *chat(server, "action", PROMPTS[1]), "action", 1, PROMPTS[1])


def _wrong_shapes(stage: Path, shapes, tag: int) -> None:
    """A well-formed publish (manifest and all) whose LoRA arrays do not fit the student."""
    from safetensors.numpy import save_file

    small = {k: v[:, :4] if k.endswith("lora_a") else v[:4] for k, v in lora_weights(shapes, tag).items()}
    save_file(small, str(stage / "adapters.safetensors"))
    (stage / "adapter_config.json").write_text(json.dumps(adapter_config(shapes, 2, 20.0, tag)))


def _corrupt_copy(root: Path, domain: str) -> int:
    """versions/N+1: a copy of the current version with damaged weights, made current by hand
    (the manifest no longer matches: a disk fault or a tampered file)."""
    d, current = root / domain, publisher.resolve(root, domain)
    assert current is not None
    n = current.number + 1
    bad = d / "versions" / f"{n:04d}"
    shutil.copytree(current.path, bad)
    manifest = json.loads((bad / publisher.MANIFEST).read_text())
    (bad / publisher.MANIFEST).write_text(json.dumps({**manifest, "version": n}))
    weights = bad / publisher.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)
    weights.write_bytes(bytes(data))
    os.symlink(f"versions/{n:04d}", d / ".current.tmp")
    os.replace(d / ".current.tmp", d / publisher.POINTER)
    return n


@pytest.mark.parametrize("domain,damage", [("debug", "wrong_shapes"), ("reflection", "checksum")])
def test_a_corrupt_version_is_refused_and_the_old_one_keeps_serving(site, domain, damage):
    _, root, shapes, server = site
    if damage == "wrong_shapes":
        n = publisher.publish(root, domain, lambda s: _wrong_shapes(s, shapes, 66), {"tag": 66}, keep=10).number
    else:
        n = _corrupt_copy(root, domain)
    wait_for(lambda: (server.health()["refused"].get(domain) or {}).get("version") == n, 30, what="the refusal")
    assert server.health()["served"][domain] == 1
    check(site, *chat(server, domain, PROMPTS[0]), domain, 1, PROMPTS[0])


def test_bad_requests_get_4xx_and_the_server_stays_up(site):
    _, _, _, server = site
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        ({"model": "nope", "messages": msgs}, 404),
        ({"model": "memory"}, 400),
        ({"model": "memory", "messages": []}, 400),
        ({"model": "memory", "messages": [{"role": "wizard", "content": "x"}]}, 400),
        ({"model": "memory", "messages": msgs, "temperature": "hot"}, 400),
        ({"model": "memory", "messages": msgs, "max_tokens": 0}, 400),
        ({"model": "memory", "messages": msgs, "max_tokens": 5000}, 400),
        ({"model": "memory", "messages": msgs, "n": 2}, 400),
        ({"model": "memory", "messages": msgs, "logit_bias": {"99999999": 1.0}}, 400),
        ({"model": "memory", "messages": [{"role": "user", "content": "word " * 600}]}, 400),
        ({"model": "memory", "messages": [{"role": "user", "content": "x" * 70000}]}, 413),
        ({"model": 7, "messages": msgs}, 400),
    ]
    for body, status in cases:
        got, _, reply = server.request("POST", "/v1/chat/completions", body)
        assert got == status, (body if isinstance(body, bytes) else str(body)[:200], reply)
        assert reply["error"]["message"]
    conn = server.connect()  # a chunked body declares no length: the limit holds while reading
    chunks = iter([b'{"model": "memory", "messages": [{"role": "user", "content": "', b"x" * 70000, b'"}]}'])
    conn.request("POST", "/v1/chat/completions", body=chunks, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["message"]
    conn.close()
    assert server.request("GET", "/v1/chat/completions")[0] == 405
    assert server.request("GET", "/v1/nothing")[0] == 404

    conn = server.connect()  # a client that leaves mid-stream: its generation stops early
    body = {"model": "memory", "messages": msgs, "max_tokens": 1000, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body))
    resp = conn.getresponse()
    job_id = next(sse_events(resp))["id"].split("-", 1)[1]
    conn.close()
    done = wait_for(lambda: [e for e in _events(server, "generated") if e["job"] == job_id], 60, what="cancel")
    assert done[0]["tokens"] < 1000

    before = len(_events(server, "generated"))  # ... and one that leaves a non-streaming request
    conn = server.connect()
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": False}))
    wait_for(lambda: (server.health()["active"] or {}).get("neuron") == "memory", 60, what="the generation")
    conn.close()
    done = wait_for(lambda: _events(server, "generated")[before:], 60, what="the generation to stop")
    assert done[0]["tokens"] < 1000

    assert server.proc is not None and server.proc.poll() is None
    assert server.health()["status"] == "ok"
    assert chat(server, "memory", "hi")[0] == 200


def _events(server: ServeProcess, name: str) -> list[dict]:
    out = []
    for line in server.log_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == name:
            out.append(ev)
    return out


def test_api_key_and_binding(site, tmp_path):
    student, root, _, _ = site
    refused = subprocess.run(
        [venv_bin("kd-client"), "serve", "--model", str(student), "--adapters", str(root), "--host", "0.0.0.0"],
        env=kd_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 78 and "KD_SERVE_API_KEY" in refused.stderr

    env = preload_blas(kd_env(KD_SERVE_API_KEY="s3cret-key"))
    auth = {"Authorization": "Bearer s3cret-key"}
    server = ServeProcess(env, tmp_path / "serve.log", student, root).start(headers=auth)
    try:
        assert server.request("GET", "/v1/models")[0] == 401
        assert server.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        status, _, body = server.request("GET", "/v1/models", headers=auth)
        assert status == 200 and {"base", "memory"} <= {m["id"] for m in body["data"]}
    finally:
        server.stop()
