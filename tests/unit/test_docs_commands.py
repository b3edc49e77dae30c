"""The docs' commands work as written.

- Every block marked `<!-- docs-test: run -->` in README.md and docs/*.md runs, in order,
  in a sandbox per page (a temporary HOME and working folder, no LORAPLEX_* variable of
  the caller): ```console blocks print what they show (`...` matches anything, and a
  command that fails shows `(exit status N)`), ```bash blocks exit 0.
- Every `loraplex <command> --flag` written anywhere in the docs names a command and flags
  that the CLI's parser has, so a renamed flag or command fails here.
- The stock vLLM command in docs/serving.md is the one `loraplex serve` runs.

`loraplex ...` commands run in this process through `loraplex.cli.main` (one import of
the CLI instead of ~2 s of start-up per command); anything else runs under bash.
"""

from __future__ import annotations

import argparse
import contextlib
import doctest
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.base_model import embedded_model_dir
from loraplex.cli import build_parser, main
from loraplex.database import dispose_shared_engines
from loraplex.serving.vllm_backend import vllm_command, vllm_environment
from loraplex.settings import ServeSettings
from tests.unit.docs_markdown import (
    ROOT,
    Step,
    blocks,
    doc_pages,
    logical_lines,
    prose,
    shell_texts,
    steps,
)

# Inline code that starts with `loraplex` but is not a command.
NOT_COMMANDS = {"loraplex ready"}  # the log line `loraplex serve` writes once it serves
_SHELL_SYNTAX = set("$~|;&<>`*(){}")
_SEPARATORS = ("&&", "||", "|", ";", "$(", "`")
# Flags of other tools that the docs name on their own (not after a command).
OTHER_TOOLS_FLAGS = {"--scale"}  # docker compose up --scale backend=2
_INLINE_FLAG = re.compile(r"`(--[a-z][a-z0-9._-]*\*?)")
_MATCH = doctest.OutputChecker()
_OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _pages_with_run_blocks() -> list[Path]:
    return [page for page in doc_pages() if any(b.run for b in blocks(page))]


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary HOME (so every cache and the default database are fresh) and working
    folder; the embedded base model is read from where it already is."""
    model_cache = embedded_model_dir().parent
    for name in list(os.environ):
        if name.startswith("LORAPLEX_"):
            monkeypatch.delenv(name)
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("LORAPLEX_MODEL_CACHE", str(model_cache))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.chdir(work)
    yield work
    dispose_shared_engines()  # the page's SQLite files, before their folder is removed


def run_step(step: Step) -> tuple[int, str]:
    """(exit status, stdout and stderr as a terminal shows them)."""
    words = shlex.split(step.command, comments=True)
    if words and words[0] == "loraplex" and not _SHELL_SYNTAX & set(step.command):
        output = io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            try:
                status = main(words[1:])
            except SystemExit as exc:  # argparse: --help, usage errors
                status = exc.code if isinstance(exc.code, int) else 1
        return status, output.getvalue()
    result = subprocess.run(
        ["bash", "-c", step.command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout


@pytest.mark.parametrize("page", _pages_with_run_blocks(), ids=lambda p: str(p.relative_to(ROOT)))
def test_run_blocks_do_what_the_page_shows(page: Path, sandbox: Path):
    for block in (b for b in blocks(page) if b.run):
        for step in steps(block):
            status, output = run_step(step)
            where = f"{block.where}: $ {step.command}"
            if step.expected is None:
                assert status == 0, f"{where}\nexit status {status}:\n{output}"
                continue
            if status != 0:
                output += f"(exit status {status})\n"
            assert _MATCH.check_output(step.expected, output, _OPTIONS), (
                f"{where}\nthe page shows:\n{step.expected}\nit printed:\n{output}"
            )


def test_the_docs_have_run_blocks():
    """The marker convention is in use: the test above cannot pass by finding nothing."""
    marked = [b for page in doc_pages() for b in blocks(page) if b.run]
    assert len(marked) >= 5, [b.where for b in marked]
    assert {b.language for b in marked} == {"console", "bash"}


# ---- every `loraplex ...` in the docs is a command the CLI has --------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _cli_mentions(text: str) -> list[list[str]]:
    """Each `loraplex ...` (or `-m loraplex.cli ...`) in a piece of code: the words after it,
    up to the end of its shell command."""
    found = []
    for line in logical_lines(text):
        line = line.split(" #", 1)[0]
        if line.startswith("$ "):
            line = line[2:]
        for separator in _SEPARATORS:
            line = line.replace(separator, "\n")
        for segment in line.splitlines():
            words = segment.split()
            for i, word in enumerate(words):
                if word == "loraplex" or (
                    word == "loraplex.cli" and i > 0 and words[i - 1] == "-m"
                ):
                    found.append(words[i + 1 :])
                    break
    return found


def _cli_problems(words: list[str], root: argparse.ArgumentParser) -> list[str]:
    parser, path, problems = root, ["loraplex"], []
    for raw in words:
        word = raw.strip("[](),'\"")
        if not word or word.startswith(("…", "...")):
            continue
        if word.startswith("<"):  # a placeholder: `loraplex <command> --help`
            if _subcommands(parser):
                return problems
            continue
        if word.startswith("-"):
            flag = word.split("=", 1)[0]
            if flag not in parser._option_string_actions:
                problems.append(f"`{' '.join(path)}` has no option {flag}")
            continue
        choices = _subcommands(parser)
        if not choices:
            continue  # a positional argument
        if word not in choices:
            if " ".join([*path, word]) not in NOT_COMMANDS:
                problems.append(f"`{' '.join(path)}` has no command {word!r}")
            return problems
        parser, path = choices[word], [*path, word]
    return problems


def test_every_loraplex_command_in_the_docs_exists():
    root = build_parser()
    problems = []
    for page in doc_pages():
        for text in shell_texts(page):
            for words in _cli_mentions(text):
                for problem in _cli_problems(words, root):
                    problems.append(f"{page.relative_to(ROOT)}: {problem}")
    assert not problems, "\n".join(sorted(set(problems)))


def _all_options(parser: argparse.ArgumentParser) -> set[str]:
    options = set(parser._option_string_actions)
    for sub in _subcommands(parser).values():
        options |= _all_options(sub)
    return options


def _bench_flags() -> set[str]:
    """Flags the benchmark scripts define (`"--stub-only"` in their source)."""
    return {
        flag
        for script in (ROOT / "bench").glob("*.py")
        for flag in re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", script.read_text())
    }


def test_every_flag_named_on_its_own_exists():
    """`--max-loras` in a sentence is a flag of some loraplex command, of the vLLM command
    `loraplex serve` runs, or of a benchmark script; `--registry-*` a family of them."""
    known = (
        _all_options(build_parser())
        | {w for w in vllm_command(ServeSettings()) if w.startswith("--")}
        | _bench_flags()
        | OTHER_TOOLS_FLAGS
    )
    unknown = set()
    for page in doc_pages():
        for flag in _INLINE_FLAG.findall(prose(page)):
            exists = (
                any(k.startswith(flag[:-1]) for k in known) if flag.endswith("*") else flag in known
            )
            if not exists:
                unknown.add(f"{page.relative_to(ROOT)}: {flag}")
    assert not unknown, "\n".join(sorted(unknown))


def test_the_flag_check_catches_a_renamed_flag_and_command():
    root = build_parser()
    assert _cli_problems(["serve", "--max-loras", "8"], root) == []
    assert _cli_problems(["serve", "--max-lora", "8"], root) == [
        "`loraplex serve` has no option --max-lora"
    ]
    assert _cli_problems(["adapters", "publsh", "x"], root) == [
        "`loraplex adapters` has no command 'publsh'"
    ]
    assert _cli_mentions("$ python -m loraplex.cli train t.yaml --optim.lr 1e-3 | tee log") == [
        ["train", "t.yaml", "--optim.lr", "1e-3"]
    ]


# ---- the stock vLLM command of docs/serving.md is the one `loraplex serve` runs ---------


def _documented_vllm_block() -> list[str]:
    page = ROOT / "docs" / "serving.md"
    found = [b for b in blocks(page) if "vllm.entrypoints.openai.api_server" in b.text]
    assert len(found) == 1, "docs/serving.md shows the stock vLLM command once"
    return logical_lines(found[0].text)


def _pairs(words: list[str]) -> dict[str, str | None]:
    """`--flag value` and `--switch` from a command line."""
    pairs: dict[str, str | None] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            following = words[i + 1] if i + 1 < len(words) else "--"
            pairs[word] = None if following.startswith("--") else following
    return pairs


def test_documented_stock_vllm_command_is_what_loraplex_serve_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    for name in list(os.environ):
        if name.startswith(("LORAPLEX_", "VLLM_", "HF_", "TRANSFORMERS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = ServeSettings()  # the defaults the page documents

    def expand(value: str | None) -> str | None:
        return value.replace("~", str(tmp_path)) if value else value

    lines = _documented_vllm_block()
    command = next(shlex.split(line) for line in lines if "api_server" in line)
    assert command[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    documented = {flag: expand(value) for flag, value in _pairs(command[3:]).items()}
    actual = vllm_command(settings)
    assert actual[1:3] == command[1:3]
    assert documented == _pairs(actual[3:])

    environment = vllm_environment(settings)
    exported = dict(
        word.split("=", 1)
        for line in lines
        if line.startswith("export ")
        for word in shlex.split(line)[1:]
    )
    assert {"VLLM_PLUGINS", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"} <= exported.keys()
    assert {name: expand(value) for name, value in exported.items()} == {
        name: environment.get(name) for name in exported
    }
