"""Where the router's CPU goes per request: py-spy on `loraplex serve` under the stub load.

The router runs in front of the instant stub backend (bench/stub_backend.py, as
`router_overhead.py --stub-only` does), so every CPU sample of the router process is the
router's own work. For base-model requests, then adapter requests (`demo/alpha`), it sends
N sequential 1-token completions and meanwhile

- reads the router process's CPU time (/proc/<pid>/stat) before and after: CPU per request;
- samples it with `py-spy record --nonblocking` (the process is never paused) and splits
  the samples: by loraplex module on the stack (inclusive: a sample in the catalog query
  counts for the resolver and for the catalog), by the library running at the leaf
  (exclusive, sums to 100 %), and the top leaf functions.

Needs py-spy (`.venv/bin/pip install py-spy`) and ptrace rights on the router (root, or
kernel.yama.ptrace_scope=0). Writes bench/results/router_profile.json (with the collapsed
stacks' top entries) and prints the tables.

Usage: python bench/router_profile.py [--requests 2000] [--rate 1000]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_common import free_port, machine, percentile, serve_command, wait_ready, write_report

from loraplex.base_model import pull_embedded_model
from loraplex.training.demo_adapters import ensure_demo_adapters

BENCH = Path(__file__).resolve().parent
BASE_NAME = "SmolLM2-135M-Instruct"
# Inclusive view: a sample counts for every one of these whose file is on its stack.
COMPONENTS = {
    "request log middleware": "router/request_log.py",
    "body limit middleware": "router/body_limit.py",
    "tenancy guard (middleware)": "router/tenancy/guard.py",
    "  auth (key lookup)": "router/tenancy/auth.py",
    "  quotas": "router/tenancy/quotas.py",
    "  request metrics": "router/tenancy/request_metrics.py",
    "body parse (protocol)": "router/protocol.py",
    "route handler (app.forward)": "router/app.py",
    "  adapter resolve": "router/adapter_loading.py",
    "    catalog query": "adapters/catalog.py",
    "  model rewrite": "router/model_rewrite.py",
    "  forwarder (pick, send, relay)": "router/forwarding.py",
    "    backend pool / client": "router/backend_",
}
# Exclusive view: the leaf frame's file decides (first match wins).
# Exclusive view: the deepest Python frame's file decides (first match wins); py-spy names
# files from their package folder (`sqlalchemy/engine/base.py`).
LIBRARIES = (
    ("sqlalchemy", "sqlalchemy/"),
    ("httpx/httpcore (to backend)", "httpx/"),
    ("httpx/httpcore (to backend)", "httpcore/"),
    ("router's engine client (to backend)", "router/backend_client.py"),
    ("anyio (threadpool, streams)", "anyio/"),
    ("uvicorn (HTTP server)", "uvicorn/"),
    ("starlette/fastapi", "starlette/"),
    ("starlette/fastapi", "fastapi/"),
    ("pydantic", "pydantic"),
    ("prometheus_client", "prometheus_client/"),
    ("json", "json/"),
    ("logging", "logging/"),
    ("threading (threadpool hand-off)", "threading.py"),
    ("threading (threadpool hand-off)", "queue.py"),
    ("asyncio / uvloop event loop", "asyncio/"),
    ("loraplex", "router/"),
    ("loraplex", "adapters/"),
    ("loraplex", "loraplex/"),
)
# A sample whose leaf is one of these waits (idle), it does not run.
IDLE_LEAVES = ("epoll_wait", "epoll_pwait", "poll", "select", "futex", "pthread_cond")
IDLE_LEAVES += ("sem_wait", "sem_timedwait", "nanosleep", "accept", "lll_lock_wait")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process, all threads (clock ticks → seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_raw(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    """py-spy's raw (collapsed) output: [(frames root→leaf as (function, file)), count]."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = []
        for frame in stack.split(";"):
            match = FRAME.match(frame)
            if match:
                frames.append((match["func"], match["file"]))
        if frames and count.isdigit():
            stacks.append((frames, int(count)))
    return stacks


# Python calls that block (a threadpool worker waiting for work): their native leaf is a
# futex call py-spy may not name.
IDLE_CALLS = ("Condition.wait", "Event.wait", "Queue.get", "select (selectors.py)")


def idle(frames: list[tuple[str, str]]) -> bool:
    if any(name in frames[-1][0] for name in IDLE_LEAVES):
        return True
    func, file = next(((f, p) for f, p in reversed(frames) if p.endswith(".py")), ("", ""))
    return any(call in f"{func} ({file})" for call in IDLE_CALLS)


def summarize(all_stacks: list[tuple[list[tuple[str, str]], int]]) -> dict:
    """Shares of the samples where the router ran (not waited)."""
    stacks = [(frames, count) for frames, count in all_stacks if not idle(frames)]
    waiting = sum(count for frames, count in all_stacks if idle(frames))
    total = sum(count for _, count in stacks) or 1
    components = {
        name: sum(c for frames, c in stacks if any(marker in f for _, f in frames)) / total
        for name, marker in COMPONENTS.items()
    }
    libraries: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        func, file = frames[-1]
        python_file = next((f for _, f in reversed(frames) if f.endswith(".py")), "")
        library = next((name for name, marker in LIBRARIES if marker in python_file), "other")
        libraries[library] += count
        leaves[f"{func} ({file.rsplit('site-packages/', 1)[-1]})"] += count
    # Loopback writes run the receiving side's TCP work too: what fewer writes would save.
    writes = sum(c for frames, c in stacks if frames[-1][0] in ("write", "writev", "send"))
    return {
        "samples": total,
        "idle_samples": waiting,
        "write_syscall_share": writes / total,
        "components": components,
        "libraries": {k: v / total for k, v in libraries.most_common()},
        "top_leaves": {k: v / total for k, v in leaves.most_common(15)},
    }


def profile_requests(pid: int, url: str, model: str, args: argparse.Namespace, out: Path) -> dict:
    body = {"model": model, "prompt": "Hi", "max_tokens": 1}
    latencies = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(100):  # warm: imports, caches, pools
            client.post("/v1/completions", json=body).raise_for_status()
        spy_command = [args.py_spy, "record", "--pid", str(pid), "--rate", str(args.rate)]
        # Native frames and idle samples too: the event loop (uvloop) is C, and only its
        # leaf frame (epoll_wait, a futex) tells a waiting thread from a working one.
        spy_command += ["--native", "--idle", "--format", "raw", "--output", str(out)]
        spy = subprocess.Popen(spy_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attached
        before = cpu_seconds(pid)
        for _ in range(args.requests):
            started = time.perf_counter()
            client.post("/v1/completions", json=body).raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
        cpu = cpu_seconds(pid) - before
    spy.send_signal(signal.SIGINT)
    spy.wait(timeout=60)
    return {
        "model": model,
        "requests": args.requests,
        "router_cpu_ms_per_request": cpu * 1000 / args.requests,
        "client_latency_ms_p50": percentile(latencies, 0.5),
        **summarize(parse_raw(out)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=2000, help="sequential, per model")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "router_profile.json")
    args = parser.parse_args()
    args.py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    adapters_dir = Path(
        os.environ.get("LORAPLEX_ADAPTERS_DIR", Path.home() / ".cache/loraplex/bench-adapters")
    )
    ensure_demo_adapters(pull_embedded_model(), adapters_dir)
    results = []
    with tempfile.TemporaryDirectory(prefix="router-profile-") as folder:
        work = Path(folder)
        stub_port, port = free_port(), free_port()
        stub, router = f"http://127.0.0.1:{stub_port}", f"http://127.0.0.1:{port}"
        processes = [
            subprocess.Popen([sys.executable, str(BENCH / "stub_backend.py"), str(stub_port)])
        ]
        try:
            if not wait_ready(stub, processes[0], "/health"):
                raise RuntimeError("stub backend failed to start")
            command = serve_command(
                port, "--backend-url", stub, "--base-model", "unused", "--log-level", "warning"
            )
            env = dict(
                os.environ,
                LORAPLEX_ADAPTERS_DIR=str(adapters_dir),
                LORAPLEX_DATABASE_URL=f"sqlite:///{work}/profile.db",
                LORAPLEX_REGISTRY_STORE=str(work / "store"),
                LORAPLEX_REGISTRY_CACHE_DIR=str(work / "registry-cache"),
            )
            processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL))
            if not wait_ready(router, processes[1]):
                raise RuntimeError("router failed to start")
            for label, model in (("base", BASE_NAME), ("adapter", "demo/alpha")):
                result = profile_requests(processes[1].pid, router, model, args, work / label)
                results.append({"label": label, **result})
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
    for r in results:
        cpu = r["router_cpu_ms_per_request"]
        print(
            f"\n{r['label']} ({r['model']}): router CPU {cpu:.2f} ms per request, client p50 "
            f"{r['client_latency_ms_p50']:.2f} ms, {r['samples']} samples"
        )
        print("  on the stack (inclusive)         share   ms/request")
        for name, share in r["components"].items():
            print(f"  {name:<32}{share:>6.1%}{share * cpu:>10.3f}")
        share = r["write_syscall_share"]
        print(f"  {'write(2) system calls (leaf)':<32}{share:>6.1%}{share * cpu:>10.3f}")
        print("  running at the leaf (exclusive)  share   ms/request")
        for name, share in r["libraries"].items():
            print(f"  {name:<32}{share:>6.1%}{share * cpu:>10.3f}")
        print("  top leaf functions")
        for name, share in list(r["top_leaves"].items())[:10]:
            print(f"  {share:>6.1%}  {name[:100]}")
    report = {
        "command": "python bench/router_profile.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "load_average_1m": os.getloadavg()[0],
        "results": results,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
