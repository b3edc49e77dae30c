"""Small real artefacts for registry tests: peft-format adapter folders, a base-model folder,
a moto S3 server, and a stand-in vLLM server for router tests without an engine."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from safetensors.numpy import save_file

PROJECTIONS = ("q_proj", "v_proj")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def uvicorn_in_thread(
    config: uvicorn.Config, start_timeout_s: float = 30
) -> Iterator[uvicorn.Server]:
    """Runs `config`'s server on a daemon thread for the `with` block and stops it after.

    The listening socket is bound here, before the thread starts, so a port that is taken
    fails at once with the address in the error; `config.port = 0` lets the kernel choose
    one (no race with another process between choosing and binding) and `bound_url`
    says which. Waits up to `start_timeout_s` for the server to start (a loaded 2-core CI
    machine has needed more than 10 s for a router's lifespan); the caller checks
    `server.started` where a server that did not start must fail the test at once.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((config.host, config.port))
    except OSError as error:
        listener.close()
        raise OSError(
            f"cannot bind {config.host}:{config.port} for a test server: {error}"
        ) from error
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


def bound_url(server: uvicorn.Server) -> str:
    """The http:// address a started `uvicorn_in_thread` server listens on."""
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    return f"http://{host}:{port}"


def make_adapter_dir(folder: Path, seed: int, rank: int = 8, **config: object) -> Path:
    """A peft-format LoRA folder (2 layers, q/v) whose weights depend on `seed`."""
    folder.mkdir(parents=True, exist_ok=True)
    adapter_config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "bias": "none",
        "target_modules": list(PROJECTIONS),
        "base_model_name_or_path": "tiny-base",
        **config,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(2):
        for proj in PROJECTIONS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, 16), np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((16, rank), np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def make_base_dir(folder: Path) -> Path:
    """A base-model folder with the weight names publish reads its module names from."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"model.embed_tokens.weight": np.zeros((8, 16), np.float32)}
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"model.layers.{layer}.self_attn.{proj}.weight"] = np.zeros(
                (16, 16), np.float32
            )
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = np.zeros(16, np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@contextmanager
def moto_s3() -> Iterator[str]:
    """A real S3-compatible HTTP server (moto) on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


class FakeVLLM:
    """Speaks the part of vLLM's HTTP API the router uses, with the loraplex plugin's
    resolvers: an adapter it does not hold is looked up on its first request by
    `resolve(name) -> folder | None` (None: 404, as vLLM answers when no resolver finds
    it). A completion answers with the folder the adapter was loaded from, so tests see
    which files served it."""

    def __init__(self, resolve: Callable[[str], str | None] = lambda name: None) -> None:
        self.resolve = resolve
        self.registered: dict[str, str] = {}
        self.load_calls: list[str] = []
        self.requests: list[str] = []
        self.load_delay_s = 0.0
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict:
            return {}

        @app.post("/v1/completions")
        @app.post("/v1/chat/completions")
        async def complete(request: Request) -> JSONResponse:
            model = (await request.json())["model"]
            self.requests.append(model)
            if model != "base" and model not in self.registered:
                self.load_calls.append(model)
                if self.load_delay_s:
                    await asyncio.sleep(self.load_delay_s)
                folder = await asyncio.to_thread(self.resolve, model)
                if folder is None:
                    return JSONResponse({"error": {"message": f"{model} not found"}}, 404)
                self.registered[model] = folder
            text = self.registered.get(model, "base")
            return JSONResponse(
                {"object": "text_completion", "model": model, "choices": [{"text": text}]}
            )

        self.app = app

    @contextmanager
    def serve(self) -> Iterator[str]:
        port = free_port()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="error")
        with uvicorn_in_thread(config):
            yield f"http://127.0.0.1:{port}"
