import pytest

from loraplex.adapters.local_store import LocalAdapterStore
from loraplex.adapters.names import AdapterName, InvalidAdapterName, parse_adapter_name

GOOD = [
    ("demo/alpha", AdapterName("demo", "alpha")),
    ("acme/support-bot_v2.1", AdapterName("acme", "support-bot_v2.1")),
    ("solo", AdapterName(None, "solo")),
]

BAD = [
    ("", "empty"),
    ("..", "'..'"),
    ("demo/..", "'..'"),
    ("../etc/passwd", "'..'"),
    ("a..b/c", "'..'"),
    ("/etc/passwd", "more than one '/'"),
    ("/passwd", "invalid name part ''"),
    ("a/b/c", "more than one '/'"),
    ("demo\\alpha", "backslash"),
    ("demo/al\x00pha", "control characters"),
    ("demo/al\npha", "control characters"),
    ("demo/.hidden", "invalid name part"),
    ("demo/with space", "invalid name part"),
    ("x" * 200, "longer than"),
    ("a" * 65 + "/b", "invalid name part"),
]


@pytest.mark.parametrize(("raw", "expected"), GOOD)
def test_good_names_parse(raw: str, expected: AdapterName) -> None:
    assert parse_adapter_name(raw) == expected
    assert str(expected) == raw


@pytest.mark.parametrize(("raw", "reason"), BAD)
def test_bad_names_are_rejected_with_a_reason(raw: str, reason: str) -> None:
    with pytest.raises(InvalidAdapterName) as info:
        parse_adapter_name(raw)
    assert reason in str(info.value)


def _make_adapter(folder) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")


def test_store_lists_and_finds_adapters(tmp_path) -> None:
    _make_adapter(tmp_path / "acme" / "bot")
    _make_adapter(tmp_path / "solo")
    (tmp_path / "acme" / "not-an-adapter").mkdir()
    store = LocalAdapterStore(tmp_path)
    assert [a.id for a in store.list()] == ["acme/bot", "solo"]
    assert store.get("acme/bot").path == (tmp_path / "acme" / "bot").resolve()
    assert store.get("acme/missing") is None
    assert store.get("acme/not-an-adapter") is None


def test_store_refuses_symlinks_out_of_the_store(tmp_path) -> None:
    outside = tmp_path / "outside"
    _make_adapter(outside)
    root = tmp_path / "store"
    (root / "acme").mkdir(parents=True)
    (root / "acme" / "escape").symlink_to(outside)
    with pytest.raises(InvalidAdapterName, match="outside"):
        LocalAdapterStore(root).get("acme/escape")
