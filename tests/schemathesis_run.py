"""Run schemathesis (its `st` command line) against a live server and count what it saw.

Shared by the router-schema fuzz (tests/unit/test_openapi_fuzz.py, stand-in engine) and
the vLLM-schema fuzz (tests/integration/test_vllm_schema_fuzz.py, real engine). The
command line, not the pytest plugin: it runs every phase (examples, coverage with
unsupported methods, fuzzing, stateful) and writes each request to a HAR file, from which
the numbers (requests, statuses, 5xx) come.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# What "conforms" means here: no 5xx; every status, content type, header and body the
# schema documents; 405 with `Allow` for a method the schema does not list.
CONTRACT_CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "unsupported_method",
)


@dataclass
class FuzzResult:
    returncode: int
    output: str
    statuses: Counter[int]
    errors: Counter[str]
    """`status: message` of the error answers, to read why requests were refused."""
    seconds: float

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def summary(self) -> str:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return (
            f"{self.requests} requests in {self.seconds:.0f} s, {self.server_errors} 5xx; "
            f"statuses {statuses}"
        )

    def common_errors(self, top: int = 10) -> str:
        return "\n".join(f"{n:5} × {error}" for error, n in self.errors.most_common(top))


def run_schemathesis(
    schema: dict,
    base_url: str,
    folder: Path,
    *,
    checks: tuple[str, ...] = CONTRACT_CHECKS,
    headers: dict[str, str] | None = None,
    max_examples: int = 10,
    phases: str = "examples,coverage,fuzzing,stateful",
    mode: str = "all",
    max_time_s: int = 120,
) -> FuzzResult:
    """`st run` with `schema` against `base_url`; a fixed seed, so a failure reproduces."""
    schema_path = folder / "openapi.json"
    schema_path.write_text(json.dumps(schema))
    har = folder / "requests.har"
    command = [
        str(Path(sys.executable).parent / "st"),
        "run",
        str(schema_path),
        "--url",
        base_url,
        "--checks",
        ",".join(checks),
        "--phases",
        phases,
        "--mode",
        mode,
        "--max-examples",
        str(max_examples),
        "--max-time",
        str(max_time_s),
        "--seed",
        "1",
        "--request-timeout",
        "60",
        "--report",
        "har",
        "--report-har-path",
        str(har),
        "--no-color",
        "--warnings",
        "off",
    ]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    started = time.monotonic()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=max_time_s + 120, cwd=folder
    )
    seconds = time.monotonic() - started
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    statuses = Counter(entry["response"]["status"] for entry in entries)
    errors = Counter(
        f"{entry['response']['status']}: {_message(entry['response'])}"
        for entry in entries
        if entry["response"]["status"] >= 400
    )
    return FuzzResult(done.returncode, done.stdout + done.stderr, statuses, errors, seconds)


def _message(response: dict) -> str:
    text = response.get("content", {}).get("text", "")
    try:
        error = json.loads(text)["error"]
        return f"{error.get('param')}: {str(error.get('message'))[:120]}"
    except (ValueError, KeyError, TypeError):
        return text[:120]
