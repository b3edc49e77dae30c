"""vLLM's own log lines come out as loraplex JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from loraplex.serving.vllm_backend import VLLM_LOGGING_CONFIG, vllm_environment
from loraplex.settings import ServeSettings


def test_backend_environment_points_vllm_at_the_json_logging_config() -> None:
    env = vllm_environment(ServeSettings())
    assert env["VLLM_LOGGING_CONFIG_PATH"] == str(VLLM_LOGGING_CONFIG)
    assert VLLM_LOGGING_CONFIG.is_file()


def test_vllm_logger_writes_json_lines_with_that_config() -> None:
    # The OpenAI server applies a LoggingConfig whose file defaults to the env var.
    code = (
        "from vllm.config.logging import LoggingConfig\n"
        "from vllm.logger import configure_logging, init_logger\n"
        "configure_logging(LoggingConfig())\n"
        "init_logger('vllm.engine.test').info('engine started in %.1f s', 1.5)\n"
    )
    env = dict(os.environ, VLLM_LOGGING_CONFIG_PATH=str(VLLM_LOGGING_CONFIG))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    entry = next(e for e in lines if e["logger"] == "vllm.engine.test")
    assert entry["msg"] == "engine started in 1.5 s"
    assert entry["level"] == "info"
