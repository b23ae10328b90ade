"""`kd-client data --domain D list | stats | export | forget ID... | rebuild`: operating a domain's
corpus (kd_client.corpus), the memory of the continual loop."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from jobs.config import parse_overrides
from jobs.errors import KDError
from jobs.models import PRIORITIES
from kd_client.exitcodes import EXIT_OK, EXIT_SPOOLED

Watch = Callable[..., int]  # kd_client.cli.watch(settings, job_id, quiet=...): follows a job to its exit code


def _corpus(args, settings):
    from jobs.models import check_domain
    from kd_client import queue as Q
    from kd_client.corpus import Corpus, CorpusLimits

    try:
        check_domain(args.domain)
    except ValueError as e:
        raise KDError(str(e)) from e
    return Corpus(Q.connect(settings), args.domain, CorpusLimits.from_settings(settings))


def cmd_data_list(args, settings) -> int:
    corpus = _corpus(args, settings)
    recs = corpus.records()
    regression = set(corpus.regression_keys())
    rows = [
        {
            "id": r.key,
            "seq": r.seq,
            "kind": r.kind,
            "role": "regression" if r.key in regression else "held_out" if r.held_out else "train",
            "jobs": r.recorded,
            "first_job": r.provenance[0].job_id,
            "submitter": r.provenance[0].submitter,
            "at": r.provenance[0].at.isoformat(timespec="seconds"),
            "prompt": r.prompt[-1].content,
        }
        for r in (recs[-args.limit :] if args.limit else recs)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        text = " ".join(row["prompt"].split())
        print(f"{row['id'][:12]}  {row['seq']:>6}  {row['kind'][:4]:4s}  {row['role']:10s}  {row['at']}  {text[:60]}")
    print(f"{len(rows)} of {len(recs)} examples in the {args.domain} corpus (newest last; --limit 0 shows all)")
    return EXIT_OK


def cmd_data_stats(args, settings) -> int:
    st = _corpus(args, settings).stats()
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    lim = st["limits"]
    print(
        f"{st['domain']}: {st['examples']:,} examples ({st['corrections']:,} corrections, {st['prompts']:,} prompts) "
        f"from {st['jobs']} jobs, {st['bytes']:,} bytes\n"
        f"  replayable {st['replayable']:,}, held out {st['held_out']:,}, regression set "
        f"{st['regression']}/{lim['regression_max']}\n"
        f"  oldest {st['oldest']}, newest {st['newest']}\n"
        f"  limits: {st['examples'] / lim['max_examples']:.1%} of KD_CORPUS_MAX_EXAMPLES={lim['max_examples']:,}, "
        f"{st['bytes'] / lim['max_bytes']:.1%} of KD_CORPUS_MAX_BYTES={lim['max_bytes']:,}"
    )
    return EXIT_OK


def cmd_data_export(args, settings) -> int:
    """JSONL that `kd-client submit` reads back (id = example key, provenance in meta)."""
    lines = []
    for r in _corpus(args, settings).records():
        meta = {
            "kind": r.kind,
            "seq": r.seq,
            "held_out": r.held_out,
            "provenance": [p.model_dump(mode="json") for p in r.provenance],
        }
        lines.append(json.dumps({"id": r.key, **r.as_training_record(), "meta": meta}, ensure_ascii=False))
    text = "".join(line + "\n" for line in lines)
    if args.out:
        from jobs.publisher import write_bytes_atomic

        write_bytes_atomic(Path(args.out), text.encode("utf-8"))
        print(f"{len(lines)} examples -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_data_forget(args, settings) -> int:
    corpus = _corpus(args, settings)
    gone = corpus.forget(corpus.resolve(args.ids))
    if args.json:
        print(json.dumps({"forgotten": gone}, indent=2))
    else:
        for key in gone:
            print(f"forgot {key}")
        print(
            f"{len(gone)} example(s) removed from the {args.domain} corpus and regression set; future jobs never "
            "see them. Adapters already published may still encode them: `kd-client data rebuild` retrains without."
        )
    return EXIT_OK


def cmd_data_rebuild(args, settings, watch: Watch) -> int:
    """One job on the corpus's training members, from the base, without replay (its split holds out its own)."""
    from kd_client.api import KDClient

    corpus = _corpus(args, settings)
    members = corpus.training_members()
    if not members:
        raise KDError(f"the {args.domain} corpus has no training examples to rebuild from")
    overrides = {**parse_overrides(args.set or []), "replay": 0.0, "init": "base"}
    client = KDClient(settings, submitter=args.submitter)
    prompts = [r.as_training_record() for r in members if r.response is None]
    corrections = [r.as_training_record() for r in members if r.response is not None]
    rec = client.submit(args.domain, prompts or None, corrections or None, overrides, args.priority)
    if args.json:
        print(json.dumps({"examples": len(members), **rec.__dict__}, indent=2))
    elif rec.spooled:
        print(f"Redis unreachable; spooled to {rec.spool_file} (delivered by `kd-client flush`)")
    else:
        print(f"{rec.job_id}{'  (duplicate of an existing job)' if rec.duplicate else ''}  ({len(members)} examples)")
    if args.wait and not rec.spooled and rec.job_id:
        return watch(settings, rec.job_id, quiet=args.json)
    return EXIT_SPOOLED if rec.spooled else EXIT_OK


def add_data_parser(sub, watch: Watch) -> None:
    da = sub.add_parser(
        "data",
        help="a domain's corpus (every example its jobs recorded): list, stats, export, forget, rebuild",
        description="The domain's corpus in Redis: every example its jobs trained on or held out, recorded once. "
        "Later jobs replay its training examples; held-out ones form the publish gate's regression set.",
    )
    da.add_argument("--domain", required=True)
    dsub = da.add_subparsers(dest="data_command", required=True)
    ls = dsub.add_parser("list", help="examples, newest last: id, sequence, kind, role, first recorded, prompt")
    ls.add_argument("--limit", type=int, default=50, help="show the newest N (0: all; default 50)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_data_list)
    st = dsub.add_parser("stats", help="counts, bytes, oldest and newest, regression set, limits")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_data_stats)
    ex = dsub.add_parser("export", help="every example as JSONL (what `submit --corrections/--prompts` reads)")
    ex.add_argument("--out", help="write to FILE (default: stdout)")
    ex.set_defaults(func=cmd_data_export)
    fg = dsub.add_parser(
        "forget",
        help="remove examples from the corpus and the regression set: no future job sees them "
        "(adapters already published may still encode them)",
    )
    fg.add_argument("ids", nargs="+", metavar="ID", help="example id or a prefix of at least 8 characters")
    fg.add_argument("--json", action="store_true")
    fg.set_defaults(func=cmd_data_forget)
    rb = dsub.add_parser(
        "rebuild", help="retrain the domain as one job on the corpus's training examples (from the base, no replay)"
    )
    rb.add_argument("--set", action="append", metavar="KEY=VALUE", help="KD setting override, e.g. iterations=1000")
    rb.add_argument("--priority", choices=PRIORITIES, default="normal")
    rb.add_argument("--submitter", default="kd-client rebuild")
    rb.add_argument("--wait", action="store_true", help="follow the job until it ends (exit code = outcome)")
    rb.add_argument("--json", action="store_true")
    rb.set_defaults(func=partial(cmd_data_rebuild, watch=watch))
