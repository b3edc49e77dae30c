"""Every presented key that cannot be used gets the same answer (issue 12, item 8).

Saying "revoked" or "expired", or echoing the key's prefix, would tell whoever holds a
leaked key that it was once real; the router answers each bad key alike.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loraplex.router.app import create_app
from loraplex.settings import ServeSettings
from tests.unit.tenancy_helpers import Clock, migrated_store


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_every_bad_key_gets_the_same_401(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    clock.now = time.time() - 3600  # keys made "an hour ago": one expired half an hour ago
    store = migrated_store(database_url, clock)
    store.create_tenant("acme")
    good, _ = store.create_key("acme")
    revoked, revoked_info = store.create_key("acme")
    store.revoke_key(revoked_info.prefix)
    expired, _ = store.create_key("acme", expires_at=clock.now + 1800)
    bad_keys = {
        "unknown": "lpx_" + "A" * 43,
        "wrong": good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB"),  # real prefix
        "revoked": revoked,
        "expired": expired,
        "not a loraplex key": "sk-something-else",
    }
    settings = ServeSettings(
        adapters_dir=tmp_path / "adapters", base_model_name="base", database_url=database_url
    )
    app = create_app(settings, f"http://127.0.0.1:{_closed_port()}")
    caplog.set_level("INFO", logger="loraplex.router.tenancy.auth")
    with TestClient(app) as client:
        answers = {}
        for kind, key in bad_keys.items():
            response = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            answers[kind] = (
                response.status_code,
                response.json()["error"]["type"],
                response.json()["error"]["code"],
                response.json()["error"]["message"],
            )
            assert key[:12] not in response.text  # neither the key nor its prefix
        accepted = client.get("/v1/models", headers={"Authorization": f"Bearer {good}"})
    assert set(answers.values()) == {
        (401, "authentication_error", "invalid_api_key", "Invalid API key.")
    }, answers
    assert accepted.status_code == 200
    # The operator still learns why, from the router's log.
    reasons = [getattr(r, "reason", "") for r in caplog.records if r.msg == "API key rejected"]
    assert any("revoked" in reason for reason in reasons)
    assert any("expired" in reason for reason in reasons)
