"""Keep `loraplex serve`'s local vLLM engines running: restart the dead, kill the hung.

`EngineSupervisor` owns N `VLLMBackendProcess`es (settings.replicas, ports
backend_port + i) and watches each from its own thread, every ~0.5 s:

- an engine whose process exits is logged at error level (replica, exit code) and
  restarted after a backoff of 1 s doubling up to engine_restart_backoff_max_s; the
  backoff starts again at 1 s once a restarted engine has stayed healthy a while;
- an engine whose process lives but whose /health has failed for longer than a grace
  period after it was healthy (hung, or vLLM's API server outliving its engine core) is
  killed, its whole process group, and restarted the same way;
- a crash loop ends serving: a replica that fails again after engine_crash_loop_restarts
  restarts within engine_crash_loop_window_s is not restarted; `on_fatal` is called, and
  the CLI stops the router and exits non-zero so systemd or Kubernetes sees the failure.
  An engine that fails its very first start (a wrong flag, a missing model) is fatal at
  once, as before supervision: restarting it would only delay the error by minutes.

The router reads `restarting()` (its `EngineWatch`) for /health, and `urls` are the
backends it routes to. Metrics go to the default Prometheus registry, so they appear
on the router's /metrics in the same process.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import httpx
from prometheus_client import Counter, Gauge

from loraplex.serving.vllm_backend import VLLMBackendProcess
from loraplex.settings import ServeSettings

log = logging.getLogger(__name__)

ENGINE_RESTARTS = Counter(
    "loraplex_engine_restarts", "Restarts of a local vLLM engine by the supervisor.", ["replica"]
)
ENGINE_UP = Gauge(
    "loraplex_engine_up", "1 while the local vLLM engine answers /health, else 0.", ["replica"]
)

ReplicaState = Literal["starting", "up", "down", "failed", "stopped"]


@dataclass(frozen=True)
class RestartPolicy:
    """When the supervisor restarts an engine, and when it gives up."""

    backoff_initial_s: float = 1.0
    """Wait before the first restart; doubles with each failure in a row."""
    backoff_max_s: float = 30.0
    """Longest wait before a restart."""
    crash_loop_restarts: int = 5
    """Restarts of one replica allowed within the window; its next failure ends serving."""
    crash_loop_window_s: float = 600.0
    """Window over which restarts count towards a crash loop."""
    stable_after_s: float = 60.0
    """Healthy this long after a restart, the backoff starts again at backoff_initial_s."""
    admission_s: float = 13.0
    """How long after an engine is healthy again the router may still not route to it (it
    re-admits a replica after a few passing probes: readmit_after_successes ×
    health_check_interval_s); `restarting()` stays true meanwhile."""
    unhealthy_grace_s: float = 15.0
    """An engine that was healthy and has failed /health this long is killed. vLLM answers
    /health from its API server's event loop without a round trip to the engine core, so
    even a saturated engine answers within a second; 15 s is far from a false alarm."""
    start_timeout_s: float = 600.0
    """A (re)started engine not healthy by then is killed (a failure like any other)."""
    poll_interval_s: float = 0.5
    """How often each engine's process and /health are checked."""
    health_timeout_s: float = 2.0
    """Timeout of one /health probe."""

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> RestartPolicy:
        # The router's re-admission probes, one probe period of phase, and slack.
        admission_s = (settings.readmit_after_successes + 1) * settings.health_check_interval_s
        return cls(
            backoff_max_s=settings.engine_restart_backoff_max_s,
            admission_s=admission_s + 5.0,
            crash_loop_restarts=settings.engine_crash_loop_restarts,
            crash_loop_window_s=settings.engine_crash_loop_window_s,
            start_timeout_s=settings.backend_start_timeout_s,
        )

    def backoff_s(self, failures_in_a_row: int) -> float:
        """Wait before restarting after the n-th failure in a row (n ≥ 1): 1, 2, 4, ... s."""
        return min(self.backoff_initial_s * 2 ** (failures_in_a_row - 1), self.backoff_max_s)


@dataclass(frozen=True)
class _Failure:
    reason: str
    exit_code: int | None = None
    """The process's exit code (negative: killed by that signal); None if it was alive."""


class _Replica:
    """One engine and what its watcher knows about it."""

    def __init__(self, index: int, engine: VLLMBackendProcess) -> None:
        self.index = index
        self.label = str(index)
        self.engine = engine
        self.state: ReplicaState = "starting"
        self.restarts: deque[float] = deque()  # monotonic times of restarts, for the window
        self.failures_in_a_row = 0
        self.ever_healthy = False
        self.settled = False
        """Healthy for `admission_s` without a failed probe: the router routes to it."""


class EngineSupervisor:
    """Starts, watches and restarts local vLLM engines; stops them all, leaving no process."""

    def __init__(
        self,
        engines: Sequence[VLLMBackendProcess],
        policy: RestartPolicy | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.policy = policy or RestartPolicy()
        self.on_fatal = on_fatal
        self.failure: str | None = None
        """Why supervision gave up (crash loop, failed first start); None while it has not."""
        self._replicas = [_Replica(i, engine) for i, engine in enumerate(engines)]
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        for replica in self._replicas:
            ENGINE_UP.labels(replica.label).set(0)
            ENGINE_RESTARTS.labels(replica.label)  # the series exists from the start, at 0

    @classmethod
    def from_settings(
        cls, settings: ServeSettings, on_fatal: Callable[[str], None] | None = None
    ) -> EngineSupervisor:
        engines = [
            VLLMBackendProcess.for_replica(settings, i, settings.replicas)
            for i in range(settings.replicas)
        ]
        return cls(engines, RestartPolicy.from_settings(settings), on_fatal)

    @property
    def urls(self) -> list[str]:
        return [replica.engine.url for replica in self._replicas]

    def states(self) -> list[ReplicaState]:
        return [replica.state for replica in self._replicas]

    def restarting(self) -> bool:
        """An engine is on its way (back) to serving: being started or restarted, healthy
        again so recently that the router may not route to it yet, failing /health (to be
        restarted unless it recovers), or exited a moment ago (its watcher polls every
        ~0.5 s). The router's EngineWatch: its /health fails only when none is."""
        return any(
            replica.state in ("starting", "down")
            or (
                replica.state == "up" and (not replica.settled or replica.engine.poll() is not None)
            )
            for replica in self._replicas
        )

    def start(self) -> None:
        """Start every engine, each from the thread that then watches it for its whole life
        (the engine's parent-death signal is tied to the thread that started it)."""
        for replica in self._replicas:
            thread = threading.Thread(
                target=self._watch, args=(replica,), name=f"engine-{replica.label}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def wait_until_any_up(self, timeout_s: float) -> None:
        """Block until one engine answers /health; RuntimeError on failure or timeout."""
        deadline = time.monotonic() + timeout_s
        while not any(replica.state == "up" for replica in self._replicas):
            if self.failure is not None:
                raise RuntimeError(self.failure)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no vLLM backend healthy after {timeout_s:.0f} s")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop every engine (SIGTERM to its process group, then SIGKILL) and the watchers."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self._threads.clear()

    # -- one thread per replica -------------------------------------------------------

    def _watch(self, replica: _Replica) -> None:
        with httpx.Client(timeout=self.policy.health_timeout_s) as client:
            try:
                while not self._stopping.is_set():
                    replica.state, replica.settled = "starting", False
                    replica.engine.start()
                    failure = self._run(replica, client)
                    if failure is None:  # stopping
                        break
                    if not self._recover(replica, failure):
                        break
            finally:
                replica.engine.stop()
                ENGINE_UP.labels(replica.label).set(0)
                if replica.state != "failed":
                    replica.state = "stopped"

    def _run(self, replica: _Replica, client: httpx.Client) -> _Failure | None:
        """Watch a started engine until it fails (returns why) or serving stops (None)."""
        policy = self.policy
        started_at = time.monotonic()
        healthy_since: float | None = None
        failing_since: float | None = None
        while not self._stopping.wait(policy.poll_interval_s):
            exit_code = replica.engine.poll()
            if exit_code is not None:
                replica.settled = False
                return _Failure(f"exited with {_exit_text(exit_code)}", exit_code)
            now = time.monotonic()
            if replica.engine.is_healthy(client):
                failing_since = None
                if replica.state != "up":
                    replica.state, replica.ever_healthy = "up", True
                    ENGINE_UP.labels(replica.label).set(1)
                    log.info(
                        "vLLM engine up",
                        extra={"replica": replica.label, "url": replica.engine.url},
                    )
                healthy_since = healthy_since or now
                replica.settled = now - healthy_since >= policy.admission_s
                if now - healthy_since >= policy.stable_after_s:
                    replica.failures_in_a_row = 0
            elif replica.state == "up":
                replica.settled, healthy_since = False, None
                failing_since = failing_since or now
                if now - failing_since > policy.unhealthy_grace_s:
                    return _Failure(f"alive but failing /health for {now - failing_since:.1f} s")
            elif now - started_at > policy.start_timeout_s:
                return _Failure(f"not healthy {policy.start_timeout_s:.0f} s after start")
        return None

    def _recover(self, replica: _Replica, failure: _Failure) -> bool:
        """Clean up a failed engine and wait out its backoff; False when serving must end."""
        replica.engine.kill()  # the whole group: a hung server, an orphaned engine core
        ENGINE_UP.labels(replica.label).set(0)
        policy = self.policy
        now = time.monotonic()
        while replica.restarts and now - replica.restarts[0] > policy.crash_loop_window_s:
            replica.restarts.popleft()
        if not replica.ever_healthy:
            return self._give_up(
                replica, f"vLLM engine {replica.label} failed to start: {failure.reason}"
            )
        if len(replica.restarts) >= policy.crash_loop_restarts:
            return self._give_up(
                replica,
                f"vLLM engine {replica.label} crash loop: {failure.reason} after "
                f"{len(replica.restarts)} restarts within {policy.crash_loop_window_s:.0f} s",
            )
        replica.state = "down"
        replica.failures_in_a_row += 1
        delay = policy.backoff_s(replica.failures_in_a_row)
        log.error(
            "vLLM engine %s; restarting it",
            failure.reason,
            extra={
                "replica": replica.label,
                "url": replica.engine.url,
                "exit_code": failure.exit_code,
                "restart_in_s": delay,
            },
        )
        if self._stopping.wait(delay):
            return False
        replica.restarts.append(time.monotonic())
        ENGINE_RESTARTS.labels(replica.label).inc()
        return True

    def _give_up(self, replica: _Replica, reason: str) -> bool:
        replica.state = "failed"
        log.error("%s; giving up", reason, extra={"replica": replica.label})
        if self.failure is None:
            self.failure = reason
            if self.on_fatal is not None:
                self.on_fatal(reason)
        return False


def _exit_text(code: int) -> str:
    """`code 1`, or `signal SIGKILL` for a process killed by a signal (negative code)."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
