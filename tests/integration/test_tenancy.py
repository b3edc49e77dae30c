"""Tenants, keys, quotas and metrics end to end: a second router process (`loraplex serve
--backend-url`) with its own database in front of the session's real vLLM engine, tenants
and keys made with the `loraplex` CLI, and a real Prometheus server scraping it."""

from __future__ import annotations

import contextlib
import json
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import BASE_NAME, Server, free_port, router_in_front_of

pytestmark = pytest.mark.integration

ADMIN_KEY = "lpx_admin-key-for-the-tenancy-tests-0123456789"
QUESTION = [{"role": "user", "content": "Name a colour."}]
HOLD_A_STREAM = Path(__file__).with_name("hold_a_stream.py")
# Adapters as tenants own them: copies of the session's demo adapters.
ADAPTERS = {"acme/alpha": "demo/alpha", "globex/beta": "demo/beta", "public/shared": "demo/alpha"}


@dataclass
class TenantRouter:
    url: str
    database_url: str
    log_path: Path
    process: subprocess.Popen
    keys: dict[str, str] = field(default_factory=dict)
    """Every raw key the tests created, by a short name; none may ever reach the log."""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "loraplex.cli", *args, "--database-url", self.database_url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def new_key(self, name: str, tenant: str, *extra: str) -> str:
        key = self.cli("keys", "create", "--tenant", tenant, *extra).stdout.strip()
        self.keys[name] = key
        return key

    def key(self, tenant: str) -> str:
        """A (cached) key of `tenant`."""
        return self.keys.get(tenant) or self.new_key(tenant, tenant)

    def post(
        self,
        key: str | None,
        model: str,
        *,
        timeout: float = 120,
        extensions: dict | None = None,
        **body: object,
    ) -> httpx.Response:
        """A chat completion (one token unless `body` says otherwise); `extensions` are
        httpx's (a `trace` hook, for one)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        payload = {"model": model, "messages": QUESTION, "max_tokens": 1, **body}
        with httpx.Client(timeout=timeout) as client:
            return client.post(
                f"{self.url}/v1/chat/completions",
                json=payload,
                headers=headers,
                extensions=extensions,
            )

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def router(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantRouter]:
    root = tmp_path_factory.mktemp("tenancy")
    adapters_dir = root / "adapters"
    for name, source in ADAPTERS.items():
        shutil.copytree(server.adapters_dir / source, adapters_dir / name)
        # The engine's resolver loads local adapters from its own folder, which an external
        # engine shares with its routers (docs/serving.md): put them there too.
        # Other modules put the same adapter there under the same name (public/shared).
        shutil.copytree(
            server.adapters_dir / source, server.adapters_dir / name, dirs_exist_ok=True
        )
    database_url = f"sqlite:///{root}/loraplex.db"
    router = TenantRouter("", database_url, root / "router.log", None)  # type: ignore[arg-type]
    for tenant in ("acme", "globex", "limited", "metrics"):
        router.cli("tenants", "create", tenant)
    admin = {"LORAPLEX_ADMIN_KEY": ADMIN_KEY}
    flags = ("--log-level", "debug")
    with router_in_front_of(server, root, database_url, adapters_dir, admin, flags) as started:
        router.url, router.process, _ = started
        yield router


def _error(response: httpx.Response) -> tuple[int, str, str | None]:
    error = response.json()["error"]
    return response.status_code, error["type"], error["code"]


def test_auth_matrix(router: TenantRouter) -> None:
    acme = router.key("acme")
    revoked = router.new_key("revoked", "acme")
    expiring = router.new_key("expiring", "acme", "--expires", "8s")
    expired_by = time.time() + 8.2  # the CLI computed the expiry before it returned
    assert router.post(expiring, BASE_NAME).status_code == 200
    prefix = revoked[:12]
    listed = router.cli("keys", "list", "--tenant", "acme", "--json").stdout
    assert prefix in listed and revoked not in listed  # only the prefix is ever listed
    assert router.post(revoked, BASE_NAME).status_code == 200
    router.cli("keys", "revoke", prefix)  # takes effect without restarting the router

    unauthorized = (401, "authentication_error", "invalid_api_key")
    assert _error(router.post(None, BASE_NAME)) == unauthorized
    assert _error(router.post("lpx_not-a-key", BASE_NAME)) == unauthorized
    # Revoked and expired keys answer exactly like unknown ones (no oracle on leaked keys).
    unknown = router.post("lpx_not-a-key", BASE_NAME).json()
    assert router.post(revoked, BASE_NAME).json() == unknown
    time.sleep(max(0.0, expired_by - time.time()))
    assert router.post(expiring, BASE_NAME).json() == unknown

    # Another tenant's adapter answers exactly like a missing one.
    foreign, missing = router.post(acme, "globex/beta"), router.post(acme, "acme/missing")
    assert _error(foreign) == _error(missing) == (404, "invalid_request_error", "model_not_found")
    assert foreign.json()["error"]["message"] == missing.json()["error"]["message"].replace(
        "acme/missing", "globex/beta"
    )
    for model in (BASE_NAME, "public/shared", "acme/alpha"):
        assert router.post(acme, model).status_code == 200, model

    for method, path in [("GET", "/admin/tenants"), ("POST", "/admin/keys")]:
        as_tenant = httpx.request(
            method,
            router.url + path,
            json={"tenant": "acme"},
            headers={"Authorization": f"Bearer {acme}"},
        )
        assert _error(as_tenant) == (403, "permission_error", "admin_required")
        assert _error(httpx.request(method, router.url + path, json={})) == unauthorized


def test_openai_client_sees_own_and_shared_models_only(router: TenantRouter) -> None:
    acme = router.client(router.new_key("acme-models", "acme"))
    globex = router.client(router.new_key("globex-models", "globex"))
    assert {m.id for m in acme.models.list()} == {BASE_NAME, "acme/alpha", "public/shared"}
    assert {m.id for m in globex.models.list()} == {BASE_NAME, "globex/beta", "public/shared"}
    admin = router.client(ADMIN_KEY)
    assert {m.id for m in admin.models.list()} == {BASE_NAME, *ADAPTERS}
    with pytest.raises(openai.NotFoundError):
        acme.chat.completions.create(model="globex/beta", messages=QUESTION, max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        router.client("lpx_wrong").models.list()
    answer = globex.chat.completions.create(model="globex/beta", messages=QUESTION, max_tokens=4)
    assert answer.choices[0].message.content


def test_admin_api_manages_tenants_and_keys(router: TenantRouter) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (
        httpx.post(
            f"{router.url}/admin/tenants", json={"name": "initech"}, headers=admin
        ).status_code
        == 201
    )
    duplicate = httpx.post(f"{router.url}/admin/tenants", json={"name": "initech"}, headers=admin)
    assert duplicate.status_code == 409 and duplicate.json()["error"]["param"] == "tenant"
    created = httpx.post(
        f"{router.url}/admin/keys", json={"tenant": "initech", "expires": "1h"}, headers=admin
    ).json()
    router.keys["initech"] = created["key"]
    assert router.post(created["key"], BASE_NAME).status_code == 200
    keys = httpx.get(f"{router.url}/admin/keys?tenant=initech", headers=admin).json()["data"]
    assert [k["prefix"] for k in keys] == [created["prefix"]] and "key" not in keys[0]
    revoked = httpx.delete(f"{router.url}/admin/keys/{created['prefix']}", headers=admin)
    assert revoked.json()["status"] == "revoked"
    assert router.post(created["key"], BASE_NAME).status_code == 401
    bad = httpx.put(
        f"{router.url}/admin/quotas",
        json={"tenant": "initech", "requests_per_minute": 0},
        headers=admin,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "requests_per_minute"
    assert httpx.delete(f"{router.url}/admin/tenants/initech", headers=admin).status_code == 200
    assert "initech" not in router.cli("tenants", "list").stdout


def _until_429(
    router: TenantRouter, key: str, model: str, limit: int
) -> tuple[int, httpx.Response]:
    for sent in range(limit + 5):
        response = router.post(key, model)
        if response.status_code == 429:
            return sent, response
        assert response.status_code == 200, response.text
    raise AssertionError("no 429")


def test_requests_per_minute_quota(router: TenantRouter) -> None:
    limited = router.new_key("limited-rpm", "limited")
    other = router.new_key("acme-rpm", "acme")
    router.cli("quotas", "set", "--tenant", "limited", "--requests-per-minute", "12")
    try:
        started = time.monotonic()
        passed, refused = _until_429(router, limited, BASE_NAME, 12)
        # A burst of 12, plus one more for every 5 s the burst took (continuous refill).
        assert 12 <= passed <= 12 + (time.monotonic() - started) // 5
        assert _error(refused) == (429, "rate_limit_error", "rate_limit_exceeded")
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= 5  # one request's worth refills in 60/12 s
        assert router.post(other, BASE_NAME).status_code == 200  # other tenants unaffected
        time.sleep(retry_after)
        assert router.post(limited, BASE_NAME).status_code == 200  # the limit resets
    finally:
        router.cli("quotas", "delete", "--tenant", "limited")


def test_per_adapter_quota_leaves_other_models_alone(router: TenantRouter) -> None:
    limited = router.new_key("limited-adapter", "limited")
    router.cli(
        "quotas",
        "set",
        "--tenant",
        "limited",
        "--adapter",
        "public/shared",
        "--requests-per-minute",
        "1",
    )
    try:
        assert router.post(limited, "public/shared").status_code == 200
        assert router.post(limited, "public/shared").status_code == 429
        assert router.post(limited, BASE_NAME).status_code == 200
    finally:
        router.cli("quotas", "delete", "--tenant", "limited", "--adapter", "public/shared")


def test_concurrency_quota(router: TenantRouter, tmp_path: Path) -> None:
    limited = router.new_key("limited-conc", "limited")
    router.cli("quotas", "set", "--tenant", "limited", "--max-concurrent", "1")
    try:
        long_stream = {
            "model": BASE_NAME,
            "messages": QUESTION,
            "max_tokens": 1500,
            "stream": True,
            "ignore_eos": True,
        }
        stream_file = tmp_path / "stream.txt"
        holder = subprocess.Popen(
            [
                sys.executable,
                str(HOLD_A_STREAM),
                router.url,
                limited,
                json.dumps(long_stream),
                str(stream_file),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            status = _first_line(holder, timeout_s=120)
            assert status == "200", f"the stream got {status!r} ({_stuck_report(router, holder)})"
            # The stream holds the tenant's one slot: a second request is refused at once.
            refused, took = _traced_post(router, limited, BASE_NAME, timeout_s=30)
            if holder.poll() is not None or refused is None or took.seconds >= 10:
                raise AssertionError(
                    f"the refusal did not come at once while the stream ran: {took}; "
                    f"answer: {'none' if refused is None else refused.text[:300]}; "
                    f"{_stuck_report(router, holder, stream_file)}"
                )
            assert _error(refused) == (429, "rate_limit_error", "rate_limit_exceeded"), refused.text
            assert "Concurrency" in refused.json()["error"]["message"]
            assert int(refused.headers["retry-after"]) >= 1
            assert router.post(router.key("acme"), BASE_NAME).status_code == 200
        finally:
            holder.kill()  # the client goes away: its connection closes
            holder.communicate(timeout=60)
        # The slot is released when the stream ends (here: the client closed it).
        deadline = time.monotonic() + 10
        while (response := router.post(limited, BASE_NAME)).status_code == 429:
            assert time.monotonic() < deadline, "the concurrency slot was never released"
            time.sleep(0.2)
        assert response.status_code == 200
    finally:
        router.cli("quotas", "delete", "--tenant", "limited")


@dataclass
class _Took:
    seconds: float
    events: list[tuple[float, str]]

    def __str__(self) -> str:
        steps = ", ".join(f"{name} at {at:.3f} s" for at, name in self.events)
        return f"{self.seconds:.2f} s ({steps})"


def _traced_post(
    router: TenantRouter, key: str, model: str, timeout_s: float
) -> tuple[httpx.Response | None, _Took]:
    """`router.post` that also says when each step of the exchange happened (connect,
    request sent, answer's head): None for the answer when it timed out."""
    took = _Took(0.0, [])
    started = time.monotonic()

    def trace(name: str, _info: dict) -> None:
        took.events.append((time.monotonic() - started, name))

    response: httpx.Response | None = None
    with contextlib.suppress(httpx.TimeoutException):
        response = router.post(key, model, timeout=timeout_s, extensions={"trace": trace})
    took.seconds = time.monotonic() - started
    return response, took


def _first_line(process: subprocess.Popen, timeout_s: float) -> str:
    # A selector rather than select.select: a long session may hold fds past 1024.
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
        assert selector.select(timeout_s), f"no answer within {timeout_s} s"
    return process.stdout.readline().strip()  # type: ignore[union-attr]


def _stuck_report(
    router: TenantRouter, holder: subprocess.Popen, stream_file: Path | None = None
) -> str:
    """What a stuck exchange leaves to see: the stream's state, the router's sockets and
    threads (where `ss` and py-spy are installed), and its log."""
    port = router.url.rsplit(":", 1)[1]
    tools = {
        "sockets": ["ss", "-tnpi", f"( sport = :{port} or dport = :{port} )"],
        "router threads": [
            str(Path(sys.executable).with_name("py-spy")),
            "dump",
            "--pid",
            str(router.process.pid),
        ],
    }
    seen = []
    for what, command in tools.items():
        if shutil.which(command[0]):
            ran = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
            seen.append(f"{what}:\n{ran.stdout}{ran.stderr}")
    received = stream_file.read_bytes() if stream_file and stream_file.exists() else b""
    state = "running" if holder.poll() is None else f"exited {holder.returncode}"
    return (
        f"stream holder {state}, {len(received)} bytes received, ending "
        f"{received[-300:].decode(errors='replace')!r}; " + "\n".join(seen) + "\nrouter log:\n"
        f"{router.log_path.read_text()[-3000:]}"
    )


def test_tokens_per_minute_quota(router: TenantRouter) -> None:
    limited = router.new_key("limited-tpm", "limited")
    router.cli("quotas", "set", "--tenant", "limited", "--tokens-per-minute", "20")
    try:
        first = router.post(limited, BASE_NAME, max_tokens=8)
        assert first.status_code == 200
        assert first.json()["usage"]["total_tokens"] > 20  # the prompt alone is longer
        refused = router.post(limited, BASE_NAME)
        assert _error(refused) == (429, "rate_limit_error", "rate_limit_exceeded")
        assert "tokens per minute" in refused.json()["error"]["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 300
        assert router.post(router.key("acme"), BASE_NAME).status_code == 200
    finally:
        router.cli("quotas", "delete", "--tenant", "limited")


@pytest.fixture
def prometheus(router: TenantRouter, tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run `make services` (Debian package)")
    target = router.url.removeprefix("http://")
    # The router's metrics need the admin key (as deploy/prometheus/prometheus.yml sends it);
    # the job without it shows they are not open.
    (tmp_path / "admin-key").write_text(ADMIN_KEY + "\n")
    auth = f"    authorization: {{type: Bearer, credentials_file: '{tmp_path / 'admin-key'}'}}\n"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: loraplex\n    static_configs: [{{targets: ['{target}']}}]\n{auth}"
        f"  - job_name: vllm\n    metrics_path: /metrics/backend\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n{auth}"
        f"  - job_name: no-key\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _query(prometheus: str, promql: str) -> float | None:
    result = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}).json()
    assert result["status"] == "success", result
    vector = result["data"]["result"]
    return float(vector[0]["value"][1]) if vector else None


def test_prometheus_scrapes_per_adapter_requests_tokens_and_ttft(
    router: TenantRouter, prometheus: str
) -> None:
    client = router.client(router.new_key("metrics", "metrics"))
    # ignore_eos: every answer is exactly max_tokens long, so token counts are known.
    args = {
        "model": "public/shared",
        "messages": QUESTION,
        "max_tokens": 8,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    prompt_tokens = 0
    for _ in range(3):
        usage = client.chat.completions.create(**args).usage
        assert usage is not None and usage.completion_tokens == 8
        prompt_tokens += usage.prompt_tokens
    per_prompt = prompt_tokens // 3
    # A stream whose client asked for usage gets it; one that did not gets no usage chunk.
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == per_prompt
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert all(chunk.usage is None for chunk in chunks) and all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks)

    selector = '{adapter="public/shared",tenant="metrics"}'
    expected = {
        'sum(loraplex_requests_total{adapter="public/shared",tenant="metrics",status="200"})': 5,
        f"sum(loraplex_prompt_tokens_total{selector})": 5 * per_prompt,
        f"sum(loraplex_completion_tokens_total{selector})": 5 * 8,
        f"sum(loraplex_time_to_first_token_seconds_count{selector})": 2,
        f"sum(loraplex_time_per_output_token_seconds_count{selector})": 2,
        f"sum(loraplex_request_duration_seconds_count{selector})": 5,
        'loraplex_backend_up{job="loraplex"}': 1,
        # The vLLM backend's own metrics are scraped through the router too; without the
        # admin key, no metrics. Each job's first scrape comes up to one interval after
        # Prometheus starts, so they are awaited with the rest.
        'up{job="vllm"}': 1,
        'up{job="no-key"}': 0,
    }
    deadline = time.monotonic() + 30
    while True:
        got = {promql: _query(prometheus, promql) for promql in expected}
        if got == expected:
            break
        assert time.monotonic() < deadline, f"Prometheus has {got}, expected {expected}"
        time.sleep(1)
    assert _query(prometheus, 'count({job="vllm", __name__=~"vllm:.*"})')


def test_logs_carry_request_id_and_tenant_but_never_keys(router: TenantRouter) -> None:
    acme = router.key("acme")
    response = router.post(acme, "acme/alpha", max_tokens=2)
    request_id = response.headers["x-request-id"]
    time.sleep(0.5)
    lines = [
        json.loads(line)
        for line in router.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    entry = next(line for line in lines if line.get("request_id") == request_id)
    assert entry["tenant"] == "acme" and entry["model"] == "acme/alpha"
    assert entry["key_prefix"] == acme[:12] and entry["status"] == 200
    text = router.log_path.read_text()
    assert "serving WITHOUT API keys" not in text
    leaked = [name for name, key in {**router.keys, "admin": ADMIN_KEY}.items() if key in text]
    assert not leaked, f"keys found in the router log: {leaked}"
    assert "Name a colour" not in text  # nor the prompt
