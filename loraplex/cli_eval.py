"""`loraplex adapters eval` and `adapters show`: an adapter's held-out quality, as served.

`eval NAME[:vN] --data FILE [--against vM]` sends the held-out prompts through a
running router (training/served_eval.py), prints each version's score side by side
with its training-time score from the manifest (and how many examples they differ
by: the engine's dtype, bf16 by default, can flip near-ties that float32 peft does
not), then a few examples where the versions answer differently. `--record` stores
the result in the catalog beside the training-time scores; `show` prints both, and
the publish gate's decision, per version.

SQLAlchemy, httpx and the training data code are imported inside the commands: cli.py
builds its parser from this module on every `loraplex` command (see cli_registry.py).
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
import typing
from datetime import datetime, timezone
from pathlib import Path

from loraplex.cli_flags import add_settings_flags

if typing.TYPE_CHECKING:
    from loraplex.adapters.catalog import VersionRecord
    from loraplex.training.data import Example
    from loraplex.training.served_eval import ServedScore

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_MAX_NEW_TOKENS = 48  # evaluate.py's default when the manifest names none
EXIT_UNAVAILABLE = 3


def _manifest_eval_settings(record: VersionRecord) -> dict[str, typing.Any]:
    return ((record.manifest or {}).get("training_config") or {}).get("eval") or {}


def training_time(record: VersionRecord, data_sha256: str, examples: int) -> str:
    """The manifest's adapter score, and whether it was measured on the same examples."""
    manifest = record.manifest or {}
    score = (manifest.get("eval") or {}).get("adapter")
    if score is None:
        return "none in the manifest"
    dataset = manifest.get("dataset") or {}
    n = dataset.get("eval_examples") or 0
    text = f"{score:.1%}"
    if dataset.get("eval_sha256") == data_sha256 and n == examples:
        return f"{text} ({round(score * n)}/{n}, same examples)"
    return f"{text} (other data: {n} examples" + (
        f" of sha256 {dataset['eval_sha256'][:12]})" if dataset.get("eval_sha256") else ")"
    )


def _difference(record: VersionRecord, served: ServedScore, data_sha256: str, n: int) -> str:
    """How many examples the served score and the training-time one differ by (same data)."""
    manifest = record.manifest or {}
    score = (manifest.get("eval") or {}).get("adapter")
    dataset = manifest.get("dataset") or {}
    if (
        score is None
        or dataset.get("eval_sha256") != data_sha256
        or dataset.get("eval_examples") != n
    ):
        return ""
    delta = round(served.correct - score * n)
    if delta == 0:
        return "served = training-time"
    return f"served {delta:+d} example{'s' if abs(delta) != 1 else ''} vs training-time"


def _short(text: str, width: int = 90) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def differing_examples(
    examples: list[Example], results: list[tuple[str, ServedScore]], limit: int
) -> list[str]:
    """Lines showing up to `limit` examples the versions answered differently (with one
    version: examples it got wrong)."""
    if len(results) > 1:
        picked = [
            i for i in range(len(examples)) if len({r.answers[i].strip() for _, r in results}) > 1
        ]
        title = f"{len(picked)} of {len(examples)} examples answered differently"
    else:
        picked = [i for i in range(len(examples)) if results[0][1].scores[i] < 1]
        title = f"{len(picked)} of {len(examples)} examples scored below 1"
    if not picked:
        return [f"{title}."]
    lines = [f"{title}; the first {min(limit, len(picked))}:"]
    width = max(len(label) for label, _ in results)
    for i in picked[:limit]:
        example = examples[i]
        lines.append(f"  {example.source}  {_short(example.prompt[-1]['content'])}")
        lines.append(f"    {'expected':<{width}}  {example.answer!r}")
        for label, result in results:
            mark = "✓" if result.scores[i] >= 1 else "✗"
            lines.append(f"    {label:<{width}}  {result.answers[i]!r} {mark}")
    return lines


def cmd_eval(args: argparse.Namespace) -> int:
    import httpx
    from tqdm import tqdm

    from loraplex.adapters.manifest import sha256_file
    from loraplex.adapters.refs import AdapterRef, parse_adapter_ref, parse_version
    from loraplex.cli_registry import EXIT_REFUSED, _err, _open, _run
    from loraplex.training.data import DataError, read_examples
    from loraplex.training.metrics import SCORERS
    from loraplex.training.served_eval import ServerError, score_through_server

    def action() -> int:
        ref = parse_adapter_ref(args.ref)
        if ref.name.tenant is None:
            _err(f"{args.ref!r}: registry adapters are named tenant/name")
            return EXIT_REFUSED
        registry = _open(args)
        main = registry.catalog.resolve(ref)
        versions = [main]
        if args.against:
            versions.append(
                registry.catalog.resolve(AdapterRef(ref.name, version=parse_version(args.against)))
            )
        settings = _manifest_eval_settings(main)
        metric = args.metric or settings.get("metric") or "exact_match"
        if metric not in SCORERS:
            _err(f"--metric {metric!r}: choose from {', '.join(sorted(SCORERS))}")
            return EXIT_REFUSED
        max_new_tokens = args.max_new_tokens or settings.get("max_new_tokens")
        max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        try:
            examples = read_examples(args.data)[: args.max_examples]
        except DataError as exc:
            _err(str(exc))
            return EXIT_REFUSED
        data_sha256 = sha256_file(args.data)
        api_key = args.api_key or os.environ.get("LORAPLEX_API_KEY") or "unused"
        print(
            f"{ref.name} on {args.data.name}: {len(examples)} examples, {metric}, greedy, "
            f"max {max_new_tokens} tokens, through {args.url}",
            file=sys.stderr,
        )
        results: list[tuple[str, ServedScore]] = []
        with (
            httpx.Client(
                base_url=args.url,
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=args.timeout,
            ) as client,
            tqdm(
                total=len(examples) * len(versions),
                desc="asking",
                unit="req",
                file=sys.stderr,
                disable=args.quiet,
            ) as bar,
        ):
            for record in versions:
                try:
                    served = score_through_server(
                        client,
                        f"{record.adapter}:v{record.number}",
                        examples,
                        metric,
                        max_new_tokens,
                        args.concurrency,
                        lambda: bar.update(1),
                    )
                except ServerError as exc:
                    bar.close()
                    _err(str(exc))
                    unreachable = exc.status is None or exc.status >= 500
                    return EXIT_UNAVAILABLE if unreachable else EXIT_REFUSED
                results.append((f"v{record.number}", served))

        n = len(examples)
        rows = [("version", "served", "training-time (manifest)", "")]
        for record, (label, served) in zip(versions, results, strict=True):
            rows.append(
                (
                    label,
                    f"{served.score:.1%} ({served.correct:g}/{n})",
                    training_time(record, data_sha256, n),
                    _difference(record, served, data_sha256, n),
                )
            )
        widths = [max(len(row[c]) for row in rows) for c in range(3)]
        for row in rows:
            cells = [f"{cell:<{widths[c]}}" for c, cell in enumerate(row[:3])] + [row[3]]
            print("  ".join(cells).rstrip())
        for line in differing_examples(examples, results, args.examples):
            print(line)

        if args.record:
            who = f"{getpass.getuser()}@{socket.gethostname()}"
            for record, (_, served) in zip(versions, results, strict=True):
                registry.record_served_eval(
                    ref.name,
                    record.number,
                    {
                        "metric": metric,
                        "score": served.score,
                        "correct": served.correct,
                        "examples": n,
                        "data": str(args.data),
                        "data_sha256": data_sha256,
                        "max_new_tokens": max_new_tokens,
                        "url": args.url,
                        "recorded_by": who,
                        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    },
                )
            labels = ", ".join(label for label, _ in results)
            print(f"recorded in the catalog ({labels}), beside the training-time scores")
        return 0

    return _run(args, action)


def cmd_show(args: argparse.Namespace) -> int:
    from loraplex.adapters.catalog import UnknownAdapter
    from loraplex.adapters.refs import parse_registry_name
    from loraplex.cli_registry import _open, _run

    def action() -> int:
        name = parse_registry_name(args.name)
        registry = _open(args)
        if not registry.catalog.exists(name):
            raise UnknownAdapter(f"adapter {name} is not in the registry")
        print(name)
        for version in registry.quality(name):
            # base, base_few_shot_<k>, adapter: the order `loraplex eval` prints them in.
            order = sorted(version.manifest_eval, key=lambda k: (k != "base", k == "adapter", k))
            scores = ", ".join(f"{k} {version.manifest_eval[k]:.1%}" for k in order)
            print(f"  v{version.number}  training-time: {scores or 'none'}")
            gate = version.gate
            if gate is not None:
                verdict = "passed" if gate.get("passed") else f"FORCED by {version.forced_by}"
                print(f"       gate: {verdict}: {gate.get('reason')}")
            for served in version.served_evals:
                print(
                    f"       served: {served['score']:.1%} {served['metric']} on "
                    f"{Path(served['data']).name} ({served['examples']} examples) via "
                    f"{served['url']}, {served['recorded_at']} by {served['recorded_by']}"
                )
        return 0

    return _run(args, action)


def add_eval_commands(adapters: typing.Any, registry_flags: typing.Sequence[str]) -> None:
    """Add `eval` and `show` to the `loraplex adapters` subparser group."""
    evaluate = adapters.add_parser(
        "eval",
        help="score registry versions on held-out data through a running router",
        description="Send each held-out prompt (JSONL, as for `loraplex train`) to the router "
        "as a chat request (greedy, the server's chat template and dtype) for NAME[:vN] and, "
        "with --against, another version; print the metric per version beside the "
        "training-time score in its manifest (and by how many examples they differ: a bf16 "
        "engine can flip near-ties that float32 peft does not), then examples where the "
        "versions answer differently. --record stores the result in the catalog.",
    )
    evaluate.add_argument("ref", help="tenant/name, tenant/name:vN or tenant/name@alias")
    evaluate.add_argument("--data", type=Path, required=True, help="held-out JSONL")
    evaluate.add_argument("--against", default=None, help="vM: a second version, side by side")
    evaluate.add_argument(
        "--url", default=DEFAULT_URL, help=f"the router's base URL (default {DEFAULT_URL})"
    )
    evaluate.add_argument(
        "--api-key",
        default=None,
        help="API key for the router (default: $LORAPLEX_API_KEY; none needed without tenants)",
    )
    evaluate.add_argument(
        "--record", action="store_true", help="store the scores in the catalog per version"
    )
    evaluate.add_argument("--metric", default=None, help="default: the manifest's eval.metric")
    evaluate.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: the manifest's, else 48"
    )
    evaluate.add_argument("--max-examples", type=int, default=None, help="score the first N")
    evaluate.add_argument(
        "--examples", type=int, default=3, help="differing examples to print (default 3)"
    )
    evaluate.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight at once (default 8)"
    )
    evaluate.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per request (default 300)"
    )
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    add_settings_flags(evaluate, registry_flags)
    evaluate.set_defaults(func=cmd_eval)

    show = adapters.add_parser(
        "show",
        help="an adapter's versions with their training-time scores, gate decisions and "
        "recorded served scores",
    )
    show.add_argument("name", help="tenant/name")
    add_settings_flags(show, registry_flags)
    show.set_defaults(func=cmd_show)
