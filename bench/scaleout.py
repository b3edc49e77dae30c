"""Scale-out: the adapter-aware picker vs round-robin in front of simulated vLLM replicas.

Starts stub replicas (bench/stub_vllm.py: `max_loras` adapter slots in LRU, a load
delay and a per-token step time measured in this repository) and the real router in
front of them, as users run it (`loraplex serve --backend-url URL,URL,... --picker P`),
then sends a seeded open-loop request sequence (Poisson arrivals, half of them
streamed, chat and text completions) through the router. Scenarios (issue 13):

1. zipf: N=4 replicas, 64 adapters with Zipf(1.1) popularity, ~70 % load; the same
   sequence once per picker on fresh replicas. Adapter loads (sum over the replicas'
   counters), TTFT p50/p95 (streamed requests: send to first content chunk), failures.
   Loads and TTFT are measured after a warm-up (`--warmup`, 15 s): at the start every
   adapter is cold on every replica, and those first loads (at least one per adapter,
   with either picker) would make the comparison depend on the run's length; the
   whole-run loads are reported too. Targets: affinity >= 50 % fewer loads and >= 30 %
   lower TTFT p95 than round-robin.
2. hot: one adapter takes 50 % of the traffic (the rest Zipf over the other 63),
   affinity picker; every replica's in-flight (running + waiting in the stub) sampled
   every 0.2 s after the warm-up. Target: max in-flight on any replica <= 1.25 x the
   mean (p95 over samples with a mean >= 1). The picker compares a replica's count
   with the bound before it adds the request, so it allows up to 1.25 x mean + 1; the
   share of samples above that is reported too.
3. kill: 3 replicas, affinity picker, `--duration` s of load; after a third of it the
   replica with most requests in flight is SIGKILLed. Target: 0 lost non-streamed
   requests; streams either complete or end with an error event (none cut silently).
4. picker speed: `pick()` p50 at 16 replicas x 1,000 adapters, in-process
   (bench/picker_speed.py). Target <= 50 us.

Load: the request rate is `--utilisation` x the replicas' capacity, a replica serving
one request per adapter slot at a time, each `tokens` steps long at the step time of
a `max_loras` batch, no loads: rate = u x N x max_loras / (tokens x step(max_loras)).
(A full batch of `max_num_seqs` 64 would give a 3.6x higher peak, but only with few
adapters: `max_loras` bounds the distinct adapters in a batch.) In the kill scenario N
is the replicas left after the kill, so the survivors run at u.

Prints one Markdown table, writes JSON (--out) with the machine, the load average
before and after, and how late the replicas' step timers fired (step overshoot: a busy
machine makes every simulated replica slower than its parameters).

Usage: python bench/scaleout.py [--quick] [--scenarios zipf,hot,kill,speed]
       [--duration 60] [--load-duration 60] [--hot-duration 45] [--warmup 15]
       [--utilisation 0.7] [--tokens 32] [--seed 1]
       [stub parameters: --max-loras --max-num-seqs --load-s --step-s --batch-slowdown
       --load-mode]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from bench_common import free_port, machine, percentile, wait_ready
from picker_speed import measure as measure_picker_speed
from stub_vllm import EngineConfig

STUB = Path(__file__).with_name("stub_vllm.py")
PROMPT = "Summarise the customer's message in one sentence."
SAMPLE_EVERY_S = 0.2
DRAIN_S = 120.0  # after the last arrival, how long outstanding requests may take
ROUTER_METRICS = (
    "loraplex_picker_decisions_total",
    "loraplex_backend_retries_total",
    "loraplex_retry_budget_exhausted_total",
    "loraplex_backend_ejections_total",
    "loraplex_stream_interruptions_total",
)


@dataclass(frozen=True)
class Call:
    at: float
    """Seconds after the start of the run."""
    adapter: str
    stream: bool
    chat: bool


@dataclass
class Outcome:
    stream: bool
    at: float
    """When it was sent, seconds after the start of the run."""
    status: int = 0  # 0: no response (transport error or unfinished)
    ttft_s: float | None = None
    latency_s: float | None = None
    error_event: bool = False
    done: bool = False  # a stream that reached [DONE]; a 200 body otherwise
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and not self.error_event


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[list[int | None]] = field(default_factory=list)  # in-flight per replica
    samples_before_warmup: int = 0
    loads_at_warmup: list[int | None] = field(default_factory=list)
    stub_stats: list[dict | None] = field(default_factory=list)
    router_metrics: dict[str, float] = field(default_factory=dict)
    killed: int | None = None
    killed_stats: dict | None = None  # the killed replica's /stats just before the kill
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # router, client
    killed_at_s: float | None = None
    seconds: float = 0.0


def adapter_names(count: int) -> list[str]:
    return [f"scale-a{i:02d}" for i in range(count)]


def make_adapters(root: Path, names: list[str]) -> None:
    """Local-folder adapters the router can resolve; the stubs never read the files."""
    for name in names:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        config = {"peft_type": "LORA", "r": 16, "lora_alpha": 16, "target_modules": ["q_proj"]}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (folder / "adapter_model.safetensors").write_bytes(b"")


def make_calls(
    names: list[str], rate: float, seconds: float, seed: int, zipf: float, hot_share: float
) -> list[Call]:
    """Poisson arrivals; adapter i (0-based) drawn with p ~ 1/(i+1)^zipf. With
    hot_share > 0 the first adapter takes that share, the rest Zipf over the others."""
    rng = random.Random(seed)
    pool = names[1:] if hot_share else names
    weights = [1 / (i + 1) ** zipf for i in range(len(pool))]
    calls, at = [], 0.0
    while True:
        at += rng.expovariate(rate)
        if at >= seconds:
            return calls
        if hot_share and rng.random() < hot_share:
            adapter = names[0]
        else:
            adapter = rng.choices(pool, weights)[0]
        calls.append(Call(at, adapter, stream=rng.random() < 0.5, chat=rng.random() < 0.5))


def request_rate(config: EngineConfig, replicas: int, tokens: int, utilisation: float) -> float:
    """Requests per second that keep `replicas` at `utilisation`: a replica's capacity is
    one request per adapter slot at a time, each taking `tokens` steps of a batch of
    `max_loras` sequences, no loads."""
    service_s = tokens * config.step_time(config.max_loras)
    return utilisation * replicas * config.max_loras / service_s


# ---- processes ------------------------------------------------------------------------------


def start_stubs(ports: list[int], config: EngineConfig) -> list[subprocess.Popen]:
    command = [
        sys.executable,
        str(STUB),
        "--max-loras",
        str(config.max_loras),
        "--max-num-seqs",
        str(config.max_num_seqs),
        "--load-s",
        str(config.load_s),
        "--step-s",
        str(config.step_s),
        "--batch-slowdown",
        str(config.batch_slowdown),
        "--load-mode",
        config.load_mode,
    ]
    stubs = [subprocess.Popen([*command[:2], str(port), *command[2:]]) for port in ports]
    for port, stub in zip(ports, stubs, strict=True):
        if not wait_ready(f"http://127.0.0.1:{port}", stub, "/health"):
            stop(stubs)
            raise RuntimeError(f"stub replica on port {port} failed to start")
    return stubs


def start_router(port: int, backends: list[str], picker: str, work: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "loraplex.cli",
        "serve",
        "--port",
        str(port),
        "--backend-url",
        ",".join(backends),
        "--picker",
        picker,
        "--base-model",
        "unused",  # no engine to start: nothing reads the base model
        "--adapters-dir",
        str(work / "adapters"),
        "--database-url",
        f"sqlite:///{work / 'loraplex.db'}",
        "--registry-store",
        str(work / "registry"),
        "--registry-cache-dir",
        str(work / "registry-cache"),
        "--log-level",
        "warning",
    ]
    log = (work / f"router-{picker}.log").open("ab")
    router = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    if not wait_ready(url, router) or not wait_all_up(url, len(backends)):
        stop([router])
        tail = (work / f"router-{picker}.log").read_text()[-3000:]
        raise RuntimeError(f"router failed to start or see its replicas:\n{tail}")
    return router


def wait_all_up(url: str, replicas: int, timeout_s: float = 30.0) -> bool:
    """/ready says how many replicas are up (issue 13); wait until all of them are."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = httpx.get(f"{url}/ready", timeout=2).json()
        if ready.get("replicas", {}).get("up", 0) >= replicas:
            return True
        time.sleep(0.5)
    return False


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# ---- load ---------------------------------------------------------------------------------


def body(call: Call, tokens: int) -> dict:
    payload: dict = {"model": call.adapter, "max_tokens": tokens, "stream": call.stream}
    if call.chat:
        payload["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        payload["prompt"] = PROMPT
    return payload


def has_content(data: bytes) -> bool:
    try:
        choices = json.loads(data).get("choices") or []
    except (ValueError, AttributeError):
        return False
    return any((c.get("delta") or {}).get("content") or c.get("text") for c in choices)


async def send(client: httpx.AsyncClient, call: Call, tokens: int) -> Outcome:
    outcome = Outcome(call.stream, call.at)
    path = "/v1/chat/completions" if call.chat else "/v1/completions"
    started = time.perf_counter()
    try:
        if not call.stream:
            response = await client.post(path, json=body(call, tokens))
            outcome.status = response.status_code
            outcome.done = response.status_code == 200
            if not outcome.done:
                outcome.error = response.text[:200]
        else:
            async with client.stream("POST", path, json=body(call, tokens)) as response:
                outcome.status = response.status_code
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip().encode()
                    if data == b"[DONE]":
                        outcome.done = True
                    elif b'"error"' in data:
                        outcome.error_event = True
                        outcome.error = data[:200].decode()
                    elif outcome.ttft_s is None and has_content(data):
                        outcome.ttft_s = time.perf_counter() - started
                if response.status_code != 200:
                    outcome.error = (await response.aread())[:200].decode(errors="replace")
    except httpx.HTTPError as exc:
        outcome.error = repr(exc)[:200]
    outcome.latency_s = time.perf_counter() - started
    return outcome


async def stub_counter(client: httpx.AsyncClient, url: str, name: str) -> int | None:
    try:
        return (await client.get(f"{url}/stats", timeout=2)).json()[name]
    except (httpx.HTTPError, ValueError, KeyError):
        return None  # a killed replica


async def sample_in_flight(client: httpx.AsyncClient, stubs: list[str], run: Run) -> None:
    while True:
        counts = await asyncio.gather(*(stub_counter(client, u, "in_flight") for u in stubs))
        run.samples.append(list(counts))
        await asyncio.sleep(SAMPLE_EVERY_S)


async def mark_warmup(client: httpx.AsyncClient, stubs: list[str], run: Run, at_s: float) -> None:
    """The end of the warm-up: the replicas' load counters and the sample count then."""
    await asyncio.sleep(at_s)
    run.samples_before_warmup = len(run.samples)
    loads = await asyncio.gather(*(stub_counter(client, url, "loads") for url in stubs))
    run.loads_at_warmup = list(loads)


async def kill_busiest(
    client: httpx.AsyncClient,
    stubs: list[str],
    processes: list[subprocess.Popen],
    run: Run,
    after_s: float,
    started: float,
) -> None:
    await asyncio.sleep(after_s)
    last = run.samples[-1] if run.samples else [0] * len(processes)
    victim = max(range(len(processes)), key=lambda i: last[i] or 0)
    # What it had in flight (streamed or not) when it died, to read the failover counts.
    run.killed_stats = (await client.get(f"{stubs[victim]}/stats")).json()
    processes[victim].send_signal(signal.SIGKILL)
    run.killed, run.killed_at_s = victim, time.perf_counter() - started


async def drive(
    router: str,
    stubs: list[str],
    calls: list[Call],
    tokens: int,
    warmup_s: float,
    kill: tuple[list[subprocess.Popen], float] | None = None,
) -> Run:
    run = Run()
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    timeout = httpx.Timeout(DRAIN_S, connect=10)
    async with (
        httpx.AsyncClient(base_url=router, limits=limits, timeout=timeout) as client,
        httpx.AsyncClient(timeout=5) as sampler_client,
    ):
        sampler = asyncio.create_task(sample_in_flight(sampler_client, stubs, run))
        warmup = asyncio.create_task(mark_warmup(sampler_client, stubs, run, warmup_s))
        started = time.perf_counter()
        killer = None
        if kill is not None:
            killer = asyncio.create_task(
                kill_busiest(sampler_client, stubs, kill[0], run, kill[1], started)
            )
        tasks = []
        for call in calls:
            delay = call.at - (time.perf_counter() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(client, call, tokens)))
        done, pending = await asyncio.wait(tasks, timeout=DRAIN_S)
        for task in pending:
            task.cancel()
        run.seconds = time.perf_counter() - started
        sampler.cancel()
        warmup.cancel()
        if killer is not None:
            killer.cancel()
        for call, task in zip(calls, tasks, strict=True):
            if task in done:
                run.outcomes.append(task.result())
            else:
                run.outcomes.append(
                    Outcome(call.stream, call.at, error="unfinished after the drain")
                )
        for url in stubs:
            try:
                run.stub_stats.append((await sampler_client.get(f"{url}/stats")).json())
            except httpx.HTTPError:
                run.stub_stats.append(None)
        text = (await client.get("/metrics")).text
        run.router_metrics = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(ROUTER_METRICS)
        }
    return run


def run_scenario(
    work: Path,
    picker: str,
    ports: list[int],
    config: EngineConfig,
    calls: list[Call],
    tokens: int,
    warmup_s: float,
    kill_after_s: float | None = None,
) -> Run:
    """Fresh stub replicas (empty slots) and a fresh router, one picker, one sequence."""
    stubs = start_stubs(ports, config)
    processes = list(stubs)
    try:
        router_port = free_port()
        backends = [f"http://127.0.0.1:{port}" for port in ports]
        processes.append(start_router(router_port, backends, picker, work))
        kill = (stubs, kill_after_s) if kill_after_s is not None else None
        router = f"http://127.0.0.1:{router_port}"
        pids = {"router": processes[-1].pid, "client": os.getpid()}
        before = {name: schedstat(pid) for name, pid in pids.items()}
        run = asyncio.run(drive(router, backends, calls, tokens, warmup_s, kill))
        for name, pid in pids.items():
            (cpu_before, wait_before), (cpu_after, wait_after) = before[name], schedstat(pid)
            run.cpu[name] = {
                "cpu_share": round((cpu_after - cpu_before) / 1e9 / run.seconds, 3),
                "runqueue_wait_ms_per_s": round((wait_after - wait_before) / 1e6 / run.seconds, 1),
            }
        return run
    finally:
        stop(processes)


def schedstat(pid: int) -> tuple[int, int]:
    """(ns on a CPU, ns waiting for one) of a process's main thread, where the router's
    and the load generator's event loops run: the wait says how much a busy machine
    delayed them, which a TTFT measured here includes."""
    on_cpu, waiting, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(on_cpu), int(waiting)


# ---- report -------------------------------------------------------------------------------


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def latency_ms(values: list[float]) -> dict:
    if not values:
        return {}
    return {"p50": ms(percentile(values, 0.5)), "p95": ms(percentile(values, 0.95))}


def summarise(run: Run, warmup_s: float) -> dict:
    """Counts over the whole run; loads also, TTFT and latencies only, over the requests
    sent after the warm-up (the first `warmup_s`, when every adapter is cold everywhere)."""
    outcomes = run.outcomes
    measured = [o for o in outcomes if o.at >= warmup_s]
    ttfts = [o.ttft_s for o in measured if o.stream and o.ttft_s is not None]
    plain = [o.latency_s for o in measured if not o.stream and o.ok and o.latency_s]
    failures = [o for o in outcomes if not o.ok]
    final_loads = [s["loads"] if s else None for s in run.stub_stats]
    live = [s for s in run.stub_stats if s is not None]
    loads_after_warmup = [
        end - start
        for end, start in zip(final_loads, run.loads_at_warmup, strict=True)
        if end is not None and start is not None
    ]
    return {
        "requests": len(outcomes),
        "requests_after_warmup": len(measured),
        "seconds": round(run.seconds, 1),
        "failed": len(failures),
        "failed_non_streamed": sum(not o.stream for o in failures),
        "streams_with_error_event": sum(o.stream and o.error_event for o in outcomes),
        "streams_cut_silently": sum(
            o.stream and o.status == 200 and not o.done and not o.error_event for o in outcomes
        ),
        "failure_examples": sorted({f"{o.status} {o.error[:120]}" for o in failures})[:5],
        "adapter_loads": sum(n for n in final_loads if n is not None),
        "adapter_loads_after_warmup": sum(loads_after_warmup),
        "adapter_loads_per_replica": final_loads,
        "requests_per_replica": [s["requests"] if s else None for s in run.stub_stats],
        "step_time_overshoot": step_overshoot(run.stub_stats),
        "slot_waits": {
            "requests": sum(s["slot_waits"] for s in live),
            "seconds_total": round(sum(s["slot_wait_s_total"] for s in live), 2),
            "seconds_max": max((s["slot_wait_s_max"] for s in live), default=0.0),
        },
        "cpu": run.cpu,
        "ttft_ms": latency_ms(ttfts),
        "non_streamed_latency_ms": latency_ms(plain),
        "router_metrics": run.router_metrics,
    }


def step_overshoot(stub_stats: list[dict | None]) -> float | None:
    """Step time the replicas took / asked for: > 1 when the machine is too busy to wake
    them on time (1.02 on an idle machine)."""
    live = [s for s in stub_stats if s is not None]
    nominal = sum(s["step_s_nominal"] for s in live)
    return round(sum(s["step_s_actual"] for s in live) / nominal, 3) if nominal else None


def balance(run: Run, load_factor: float = 1.25) -> dict:
    """Across the replicas, after the warm-up: max/mean in-flight per sample (samples with
    a mean >= 1), the share of samples above `load_factor` x mean, and above
    `load_factor` x mean + 1 (the picker bounds the count before it adds the request);
    and max/mean of the per-replica averages over the run."""
    samples = [[v or 0 for v in sample] for sample in run.samples[run.samples_before_warmup :]]
    ratios, over_plus_one = [], 0
    for sample in samples:
        mean = sum(sample) / len(sample)
        if mean >= 1:
            ratios.append(max(sample) / mean)
            over_plus_one += max(sample) > load_factor * mean + 1
    if not ratios:
        return {"samples": 0}
    means = [sum(column) / len(column) for column in zip(*samples, strict=True)]
    return {
        "samples": len(ratios),
        "max_over_mean_p50": round(percentile(ratios, 0.5), 3),
        "max_over_mean_p95": round(percentile(ratios, 0.95), 3),
        "max_over_mean_max": round(max(ratios), 3),
        "share_over_bound": round(sum(r > load_factor for r in ratios) / len(ratios), 3),
        "share_over_bound_plus_one": round(over_plus_one / len(ratios), 3),
        "mean_in_flight_per_replica": [round(m, 2) for m in means],
        "run_mean_max_over_mean": round(max(means) / (sum(means) / len(means)), 3),
    }


def reduction(base: float, new: float) -> float:
    return round(100 * (1 - new / base), 1) if base else 0.0


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def table(report: dict) -> str:
    """One Markdown table over the scenarios that ran; fills report["targets"]."""
    targets = report["targets"] = {}
    rows = [
        "| scenario | picker | requests | failed | adapter loads: run / after warm-up | "
        "TTFT p50 / p95 ms | step overshoot | CPU wait ms/s: router / client | "
        "target | value | result |",
        "|---|---|---:|---:|---:|---|---:|---|---|---|---|",
    ]

    def row(name: str, picker: str, summary: dict, target: str, value: str, ok: bool | None):
        ttft = summary.get("ttft_ms") or {}
        ttft_text = f"{ttft['p50']:.0f} / {ttft['p95']:.0f}" if ttft else "-"
        loads = f"{summary['adapter_loads']} / {summary['adapter_loads_after_warmup']}"
        result = "-" if ok is None else verdict(ok)
        cpu = summary.get("cpu") or {}
        wait = " / ".join(
            f"{cpu[name]['runqueue_wait_ms_per_s']:.0f}" if name in cpu else "-"
            for name in ("router", "client")
        )
        rows.append(
            f"| {name} | {picker} | {summary['requests']} | {summary['failed']} | {loads} | "
            f"{ttft_text} | {summary['step_time_overshoot']} | {wait} | {target} | {value} | "
            f"{result} |"
        )

    if "zipf" in report:
        rr, aff = report["zipf"]["round-robin"], report["zipf"]["affinity"]
        loads_cut = reduction(rr["adapter_loads_after_warmup"], aff["adapter_loads_after_warmup"])
        loads_cut_run = reduction(rr["adapter_loads"], aff["adapter_loads"])
        ttft_cut = reduction(rr["ttft_ms"]["p95"], aff["ttft_ms"]["p95"])
        targets |= {
            "loads_reduction_pct_after_warmup": loads_cut,
            "loads_reduction_pct_whole_run": loads_cut_run,
            "ttft_p95_reduction_pct": ttft_cut,
        }
        settings = report["settings"]
        name = f"zipf-{settings['adapters']}, {settings['replicas']} replicas"
        row(name, "round-robin", rr, "baseline", "-", None)
        loads_value = f"{loads_cut:.0f} % (whole run {loads_cut_run:.0f} %)"
        target = "loads after warm-up >= 50 % fewer"
        row(name, "affinity", aff, target, loads_value, loads_cut >= 50)
        row("", "", aff, "TTFT p95 >= 30 % lower", f"{ttft_cut:.0f} %", ttft_cut >= 30)
    if "hot" in report:
        hot = report["hot"]
        bal = hot["balance"]
        targets["hot_max_over_mean_p95"] = bal["max_over_mean_p95"]
        value = (
            f"{bal['max_over_mean_p95']:.2f} (run averages {bal['run_mean_max_over_mean']:.2f}; "
            f"samples over 1.25 x mean + 1: {100 * bal['share_over_bound_plus_one']:.0f} %)"
        )
        ok = bal["max_over_mean_p95"] <= 1.25
        row("hot adapter 50 %", "affinity", hot, "max/mean in-flight p95 <= 1.25", value, ok)
    if "kill" in report:
        kill = report["kill"]
        targets["kill_lost_non_streamed"] = kill["failed_non_streamed"]
        in_flight, streamed = kill["killed_in_flight"], kill["killed_in_flight_streamed"]
        metrics = kill["router_metrics"].items()
        retries = sum(v for k, v in metrics if k.startswith("loraplex_backend_retries_total"))
        value = (
            f"{kill['failed_non_streamed']} (in flight on the killed replica: "
            f"{in_flight - streamed} non-streamed, {streamed} streams; router retries "
            f"{retries:.0f}; "
            f"{kill['streams_with_error_event']} streams ended with an error event, "
            f"{kill['streams_cut_silently']} cut silently)"
        )
        ok = kill["failed_non_streamed"] == 0 and kill["streams_cut_silently"] == 0
        row("kill 1 of 3 replicas", "affinity", kill, "lost non-streamed = 0", value, ok)
    if "picker_speed_us" in report:
        p50 = report["picker_speed_us"]["p50"]
        targets["picker_p50_us"] = p50
        rows.append(
            f"| picker decision, 16 replicas x 1,000 adapters | affinity | - | - | - | - | - | - | "
            f"p50 <= 50 us | {p50:.1f} us | {verdict(p50 <= 50)} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = EngineConfig()
    parser.add_argument(
        "--scenarios",
        default="zipf,hot,kill,speed",
        help="comma-separated: zipf (affinity vs round-robin), hot (one adapter at 50 %%), "
        "kill (SIGKILL one of 3 replicas under load), speed (picker decision time)",
    )
    parser.add_argument("--replicas", type=int, default=4, help="simulated vLLM replicas")
    parser.add_argument("--adapters", type=int, default=64, help="distinct adapters requested")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of popularity")
    parser.add_argument(
        "--utilisation", type=float, default=0.7, help="offered load / the replicas' peak"
    )
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--load-duration", type=float, default=60.0, help="zipf run, per picker")
    parser.add_argument("--hot-duration", type=float, default=45.0, help="hot run, seconds")
    parser.add_argument("--duration", type=float, default=60.0, help="kill scenario")
    parser.add_argument(
        "--warmup", type=float, default=15.0, help="zipf and hot runs: seconds not measured"
    )
    parser.add_argument("--quick", action="store_true", help="15 s runs, for a smoke test")
    parser.add_argument("--seed", type=int, default=1, help="seed of the request sequence")
    parser.add_argument(
        "--max-loras", type=int, default=defaults.max_loras, help="adapter slots per replica"
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=defaults.max_num_seqs, help="sequences per step"
    )
    parser.add_argument("--load-s", type=float, default=defaults.load_s, help="adapter load time")
    parser.add_argument(
        "--step-s", type=float, default=defaults.step_s, help="decode step time, one sequence"
    )
    parser.add_argument(
        "--batch-slowdown",
        type=float,
        default=defaults.batch_slowdown,
        help="step time grows by this factor per extra running sequence",
    )
    parser.add_argument(
        "--load-mode",
        choices=["stall", "request"],
        default=defaults.load_mode,
        help="a load stalls the whole step (as vLLM's worker does) or only its request",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results/scaleout.json"), help="JSON written"
    )
    args = parser.parse_args()
    if args.quick:
        args.load_duration = args.hot_duration = args.duration = 15.0
        args.warmup = 5.0
    scenarios = set(args.scenarios.split(","))

    config = EngineConfig(
        args.max_loras,
        args.max_num_seqs,
        args.load_s,
        args.step_s,
        args.batch_slowdown,
        args.load_mode,
    )
    names = adapter_names(args.adapters)
    rate = request_rate(config, args.replicas, args.tokens, args.utilisation)
    kill_rate = request_rate(config, 2, args.tokens, args.utilisation)
    report: dict = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_before": load_average(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "stub": asdict(config),
        "rate_per_s": {"zipf": round(rate, 2), "hot": round(rate, 2), "kill": round(kill_rate, 2)},
    }
    print(f"request rate {rate:.1f}/s ({args.utilisation:.0%} of {args.replicas} replicas' peak)")
    with tempfile.TemporaryDirectory(prefix="loraplex-scaleout-") as tmp:
        work = Path(tmp)
        make_adapters(work / "adapters", names)
        ports = [free_port() for _ in range(max(3, args.replicas))]
        replicas = ports[: args.replicas]

        if "zipf" in scenarios:
            calls = make_calls(names, rate, args.load_duration, args.seed, args.zipf, 0.0)
            report["zipf"] = {}
            for picker in ("round-robin", "affinity"):
                run = run_scenario(work, picker, replicas, config, calls, args.tokens, args.warmup)
                report["zipf"][picker] = summarise(run, args.warmup) | {"balance": balance(run)}
                print(f"zipf {picker}: {json.dumps(report['zipf'][picker])}", flush=True)

        if "hot" in scenarios:
            calls = make_calls(names, rate, args.hot_duration, args.seed + 1, args.zipf, 0.5)
            run = run_scenario(work, "affinity", replicas, config, calls, args.tokens, args.warmup)
            report["hot"] = summarise(run, args.warmup) | {"balance": balance(run)}
            print(f"hot: {json.dumps(report['hot'])}", flush=True)

        if "kill" in scenarios:
            calls = make_calls(names, kill_rate, args.duration, args.seed + 2, args.zipf, 0.0)
            # Every request of the kill run counts: no warm-up.
            run = run_scenario(
                work, "affinity", ports[:3], config, calls, args.tokens, 0.0, args.duration / 3
            )
            report["kill"] = summarise(run, 0.0) | {
                "killed_replica": run.killed,
                "killed_at_s": None if run.killed_at_s is None else round(run.killed_at_s, 1),
                "killed_in_flight": run.killed_stats and run.killed_stats["in_flight"],
                "killed_in_flight_streamed": run.killed_stats
                and run.killed_stats["in_flight_streamed"],
            }
            print(f"kill: {json.dumps(report['kill'])}", flush=True)

    if "speed" in scenarios:
        calls_timed = 5000 if args.quick else 20000
        speed = measure_picker_speed(16, calls_timed, args.seed)["affinity"]["warm"]
        report["picker_speed_us"] = {"p50": speed["p50_us"], "p95": speed["p95_us"]}
    report["load_average_after"] = load_average()

    print()
    print(table(report))
    print(
        f"\nload average before {report['load_average_before']}, "
        f"after {report['load_average_after']}; {report['machine']['cpu_model']}, "
        f"{report['machine']['cpu_count']} CPUs. Step overshoot: step time the stub replicas "
        "took / asked for (> 1: the machine was too busy to wake them on time). CPU wait: "
        "time the router's and the load generator's event loops waited for a CPU, ms per "
        "second of run (a TTFT measured here includes it)."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
