"""A simulated vLLM OpenAI server: adapter slots in LRU, load and per-token delays, no model.

For the scale-out benchmark (bench/scaleout.py): several of these stand in for vLLM
replicas, so the router's picker can be measured without a GPU per replica.

The engine is one loop per process, as vLLM's: every step admits waiting requests
(FIFO, at most `max_num_seqs` running), then emits one token to every running
request after the step time. A request needs its adapter in one of `max_loras`
slots. An adapter not in a slot takes the least recently used slot that no running
request uses; when every slot is in use the request stays waiting and the scheduler
tries the next one (vLLM's scheduler skips it the same way). Loading costs
`load_s`; by default the load stalls the whole step, because vLLM's worker loads
LoRA weights synchronously before the forward pass (`--load-mode request` charges
only the loading request, loads still one at a time per replica). Any `model`
name other than the base model is an adapter: the router forwards version ids and
local names the stub has no need to know.

Step time = `step_s` x (1 + `batch_slowdown` x (running - 1)). The defaults are
this repository's measurements on 2 CPU cores (bench/RESULTS.md): 79 ms per token
at 16 concurrent sequences (router_overhead, direct), 150 ms at 64 (multilora, base
row) -> 57 ms + 1.48 ms per extra sequence; the first token takes one step, as a
warm 1-token request did (60 ms through the router, adapter_swap). The load delay
is vLLM's runtime adapter load (55-87 ms per the issue, ~60 ms here).

Endpoints: /health, /v1/models, /v1/completions and /v1/chat/completions (plain
and SSE with `stream_options.include_usage`), /v1/load_lora_adapter and
/v1/unload_lora_adapter (accepted, no effect: loading happens on first use),
/metrics (Prometheus text with a `vllm:lora_requests_info`-like gauge), /stats (JSON
counters for the bench).

Usage: python bench/stub_vllm.py PORT [--max-loras 8] [--max-num-seqs 64]
       [--load-s 0.06] [--step-s 0.057] [--batch-slowdown 0.026] [--load-mode stall]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

BASE_MODEL = "SmolLM2-135M-Instruct"
TOKEN = " tok"


@dataclass
class EngineConfig:
    max_loras: int = 8
    max_num_seqs: int = 64
    load_s: float = 0.060
    step_s: float = 0.057
    batch_slowdown: float = 0.026
    load_mode: str = "stall"  # "stall" (vLLM: a load holds up the step) or "request"
    base_model: str = BASE_MODEL

    def step_time(self, running: int) -> float:
        return self.step_s * (1 + self.batch_slowdown * max(0, running - 1))


@dataclass
class Sequence:
    adapter: str | None
    max_tokens: int
    streamed: bool
    tokens: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    produced: int = 0
    ready_at: float = 0.0  # load-mode "request": when its adapter load is done
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    blocked: bool = False  # skipped at least once: every slot was in use


@dataclass
class Slot:
    users: int = 0  # admitted sequences using the adapter; the slot is not evictable while > 0
    ready_at: float = 0.0  # load-mode "request": when the adapter's load is done


class Engine:
    """The scheduler and step loop of one simulated replica."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.slots: OrderedDict[str, Slot] = OrderedDict()  # least recently used first
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.loading: list[Sequence] = []
        self.loads = 0
        self.evictions = 0
        # Requests that waited because every slot was in use, and how long they waited.
        self.slot_waits = 0
        self.slot_wait_s_total = 0.0
        self.slot_wait_s_max = 0.0
        self.requests = 0
        self.tokens = 0
        # Step sleeps asked for and taken: on a busy machine the loop wakes late, and
        # the replica is slower than its parameters say (the bench reports the ratio).
        self.step_s_nominal = 0.0
        self.step_s_actual = 0.0
        self._loader_free_at = 0.0
        self._wake = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + len(self.loading) + len(self.running)

    def submit(self, adapter: str | None, max_tokens: int, streamed: bool) -> Sequence:
        sequence = Sequence(adapter, max(1, max_tokens), streamed)
        self.waiting.append(sequence)
        self.requests += 1
        self._wake.set()
        return sequence

    def _take_slot(self, adapter: str) -> tuple[Slot, bool] | None:
        """(the adapter's slot, whether it must be loaded now), or None while every slot
        is in use."""
        slot = self.slots.get(adapter)
        if slot is not None:
            slot.users += 1
            self.slots.move_to_end(adapter)
            return slot, False
        if len(self.slots) >= self.config.max_loras:
            victim = next((name for name, s in self.slots.items() if s.users == 0), None)
            if victim is None:
                return None
            del self.slots[victim]
            self.evictions += 1
        slot = self.slots[adapter] = Slot(users=1)
        self.loads += 1
        return slot, True

    def _admit(self, now: float) -> int:
        """Move waiting sequences into the batch; returns the loads that stall this step."""
        stalling_loads = 0
        skipped: deque[Sequence] = deque()
        admitted = len(self.running) + len(self.loading)
        while self.waiting and admitted < self.config.max_num_seqs:
            sequence = self.waiting.popleft()
            if sequence.cancelled:
                continue
            if sequence.adapter is None:
                admitted += 1
                self.running.append(sequence)
                continue
            taken = self._take_slot(sequence.adapter)
            if taken is None:
                sequence.blocked = True
                skipped.append(sequence)
                continue
            if sequence.blocked:
                waited = now - sequence.submitted_at
                self.slot_waits += 1
                self.slot_wait_s_total += waited
                self.slot_wait_s_max = max(self.slot_wait_s_max, waited)
            admitted += 1
            slot, load = taken
            if self.config.load_mode == "stall":
                stalling_loads += load
                self.running.append(sequence)
                continue
            if load:  # one loader per replica: loads queue behind each other
                self._loader_free_at = max(now, self._loader_free_at) + self.config.load_s
                slot.ready_at = self._loader_free_at
            if slot.ready_at > now:
                sequence.ready_at = slot.ready_at
                self.loading.append(sequence)
            else:
                self.running.append(sequence)
        skipped.extend(self.waiting)
        self.waiting = skipped
        return stalling_loads

    def _release(self, sequence: Sequence) -> None:
        if sequence.adapter is not None:
            self.slots[sequence.adapter].users -= 1

    async def run(self) -> None:
        config = self.config
        while True:
            if not self.in_flight:
                self._wake.clear()
                await self._wake.wait()
            now = time.monotonic()
            loads = self._admit(now)
            if loads:
                await asyncio.sleep(config.load_s * loads)
            if self.loading:
                now = time.monotonic()
                ready = [s for s in self.loading if s.ready_at <= now]
                self.loading = [s for s in self.loading if s.ready_at > now]
                self.running.extend(ready)
            if not self.running:
                if self.loading:
                    await asyncio.sleep(min(s.ready_at for s in self.loading) - now)
                continue
            step_s = config.step_time(len(self.running))
            started = time.monotonic()
            await asyncio.sleep(step_s)
            self.step_s_nominal += step_s
            self.step_s_actual += time.monotonic() - started
            still_running = []
            for sequence in self.running:
                if sequence.cancelled:
                    self._release(sequence)
                    continue
                sequence.produced += 1
                self.tokens += 1
                sequence.tokens.put_nowait(sequence.produced)
                if sequence.produced >= sequence.max_tokens:
                    sequence.tokens.put_nowait(None)
                    self._release(sequence)
                else:
                    still_running.append(sequence)
            self.running = still_running

    def stats(self) -> dict:
        return {
            "loads": self.loads,
            "evictions": self.evictions,
            "slot_waits": self.slot_waits,
            "slot_wait_s_total": round(self.slot_wait_s_total, 3),
            "slot_wait_s_max": round(self.slot_wait_s_max, 3),
            "requests": self.requests,
            "tokens": self.tokens,
            "step_s_nominal": round(self.step_s_nominal, 3),
            "step_s_actual": round(self.step_s_actual, 3),
            "running": len(self.running),
            "loading": len(self.loading),
            "waiting": len(self.waiting),
            "in_flight": self.in_flight,
            "in_flight_streamed": sum(
                s.streamed for s in (*self.waiting, *self.loading, *self.running)
            ),
            "slots": list(self.slots),
            "max_loras": self.config.max_loras,
        }

    def metrics(self) -> str:
        running = sorted({s.adapter for s in self.running if s.adapter})
        waiting = sorted({s.adapter for s in (*self.waiting, *self.loading) if s.adapter})
        return (
            "# TYPE stub_adapter_loads_total counter\n"
            f"stub_adapter_loads_total {self.loads}\n"
            "# TYPE stub_adapter_evictions_total counter\n"
            f"stub_adapter_evictions_total {self.evictions}\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running {len(self.running)}\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting {len(self.waiting) + len(self.loading)}\n"
            "# TYPE vllm:lora_requests_info gauge\n"
            f'vllm:lora_requests_info{{max_lora="{self.config.max_loras}",'
            f'running_lora_adapters="{",".join(running)}",'
            f'waiting_lora_adapters="{",".join(waiting)}"}} {time.time()}\n'
        )


def _prompt_tokens(body: dict) -> int:
    if "messages" in body:
        text = " ".join(str(m.get("content", "")) for m in body["messages"])
    else:
        text = str(body.get("prompt", ""))
    return max(1, len(text.split()))


def _error(status: int, message: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "BadRequestError", "param": None}}
    return JSONResponse(body, status)


def create_app(config: EngineConfig) -> Starlette:
    engine = Engine(config)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(engine.run())
        yield
        task.cancel()

    async def generate(request: Request) -> Response:
        try:
            body = await request.json()
            model = str(body["model"])
        except (ValueError, KeyError, TypeError):
            return _error(400, "the body must be JSON with a `model`")
        chat = request.url.path.endswith("/chat/completions")
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        adapter = None if model == config.base_model else model
        sequence = engine.submit(adapter, max_tokens, bool(body.get("stream")))
        created = int(time.time())
        prompt_tokens = _prompt_tokens(body)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sequence.max_tokens,
            "total_tokens": prompt_tokens + sequence.max_tokens,
        }
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"cmpl-{id(sequence):x}", "created": created, "model": model}
        if body.get("stream"):
            options = body.get("stream_options") or {}
            events = _events(sequence, head, kind, chat, usage, bool(options.get("include_usage")))
            return StreamingResponse(events, media_type="text/event-stream")
        while await sequence.tokens.get() is not None:
            pass
        text = TOKEN * sequence.max_tokens
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = "length"
        return JSONResponse(head | {"object": kind, "choices": [choice], "usage": usage})

    async def health(_: Request) -> Response:
        return Response()

    async def models(_: Request) -> JSONResponse:
        card = {"id": config.base_model, "object": "model", "owned_by": "stub"}
        return JSONResponse({"object": "list", "data": [card]})

    async def accept_adapter(_: Request) -> Response:
        return PlainTextResponse("Success")

    async def metrics(_: Request) -> Response:
        return PlainTextResponse(engine.metrics())

    async def stats(_: Request) -> JSONResponse:
        return JSONResponse(engine.stats())

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/completions", generate, methods=["POST"]),
        Route("/v1/chat/completions", generate, methods=["POST"]),
        Route("/v1/load_lora_adapter", accept_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", accept_adapter, methods=["POST"]),
        Route("/metrics", metrics),
        Route("/stats", stats),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def _events(
    sequence: Sequence, head: dict, kind: str, chat: bool, usage: dict, include_usage: bool
) -> AsyncIterator[bytes]:
    chunk_kind = f"{kind}.chunk" if chat else kind
    try:
        first = True
        while (produced := await sequence.tokens.get()) is not None:
            finish = "length" if produced >= sequence.max_tokens else None
            if chat:
                delta = {"content": TOKEN} | ({"role": "assistant"} if first else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": TOKEN, "logprobs": None, "finish_reason": finish}
            first = False
            yield _sse(head | {"object": chunk_kind, "choices": [choice]})
        if include_usage:
            yield _sse(head | {"object": chunk_kind, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"
    finally:  # the client went away: the engine drops the sequence at its next step
        sequence.cancelled = True


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    defaults = EngineConfig()
    parser.add_argument("--max-loras", type=int, default=defaults.max_loras)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--load-s", type=float, default=defaults.load_s)
    parser.add_argument("--step-s", type=float, default=defaults.step_s)
    parser.add_argument("--batch-slowdown", type=float, default=defaults.batch_slowdown)
    parser.add_argument("--load-mode", choices=["stall", "request"], default=defaults.load_mode)
    parser.add_argument("--base-model", default=defaults.base_model)
    args = parser.parse_args()
    config = EngineConfig(
        args.max_loras,
        args.max_num_seqs,
        args.load_s,
        args.step_s,
        args.batch_slowdown,
        args.load_mode,
        args.base_model,
    )
    uvicorn.run(
        create_app(config), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
