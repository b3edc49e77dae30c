import json

from loraplex.base_model import (
    COMPLETE_MARKER,
    REQUIRED_FILES,
    _hash_folder,
    verify_model_dir,
)


def _complete_folder(folder):
    folder.mkdir()
    for name in REQUIRED_FILES:
        (folder / name).write_text(f"content of {name}")
    (folder / COMPLETE_MARKER).write_text(json.dumps({"files": _hash_folder(folder)}))
    return folder


def test_complete_folder_verifies(tmp_path) -> None:
    assert verify_model_dir(_complete_folder(tmp_path / "m")) is None


def test_missing_marker_means_partial_pull(tmp_path) -> None:
    folder = _complete_folder(tmp_path / "m")
    (folder / COMPLETE_MARKER).unlink()
    assert "partial" in verify_model_dir(folder)


def test_changed_file_is_detected(tmp_path) -> None:
    folder = _complete_folder(tmp_path / "m")
    (folder / "model.safetensors").write_text("truncated")
    assert "model.safetensors" in verify_model_dir(folder)


def test_missing_file_is_detected(tmp_path) -> None:
    folder = _complete_folder(tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    assert "tokenizer.json" in verify_model_dir(folder)
