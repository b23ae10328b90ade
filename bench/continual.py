"""Continual distillation: does a neuron keep what earlier jobs taught it? (issue 17)

One domain receives N jobs in sequence, each with corrections about facts no other job mentions
(bench/continual_task.py: three phrasings per fact trained, a fourth held out). After every publish
the published adapter is scored on every earlier job's held-out phrasings and the new job's:
per-token CE of the correct response (the issue's measure), CE of the answer tokens alone (the
value after "X's favourite colour is", what forgetting loses), and KL to the teacher.

Rows, each over 3 seeds, every job through `daemon.lifecycle.run_job` in-process with a real
redis-server holding the corpus (the queue's own path minus rq), every version force-published so
each row's sequence is measured whole while the gate's verdict is still recorded:
  fresh            today's behaviour: a fresh LoRA on the job's data only (replay=0, init=base)
  replay           replay=0.5 of every batch from the domain's corpus
  warm             init=current: start from the published adapter
  warm+replay      both
  rebuild          one `kd-client data rebuild` job on the whole corpus after the fresh row's jobs
                   (replay=0, init=base, N x the iterations: the same compute as the sequence)
Extra rows (`--rows`): replay 0.25 / 0.75, warm+replay 0.25 / 0.75 (the share behind the default).

    make bench-continual     # = .venv/bin/python -m bench.continual (~70 min on 2 shared cores)
    python -m bench.continual --resume   # after an interruption: keeps the finished sequences

Writes bench/results/continual.json and bench/results/continual.png (retention curves).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, RESULTS, report
from bench.continual_task import N_JOBS, PER_JOB, benchmark_facts, build_models, job_records

DOMAIN = "memory"
JOB = {"iterations": 150, "val_every": 1000, "save_every": 1000}  # the measurement: 150 steps
ROWS: dict[str, dict[str, Any]] = {
    "fresh": {"replay": 0.0, "init": "base"},
    "replay": {"replay": 0.5, "init": "base"},
    "warm": {"replay": 0.0, "init": "current"},
    "warm+replay": {"replay": 0.5, "init": "current"},
    "replay 0.25": {"replay": 0.25, "init": "base"},
    "replay 0.75": {"replay": 0.75, "init": "base"},
    "warm+replay 0.25": {"replay": 0.25, "init": "current"},
    "warm+replay 0.75": {"replay": 0.75, "init": "current"},
}
MAIN_ROWS = ["fresh", "replay", "warm", "warm+replay", "rebuild"]


class Scorer:
    """The student with LoRA layers, into which each published version's weights are loaded, and the
    held-out sets with their teacher targets (engine.distill.prepare, the training path)."""

    def __init__(self, teacher_lm, student_path: Path, cache: Path, cfg):
        from kd_worker.engine.cache import TargetCache
        from kd_worker.engine.models import load_model_dir
        from kd_worker.engine.teacher import Teacher
        from kd_worker.engine.trainer import attach_lora

        self.cfg = cfg
        self.teacher = Teacher(teacher_lm, TargetCache(cache))
        self.student = load_model_dir(student_path)
        attach_lora(self.student.model, cfg)
        self.student.model.eval()
        self.sets: list[tuple[list, list[int]]] = []

    def add_set(self, records: list[dict[str, str]], prefixes: list[str]) -> None:
        """A job's held-out phrasings; `prefixes` give the answer tokens (those after the prefix)."""
        from jobs.records import example_key
        from kd_worker.engine.data import Example
        from kd_worker.engine.distill import prepare
        from kd_worker.engine.hooks import Hooks
        from kd_worker.engine.objective import Objective

        examples = []
        for i, r in enumerate(records):
            prompt = ({"role": "user", "content": r["prompt"]},)
            examples.append(Example(example_key(prompt, r["response"]), prompt, r["response"], f"eval {i}"))
        data = prepare(self.teacher, self.student, examples, [], self.cfg, Hooks())
        self.objective = Objective.from_config(self.cfg, data.plan.student_vocab)
        enc = self.student.hf_tokenizer.encode
        answer = [len(enc(r["response"])) - len(enc(p)) + 1 for r, p in zip(records, prefixes, strict=True)]  # + EOS
        self.sets.append((data.train, answer))

    def load(self, version_dir: Path) -> None:
        from jobs import publisher
        from kd_worker.engine.checkpoints import load_arrays

        self.student.model.load_weights(list(load_arrays(version_dir / publisher.WEIGHTS).items()), strict=False)

    def score(self, upto: int, lm=None) -> list[dict[str, float]]:
        """CE, answer-token CE and KL on the first `upto` held-out sets: the student with the loaded
        weights, or `lm` (the teacher: the reference)."""
        from kd_worker.engine.trainer import evaluate

        lm = lm or self.student
        out = []
        for seqs, answer in self.sets[:upto]:
            m = evaluate(lm, seqs, self.objective, 8)
            out.append({"ce": m["ce"], "kl": m["kl"], "answer_ce": self.answer_ce(lm, seqs, answer)})
        return out

    def answer_ce(self, lm, seqs, answer: list[int]) -> float:
        import mlx.core as mx

        from kd_worker.engine.data import collate
        from kd_worker.engine.models import head_logits, hidden_at

        total, n = 0.0, 0
        for s, k in zip(seqs, answer, strict=True):
            b = collate([s])
            logits = head_logits(lm, hidden_at(lm, mx.array(b.inputs), mx.array(b.positions)), self.objective.n_vocab)
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            ce = -mx.take_along_axis(lp, mx.array(b.labels)[:, None], axis=-1)[:, 0]
            total += float(ce[-k:].sum().item())
            n += k
        return total / n


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def timed_job(ctx, settings, corpus, scorer, cfg, path: Path, run: str) -> tuple[dict, float, float]:
    """One force-published job through the daemon's run_job, its wall and CPU seconds; the scorer
    loads the published adapter."""
    from kd_worker.daemon.lifecycle import run_job
    from kd_worker.engine.hooks import Hooks
    from kd_worker.engine.types import DistillRequest

    req = DistillRequest(
        DOMAIN,
        (("corrections", path),),
        ctx["teacher"],
        ctx["student"],
        run,
        job_id=run,
        force_publish=True,
        submitter="bench",
    )
    t0, c0 = time.perf_counter(), time.process_time()
    outcome = run_job(req, cfg, ctx["runtime"], settings, Hooks(), corpus=corpus)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    scorer.load(Path(outcome["adapter_path"]))
    return outcome, seconds, cpu


def run_sequence(ctx: dict[str, Any], row: str, seed: int, data: list[Path], scorer: Scorer) -> dict[str, Any]:
    """The row's N jobs, one after another; scores after each publish."""
    from jobs.config import resolve_config
    from kd_client.corpus import Corpus, CorpusLimits
    from kd_worker.settings import WorkerSettings

    tag = f"{row.replace(' ', '_').replace('+', '_')}-s{seed}"
    ctx["conn"].flushall()
    settings = WorkerSettings(
        work_dir=ctx["work"] / tag, adapters_dir=ctx["work"] / tag / "adapters_kd", keep_versions=20
    )
    corpus = Corpus(ctx["conn"], DOMAIN, CorpusLimits.from_settings(settings))
    cfg = resolve_config({**JOB, "iterations": ctx["iterations"], **ROWS[row], "seed": seed})
    jobs = []
    for k, path in enumerate(data):
        outcome, seconds, cpu = timed_job(ctx, settings, corpus, scorer, cfg, path, f"{tag}-job{k + 1}")
        gate = outcome["gate"]
        jobs.append(
            {
                "seconds": seconds,
                "cpu_s": cpu,
                "scores": scorer.score(k + 1),
                "gate": gate["decision"],
                "reason": gate["reason"],
                "regression": gate.get("regression", {}),
                "held_out": gate.get("held_out", {}),
            }
        )
        print(
            f"  {row:18s} seed {seed} job {k + 1}: {seconds:5.1f} s ({cpu:5.1f} s CPU)  "
            f"job-1 CE {jobs[-1]['scores'][0]['ce']:.3f}  new CE {jobs[-1]['scores'][k]['ce']:.3f}  "
            f"gate {gate['decision']}",
            flush=True,
        )
    out = {"jobs": jobs, "corpus": corpus.stats()}
    if row == "fresh" and ctx["rebuild"]:
        out["rebuild"] = run_rebuild(ctx, tag, settings, corpus, cfg, len(data), scorer)
    return out


def run_rebuild(ctx, tag, settings, corpus, cfg, n_jobs: int, scorer: Scorer) -> dict[str, Any]:
    """What `kd-client data rebuild` submits: the corpus's training members, replay 0, from the base."""

    members = corpus.training_members()
    path = write_jsonl(ctx["work"] / tag / "rebuild.jsonl", [m.as_training_record() for m in members])
    rcfg = cfg.model_copy(update={"replay": 0.0, "init": "base", "iterations": cfg.iterations * n_jobs})
    outcome, seconds, cpu = timed_job(ctx, settings, corpus, scorer, rcfg, path, f"{tag}-rebuild")
    print(f"  rebuild            {len(members)} examples, {rcfg.iterations} steps: {seconds:.1f} s", flush=True)
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "examples": len(members),
        "iterations": rcfg.iterations,
        "scores": scorer.score(n_jobs),
    }


def stat(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def pm(v: tuple[float, float]) -> str:
    return "-" if np.isnan(v[0]) else f"{v[0]:.3f} ± {v[1]:.3f}"


def row_numbers(by_seed: dict[int, dict[str, Any]], fresh: dict[int, dict[str, Any]], base: float) -> dict[str, Any]:
    """One row's measures per seed: job 1's facts right after job 1 and after the last job, the new
    job's facts right after each job, every job's facts at the end, time, gate rejections."""
    seeds = sorted(by_seed)
    if "jobs" not in by_seed[seeds[0]]:  # the rebuild: one job, compared with the fresh row's job 1
        first = [fresh[s]["jobs"][0]["scores"][0] for s in seeds]
        last = [by_seed[s]["scores"][0] for s in seeds]
        alls = [np.mean([x["ce"] for x in by_seed[s]["scores"]]) for s in seeds]
        news, jobs = [float("nan")], [[by_seed[s]] for s in seeds]
        rejects = "-"
    else:
        first = [by_seed[s]["jobs"][0]["scores"][0] for s in seeds]
        last = [by_seed[s]["jobs"][-1]["scores"][0] for s in seeds]
        alls = [np.mean([x["ce"] for x in by_seed[s]["jobs"][-1]["scores"]]) for s in seeds]
        news = [np.mean([j["scores"][k]["ce"] for k, j in enumerate(by_seed[s]["jobs"])]) for s in seeds]
        jobs = [by_seed[s]["jobs"] for s in seeds]
        n = sum(j["gate"] == "reject" and j["reason"].startswith("forgets") for js in jobs for j in js[1:])
        rejects = f"{n}/{sum(len(js) - 1 for js in jobs)}"
    return {
        "ce_job1_after_1": stat([a["ce"] for a in first]),
        "ce_job1_after_n": stat([b["ce"] for b in last]),
        "ratio": stat([b["ce"] / a["ce"] for a, b in zip(first, last, strict=True)]),
        "kept": stat([(base - b["ce"]) / (base - a["ce"]) for a, b in zip(first, last, strict=True)]),
        "answer_ce_job1": (stat([a["answer_ce"] for a in first]), stat([b["answer_ce"] for b in last])),
        "kl_job1_after_n": stat([b["kl"] for b in last]),
        "new_job_ce": stat(news),
        "all_ce_after_n": stat(alls),
        "cpu_s_per_job": stat([np.mean([j["cpu_s"] for j in js]) for js in jobs]),
        "wall_s_per_job": stat([np.mean([j["seconds"] for j in js]) for js in jobs]),
        "regression_rejections": rejects,
    }


def summarize(results: dict[str, dict[int, dict[str, Any]]], base: list[dict[str, float]], n_jobs: int):
    """(columns, table rows, numbers): means ± sd over seeds."""
    columns = [
        "row",
        "job-1 CE after job 1",
        f"after job {n_jobs}",
        "ratio (goal <= 1.10)",
        "job-1 gain kept",
        f"job-1 answer CE 1 -> {n_jobs}",
        "new-job CE (goal <= fresh)",
        f"all jobs' CE after job {n_jobs}",
        "CPU s / job (wall)",
        "CPU vs fresh (goal <= 1.5)",
        "regression-gate rejections",
    ]
    numbers = {name: row_numbers(by_seed, results["fresh"], base[0]["ce"]) for name, by_seed in results.items()}
    fresh_cpu = numbers["fresh"]["cpu_s_per_job"][0]
    rows = []
    for name, n in numbers.items():
        n["cpu_vs_fresh"] = n["cpu_s_per_job"][0] / fresh_cpu / (n_jobs if name == "rebuild" else 1)
        of = f" of {n_jobs} jobs" if name == "rebuild" else ""  # one job, as much training as the sequence
        rows.append(
            [
                name,
                pm(n["ce_job1_after_1"]),
                pm(n["ce_job1_after_n"]),
                pm(n["ratio"]),
                f"{n['kept'][0]:.1%}",
                f"{n['answer_ce_job1'][0][0]:.3f} -> {n['answer_ce_job1'][1][0]:.3f}",
                pm(n["new_job_ce"]),
                pm(n["all_ce_after_n"]),
                f"{n['cpu_s_per_job'][0]:.1f} ({n['wall_s_per_job'][0]:.0f})",
                f"{n['cpu_vs_fresh']:.2f}x{of}",
                n["regression_rejections"],
            ]
        )
    return columns, rows, numbers


def plot(results: dict[str, dict[int, dict[str, Any]]], base: list[dict[str, float]], n_jobs: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.arange(1, n_jobs + 1)
    for name, by_seed in results.items():
        if name == "rebuild":
            for ax, key in zip(axes, ("ce", "answer_ce"), strict=True):
                vals = [by_seed[s]["scores"][0][key] for s in by_seed]
                ax.errorbar([n_jobs + 0.15], [np.mean(vals)], yerr=[np.std(vals)], fmt="k*", ms=11, label="rebuild")
            continue
        for ax, key in zip(axes, ("ce", "answer_ce"), strict=True):
            curves = np.array([[j["scores"][0][key] for j in by_seed[s]["jobs"]] for s in sorted(by_seed)])
            m, sd = curves.mean(axis=0), curves.std(axis=0)
            ax.plot(x, m, marker="o", label=name)
            ax.fill_between(x, m - sd, m + sd, alpha=0.15)
    for ax, key, title in zip(
        axes, ("ce", "answer_ce"), ("per-token CE of the response", "CE of the answer tokens"), strict=True
    ):
        ax.axhline(base[0][key], color="grey", ls=":", label="student base")
        ax.set_xlabel("jobs published")
        ax.set_ylabel(f"job 1's held-out facts: {title}")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Retention of job 1's facts over a sequence of jobs with disjoint facts (mean ± sd, 3 seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


SLACKS = (0.0, 0.005, 0.01, 0.02, 0.05)


def slack_sweep(results: dict[str, dict[int, dict[str, Any]]], tolerance: float = 0.01) -> dict[str, dict[str, str]]:
    """Versions (jobs 2..N) the regression check would reject per row, at each KD_GATE_REGRESSION_SLACK:
    the evidence behind the default (today's forgetting versions out, continual ones in)."""
    from kd_worker.engine.gate import worse

    out: dict[str, dict[str, str]] = {}
    for row, by_seed in results.items():
        regs = [j["regression"] for o in by_seed.values() for j in o.get("jobs", [])[1:]]
        if regs:
            out[row] = {f"{s:g}": f"{sum(worse(r, tolerance, s) for r in regs)}/{len(regs)}" for s in SLACKS}
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=N_JOBS, choices=range(2, N_JOBS + 1), help="jobs in the sequence")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=JOB["iterations"])
    ap.add_argument("--rows", nargs="+", default=MAIN_ROWS, choices=[*ROWS, "rebuild"])
    ap.add_argument("--name", default="continual", help="results file stem under bench/results/")
    ap.add_argument("--from-json", type=Path, help="re-summarize a saved result (no training)")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the (row, seed) sequences an interrupted run finished (its partial.json) and run the rest",
    )
    return ap.parse_args()


def prepare(work: Path, n_jobs: int, models: dict[str, Path], keep: bool = False):
    """The jobs' data files, the runtime (teacher resident) and the scorer with every held-out set;
    `keep`: an interrupted run's directory stays (its finished sequences, partial.json)."""
    from jobs.config import resolve_config
    from kd_worker.daemon.runtime import Runtime
    from kd_worker.settings import WorkerSettings

    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    data = []
    runtime = Runtime(WorkerSettings(work_dir=work))
    teacher_lm = runtime.teacher(models["continual-teacher"])
    scorer = Scorer(teacher_lm, models["continual-student"], work / "eval-cache", resolve_config({}))
    for k, facts in enumerate(benchmark_facts(N_JOBS, PER_JOB)[0][:n_jobs]):
        train, test = job_records(facts)
        data.append(write_jsonl(work / f"job{k + 1}.jsonl", train))
        scorer.add_set(test, [f.answer_prefix for f in facts])
    return data, runtime, teacher_lm, scorer


def load_partial(path: Path, n_jobs: int) -> dict[str, dict[int, dict[str, Any]]]:
    """An interrupted run's finished sequences ({} when there is none); a sequence of another length
    (another --jobs) is dropped, so a resumed table never mixes setups."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for row, by_seed in saved.items():
        for seed, o in by_seed.items():
            if len(o.get("jobs", o.get("scores", []))) == n_jobs:
                out.setdefault(row, {})[int(seed)] = o
    return out


def run_rows(args, work: Path, models: dict[str, Path], data, runtime, scorer) -> dict[str, dict[int, dict[str, Any]]]:
    from kd_worker.fixtures.demo import managed_redis
    from kd_worker.settings import WorkerSettings

    results = load_partial(work / "partial.json", args.jobs) if args.resume else {}
    with managed_redis(WorkerSettings(work_dir=work), work / "redis", explicit_url=False) as url:
        import redis

        ctx = {
            "conn": redis.Redis.from_url(url),
            "work": work,
            "runtime": runtime,
            "teacher": models["continual-teacher"],
            "student": models["continual-student"],
            "iterations": args.iterations,
            "rebuild": "rebuild" in args.rows,
        }
        for row in [r for r in args.rows if r != "rebuild"]:
            for seed in args.seeds:
                done = seed in results.get(row, {})
                if done and (row != "fresh" or not ctx["rebuild"] or seed in results.get("rebuild", {})):
                    print(f"  {row:18s} seed {seed}: kept from the interrupted run", flush=True)
                    continue
                out = run_sequence(ctx, row, seed, data, scorer)
                results.setdefault(row, {})[seed] = out
                if "rebuild" in out:
                    results.setdefault("rebuild", {})[seed] = out.pop("rebuild")
                (work / "partial.json").write_text(json.dumps(results, default=str))  # hours of work: keep it
    return results


def publish_results(name: str, doc: dict[str, Any]) -> None:
    """Table, plot, bench/results/{name}.json (summary recomputed from the per-seed results)."""
    results, n_jobs = doc["per_seed"], doc["setup"]["jobs"]
    columns, rows, numbers = summarize(results, doc["base"], n_jobs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, doc["base"], n_jobs, RESULTS / f"{name}.png")
    extra = {k: v for k, v in doc.items() if k not in ("columns", "rows", "machine", "benchmark")}
    extra.update(summary=numbers, regression_rejections_by_slack=slack_sweep(results))
    seeds = len(doc["setup"]["seeds"])
    report(name, f"Continual: {n_jobs} jobs of disjoint facts, {seeds} seeds", columns, rows, extra)
    print("rejections by KD_GATE_REGRESSION_SLACK:", json.dumps(extra["regression_rejections_by_slack"], indent=1))
    print("\n".join(["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]))  # for README.md
    print("\n".join("| " + " | ".join(str(v) for v in r) + " |" for r in rows))


def main() -> int:
    from bench.continual_task import held_out

    args = parse_args()
    if args.from_json:
        doc = json.loads(args.from_json.read_text())
        doc["per_seed"] = {row: {int(s): o for s, o in by.items()} for row, by in doc["per_seed"].items()}
        publish_results(args.name, doc)
        return 0
    load_before = os.getloadavg()
    work = REPO / ".kd" / "bench" / f"{args.name}-run"  # a quick run never clobbers a long one's partial.json
    models = build_models(REPO / ".kd" / "bench" / "continual-models")
    data, runtime, teacher_lm, scorer = prepare(work, args.jobs, models, keep=args.resume)
    base, teacher = scorer.score(args.jobs), scorer.score(args.jobs, teacher_lm)
    print("student base CE:", " ".join(f"{b['ce']:.3f}" for b in base), flush=True)
    print("teacher CE:     ", " ".join(f"{b['ce']:.3f}" for b in teacher), flush=True)
    t0 = time.perf_counter()
    kept = load_partial(work / "partial.json", args.jobs) if args.resume else {}
    results = run_rows(args, work, models, data, runtime, scorer)
    results = {r: by for r, by in results.items() if r in args.rows}  # a resumed run's other rows stay out
    setup = {
        "jobs": args.jobs,
        "facts_per_job": PER_JOB,
        "phrasings": "3 trained per fact, 1 held out (the measure)",
        "seeds": args.seeds,
        "job_config": {**JOB, "iterations": args.iterations},
        "rows": {r: ROWS.get(r, "replay=0, init=base, iterations x jobs") for r in args.rows},
        "models": {k: str(v) for k, v in models.items()},
        "held_out_phrasing": [held_out(i) for i in range(4)],
    }
    contention: dict[str, Any] = {
        "note": "2 cores shared with other engineers' work: timings were taken with other work running",
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
    if args.resume:  # those sequences ran in an earlier process, under that one's load
        contention["kept_from_interrupted_run"] = sorted(f"{r} seed {s}" for r, by in kept.items() for s in by)
    doc = {"setup": setup, "base": base, "teacher": teacher, "per_seed": results, "wall_s": time.perf_counter() - t0}
    publish_results(args.name, {**doc, "contention": contention})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
