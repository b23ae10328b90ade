"""Does the distillation work? True KD vs simple distillation, measured through the product's path.

    .venv/bin/python -m bench.quality                  # main rows, 3 seeds
    .venv/bin/python -m bench.quality --rows all       # + T/alpha sweep, top-k, cross-tokenizer
    .venv/bin/python -m bench.quality --rows sweep,xtok --seeds 0,1,2,3,4
    .venv/bin/python -m bench.quality --rows onpolicy,select --name quality_onpolicy   # issue 16

Task (kd_worker/fixtures/digits.py): questions about short digit lists, some with one correct answer
(max/min), some with a *set* of correct answers (even/odd/above k/below k) over which the
teacher spreads its probability. Models (bench/quality_models.py): a teacher trained from
scratch to be competent, a smaller student pretrained on the format only; built once,
cached under --work by recipe digest.

Every trained row is one `kd-worker distill --json` subprocess: the CLI a user runs, the same
`run_job` the queue worker calls, with its prompt file, `--set` overrides, target cache
(KD_WORK_DIR, shared by all rows: a seed's teacher responses are generated once and reused by
every row of that seed; targets are rescored only when top_k/T change) and publisher. A
subprocess costs ~3 s of start-up against ~30-60 s of work per run, and it keeps each run's
MLX state (compile caches, LoRA layers, memory) out of the others, so in-process calls would
save little. The held-out metrics are this benchmark's own (bench/quality_eval.py), computed
on the published adapter loaded with `mlx_lm.load(student, adapter_path=...)`.

Equal footing: all rows of one seed share the prompts, the teacher's sampled responses (the
response cache key holds the generation settings and the seed), the iterations, batch size,
learning rate and LoRA shape; only the loss settings differ. Results are cached per run under
--work/runs (key: models, data, settings, seed); --fresh ignores them.

On-policy rows (group `onpolicy`, issue 16) run on the *sort* task (fixtures.digits.SEQ_OPS: 7-11
token answers, one early wrong token derails the rest) and add `self_kl`, the KL on the student's
own greedy samples. Group `select` trains true KD with validations every 50 steps and select=best,
and scores both the published (best) adapter and the last step's checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import quality_eval as qe
from bench import quality_models as qm
from bench.common import report  # first: loads OpenBLAS before mlx
from kd_worker.fixtures import digits as task
from kd_worker.fixtures.demo import child_env, venv_bin

EVAL_VERSION = 1
N_TRAIN, N_EVAL = 360, 300  # distinct prompts, 60 / 50 per question type
SEQ_MAX_TOKENS = 12  # a sorted list of up to 6 digits: 11 tokens + the stop token
ROLLOUT_BATCH = 16  # = batch_size: each on-policy step trains one fresh rollout (GKD)
# on-policy at off-policy KD's teacher-token budget: KD's teacher generates and scores one response per
# prompt (2 * N_TRAIN sequences); an on-policy step scores ROLLOUT_BATCH sequences of about the same
# length (a sorted list is as long as the list). The teacher phase both rows share is not counted.
BUDGET_STEPS = 2 * N_TRAIN // ROLLOUT_BATCH
REF_SEED = 1234  # the teacher's sampled held-out responses (the KL reference)
COMMON = {  # identical for every trained row; loss settings come from the row
    "iterations": 300,
    "batch_size": 16,
    "learning_rate": 1e-4,
    "lora_rank": 8,
    "lora_scale": 20.0,
    "max_seq_length": 64,
    "val_fraction": 0.1,
    "val_every": 300,
    "save_every": 300,
    "gen_temperature": 1.0,
    "gen_top_k": 0,
    "gen_max_tokens": 8,
    "gen_batch_size": 64,
}


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    group: str  # main | div | topk | sweep | xtok
    overrides: dict[str, Any] = field(default_factory=dict)
    student: str = "quality-student"
    trained: bool = True
    task: str = "choice"  # "choice": the single-token questions (KD_OPS); "sort": the sequence task (SEQ_OPS)


def rows_table() -> list[Row]:
    kd = {"alpha": 0.7, "temperature": 2.0, "top_k": 64, "divergence": "forward_kl"}
    rows = [
        Row("untrained", "1 untrained student", "main", trained=False),
        Row("simple", "2 simple distillation (alpha=0)", "main", {**kd, "alpha": 0.0}),
        Row("kd", "3 true KD (alpha=0.7, T=2)", "main", kd),
        Row("reverse_kl", "5 reverse KL (alpha=0.7, T=2)", "main", {**kd, "divergence": "reverse_kl"}),
        Row("jsd", "5 JSD beta=0.5 (alpha=0.7, T=2)", "main", {**kd, "divergence": "jsd", "jsd_beta": 0.5}),
        Row("top16", "6 KD top-16", "main", {**kd, "top_k": 16}),
        Row("full", "6 KD full vocabulary", "main", {**kd, "top_k": "full"}),
        Row("top256", "6 KD top-256", "topk", {**kd, "top_k": 256}),
    ]
    for t in (1.0, 2.0, 4.0):
        for a in (0.5, 0.7, 0.9):
            if (t, a) != (2.0, 0.7):  # that cell is row 3
                rows.append(
                    Row(f"T{t:g}_a{a:g}", f"4 KD T={t:g} alpha={a:g}", "sweep", {**kd, "temperature": t, "alpha": a})
                )
    llama = "quality-student-llama"
    rows += [
        Row("xtok_untrained", "7 other-tokenizer student, untrained", "xtok", student=llama, trained=False),
        Row("xtok_simple", "7 other tokenizer: simple distillation", "xtok", {**kd, "alpha": 0.0}, student=llama),
        Row("xtok_kd", "7 other tokenizer: true KD (alpha=0.7, T=2)", "xtok", kd, student=llama),
    ]
    seq = {**kd, "gen_max_tokens": SEQ_MAX_TOKENS, "rollout_batch": ROLLOUT_BATCH}
    on = "onpolicy"
    rows += [
        Row("seq_untrained", "8 sort: untrained student", on, trained=False, task="sort"),
        Row("seq_simple", "8 sort: simple distillation (alpha=0)", on, {**seq, "alpha": 0.0}, task="sort"),
        Row("seq_kd", "8 sort: off-policy KD (alpha=0.7, T=2)", on, seq, task="sort"),
        Row("seq_op05", "8 sort: on-policy 0.5", on, {**seq, "on_policy": 0.5}, task="sort"),
        Row("seq_op10", "8 sort: on-policy 1.0", on, {**seq, "on_policy": 1.0}, task="sort"),
        Row(
            "seq_op10_fkl",
            "8 sort: on-policy 1.0, forward KL (the metric's direction)",
            on,
            {**seq, "on_policy": 1.0, "on_policy_divergence": "forward_kl"},
            task="sort",
        ),
        Row(
            "seq_op10_budget",
            f"8 sort: on-policy 1.0, KD's teacher tokens ({BUDGET_STEPS} steps)",
            on,
            {**seq, "on_policy": 1.0, "iterations": BUDGET_STEPS},
            task="sort",
        ),
        Row("kd_best", "9 true KD, select=best (val every 50)", "select", {**kd, "select": "best", "val_every": 50}),
    ]
    return rows


def select(spec: str) -> list[Row]:
    wanted = set(spec.split(","))
    groups = {"main"} if "main" in wanted else set()
    if "all" in wanted:
        groups = {"main", "div", "topk", "sweep", "xtok", "onpolicy", "select"}
    groups |= wanted
    return [r for r in rows_table() if r.group in groups or r.id in wanted]


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def write_data(work: Path, kind: str = "choice") -> tuple[Path, list[task.Item]]:
    """The training prompt file (a KD job's input) and the held-out questions (never trained on)."""
    ops = task.SEQ_OPS if kind == "sort" else task.KD_OPS
    train = task.items(N_TRAIN, seed=0, ops=ops)
    held = task.items(N_EVAL, seed=1, ops=ops, exclude=frozenset(it.prompt for it in train))
    path = work / "data" / ("prompts.jsonl" if kind == "choice" else f"prompts-{kind}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": it.prompt}) + "\n" for it in train))
    return path, held


def distill(
    row: Row, seed: int, models: dict[str, Path], prompts: Path, work: Path, common: dict[str, Any]
) -> dict[str, Any]:
    """One `kd-worker distill` run; returns its JSON outcome."""
    out = work / "adapters" / row.id / f"seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    sets = {**common, **row.overrides, "seed": seed}
    cmd = [
        venv_bin("kd-worker"),
        "distill",
        "--domain",
        "quality",
        "--prompts",
        str(prompts),
        "--teacher",
        str(models["quality-teacher"]),
        "--student",
        str(models[row.student]),
        "--out",
        str(out),
        "--json",
        "--force",
    ]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    env = child_env(KD_WORK_DIR=str(work / "engine"), KD_LOG_LEVEL="warning")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"kd-worker distill failed ({proc.returncode}) for {row.id} seed {seed}:\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout)


def run_one(
    row: Row,
    seed: int,
    models: dict[str, Path],
    prompts: Path,
    work: Path,
    ref: qe.Reference,
    fresh: bool,
    common: dict[str, Any],
    teacher: Any = None,
) -> dict[str, Any]:
    key = _sha(
        {
            "v": EVAL_VERSION,
            "row": row.overrides if row.trained else "untrained",
            "task": row.task,
            "common": common,
            "seed": seed if row.trained else 0,
            "teacher": qm.recipe_digest("quality-teacher"),
            "student": qm.recipe_digest(row.student),
            "data": prompts.read_text(),
            "n_eval": N_EVAL,
            "ref": REF_SEED,
        }
    )
    cached = work / "runs" / f"{key}.json"
    if cached.is_file() and not fresh:
        return json.loads(cached.read_text())
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    outcome = distill(row, seed, models, prompts, work, common) if row.trained else None
    t1 = time.perf_counter()
    adapter = Path(outcome["adapter_path"]) if outcome else None
    max_tokens = SEQ_MAX_TOKENS if row.task == "sort" else 8
    same = row.student == "quality-student"

    def evaluate(path: Path | None) -> dict[str, float]:
        return qe.score(qe.load(models[row.student], path), ref, same, teacher if same else None, max_tokens)

    metrics = evaluate(adapter)
    result = {
        "row": row.id,
        "seed": seed,
        "metrics": metrics,
        "distill_s": t1 - t0,
        "eval_s": time.perf_counter() - t1,
        "loadavg_1min": [load0, os.getloadavg()[0]],  # the machine is shared: contention at start and end
        "engine": {k: outcome[k] for k in ("before", "after", "seconds")} if outcome else None,
    }
    if adapter is not None:
        published = json.loads((adapter / "kd_metrics.json").read_text())
        result["selected"] = published.get("selected")
        result["on_policy"] = published.get("on_policy")
        if row.overrides.get("select") == "best":  # the same run's last step, from its checkpoint
            last = {**common, **row.overrides}["iterations"]
            result["metrics_last"] = evaluate(adapter / f"checkpoint_{last}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result, indent=2) + "\n")
    return result


METRICS = ("accuracy", "acc_single", "acc_set", "kl", "self_kl", "top1", "answer_kl", "valid_mass", "ece")


def summarise(results: list[dict[str, Any]], which: str = "metrics") -> dict[str, tuple[float, float]]:
    out = {}
    for m in METRICS:
        vals = [r[which][m] for r in results if m in r.get(which, {})]
        if vals:
            out[m] = (float(np.mean(vals)), float(np.std(vals)))
    return out


def fmt(ms: tuple[float, float] | None) -> str:
    return "-" if ms is None else f"{ms[0]:.3f} ± {ms[1]:.3f}"


def plot(summary: dict[str, dict], labels: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = list(summary)
    panels = (
        ("accuracy", "exact-match accuracy (greedy)"),
        ("kl", "KL(teacher||student), T=1, per token"),
        ("answer_kl", "answer-token KL (digits + other)"),
        ("ece", "ECE, single-answer questions"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.35 * len(ids) + 2), sharey=True)
    y = np.arange(len(ids))
    for ax, (m, title) in zip(axes, panels, strict=True):
        mean = [summary[i].get(m, (np.nan, 0))[0] for i in ids]
        std = [summary[i].get(m, (np.nan, 0))[1] for i in ids]
        ax.barh(
            y, mean, xerr=std, color=["#888" if "untrained" in i else "#c44" if "simple" in i else "#48c" for i in ids]
        )
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [labels[i] for i in ids], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("kd-daemon quality benchmark: mean ± std over seeds (held-out prompts)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--rows",
        default="main",
        help="main (default), all, or groups/row ids: div, topk, sweep, xtok, onpolicy, select, kd, ...",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iterations", type=int, help=f"steps of every row (default {COMMON['iterations']})")
    p.add_argument("--name", default="quality", help="result file bench/results/NAME.json (and NAME.png)")
    p.add_argument("--work", default=".kd/quality", help="models, data, engine cache, adapters, per-run results")
    p.add_argument("--fresh", action="store_true", help="rerun every row even when its result is cached")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    work, seeds, rows = Path(args.work), [int(s) for s in args.seeds.split(",")], select(args.rows)
    common = {**COMMON, **({"iterations": args.iterations} if args.iterations else {})}
    names = ["quality-teacher"] + sorted({r.student for r in rows})
    say = lambda s: print(s, flush=True)  # noqa: E731
    say(f"models ({', '.join(names)}) under {work / 'models'}")
    t0 = time.perf_counter()
    models = {n: qm.build(n, work / "models", say) for n in names}
    models_s = time.perf_counter() - t0
    teacher = qe.load(models["quality-teacher"])
    data, refs = {}, {}
    for kind in sorted({r.task for r in rows}):
        data[kind], held = write_data(work, kind)
        refs[kind] = qe.reference(teacher, held, REF_SEED, SEQ_MAX_TOKENS if kind == "sort" else 8)
        say(f"teacher on {len(held)} held-out {kind} questions: " + fmt_metrics(refs[kind].metrics))
    results: dict[str, list[dict[str, Any]]] = {}
    todo = [(r, s) for r in rows for s in (seeds if r.trained else seeds[:1])]
    for n, (row, seed) in enumerate(todo, 1):
        res = run_one(row, seed, models, data[row.task], work, refs[row.task], args.fresh, common, teacher)
        results.setdefault(row.id, []).append(res)
        say(
            f"[{n}/{len(todo)}] {row.id:16s} seed {seed}: {fmt_metrics(res['metrics'])} "
            f"(distill {res['distill_s']:.0f} s, eval {res['eval_s']:.0f} s)"
        )
    summary = {rid: summarise(rs) for rid, rs in results.items()}
    labels = {r.id: r.label for r in rows}
    for rid, rs in list(results.items()):  # select=best rows: the same runs' last step
        if any("metrics_last" in r for r in rs):
            summary[f"{rid}_last"] = summarise(rs, "metrics_last")
            labels[f"{rid}_last"] = labels[rid].replace("select=best", "select=last") + " (same runs)"
            results[f"{rid}_last"] = rs
    table = [
        [
            labels[rid],
            len(results[rid]),
            *(fmt(summary[rid].get(m)) for m in METRICS),
            f"{np.mean([r['distill_s'] + r['eval_s'] for r in results[rid]]):.0f}",
        ]
        for rid in summary
    ]
    teacher_rows = [
        [
            f"teacher (reference, {kind})",
            1,
            *(f"{ref.metrics[m]:.3f}" if m in ref.metrics else "-" for m in METRICS),
            "-",
        ]
        for kind, ref in refs.items()
    ]
    target = verdict(summary) if "kd" in summary else onpolicy_verdict(summary)
    report(
        args.name,
        "KD quality on held-out prompts (mean ± std over seeds)",
        ["row", "seeds", *METRICS, "s/run"],
        [*teacher_rows, *table],
        {
            "target": target,
            "settings": common,
            "row_specs": {
                r.id: {"label": r.label, "student": r.student, "task": r.task, "overrides": r.overrides} for r in rows
            },
            "teacher": {kind: ref.metrics for kind, ref in refs.items()},
            "summary": summary,
            "runs": results,
            "seeds": seeds,
            "n_train_prompts": N_TRAIN,
            "n_heldout": N_EVAL,
            "models_s": models_s,
            "total_s": time.perf_counter() - t_start,
            "contention": "timed on a shared 2-core VM with other work running (loadavg_1min per run)",
            "command": "python -m bench.quality " + " ".join(argv or sys.argv[1:]),
        },
    )
    plot(summary, labels, qe_path := Path(__file__).resolve().parent / "results" / f"{args.name}.png")
    say(f"chart {qe_path}\ntarget: {target['text']}\ntotal {time.perf_counter() - t_start:.0f} s")


def fmt_metrics(m: dict[str, float]) -> str:
    keys = ("accuracy", "kl", "self_kl", "answer_kl", "ece")
    return " ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)


def onpolicy_verdict(summary: dict[str, dict]) -> dict[str, Any]:
    """Issue 16's target: on-policy 1.0 >= 20% lower KL on the student's own samples than off-policy
    KD, and at least equal exact match, at equal steps."""
    if "seq_kd" not in summary or "seq_op10" not in summary:
        return {"met": None, "text": "needs rows seq_kd and seq_op10"}
    kd, op = summary["seq_kd"], summary["seq_op10"]
    reduction = 1 - op["self_kl"][0] / kd["self_kl"][0]
    met = reduction >= 0.20 and op["accuracy"][0] >= kd["accuracy"][0]
    return {
        "met": met,
        "self_kl_reduction": reduction,
        "accuracy_on_policy": op["accuracy"][0],
        "accuracy_kd": kd["accuracy"][0],
        "text": f"KL on the student's own samples {reduction:+.1%} lower on-policy ({op['self_kl'][0]:.4f} vs "
        f"{kd['self_kl'][0]:.4f}), accuracy {op['accuracy'][0]:.3f} vs {kd['accuracy'][0]:.3f}: "
        f"{'met' if met else 'NOT met'}",
    }


def verdict(summary: dict[str, dict]) -> dict[str, Any]:
    """The issue's target: true KD >= 30% lower held-out KL than simple distillation, accuracy >= simple."""
    if "kd" not in summary or "simple" not in summary:
        return {"met": None, "text": "needs rows simple and kd"}
    kd, simple = summary["kd"], summary["simple"]
    reduction = 1 - kd["kl"][0] / simple["kl"][0]
    met = reduction >= 0.30 and kd["accuracy"][0] >= simple["accuracy"][0]
    return {
        "met": met,
        "kl_reduction": reduction,
        "accuracy_kd": kd["accuracy"][0],
        "accuracy_simple": simple["accuracy"][0],
        "text": f"KL {reduction:+.1%} lower with true KD ({kd['kl'][0]:.4f} vs {simple['kl'][0]:.4f}), accuracy "
        f"{kd['accuracy'][0]:.3f} vs {simple['accuracy'][0]:.3f}: {'met' if met else 'NOT met'}",
    }


if __name__ == "__main__":
    main()
