"""The built wheel carries the fused kernel's C++ source: installed without the checkout,
loraplex still compiles and loads the kernel (the vLLM plugin needs nothing else)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What pyproject.toml builds the package from (its package-dir) and the files it names.
SOURCES = ("pyproject.toml", "README.md", "loraplex", "serving", "router", "adapters", "training")

CHECK = """
import pathlib, sys
import loraplex.serving.native_lora as native

site = pathlib.Path(sys.argv[1])
assert pathlib.Path(native.__file__).is_relative_to(site), native.__file__
assert native.SOURCE.is_relative_to(site), native.SOURCE
kernel = native.load_kernel()
assert kernel is not None, "the fused kernel did not build from the installed wheel"
print(sorted(path.name for path in (pathlib.Path.home() / ".cache/loraplex/kernels").glob("*.so")))
"""


def test_installed_wheel_compiles_and_loads_the_kernel(tmp_path: Path) -> None:
    # Build from a copy: an in-tree build would leave build/ in the shared checkout.
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "."],
        cwd=source,
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert "is absent from the `packages` configuration" not in built.stdout + built.stderr
    [wheel] = (tmp_path / "dist").glob("loraplex-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        check=True,
    )
    home = tmp_path / "home"  # an empty kernel cache: the kernel is compiled, not reused
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env.update(PYTHONPATH=str(site), HOME=str(home))
    loaded = subprocess.run(
        [sys.executable, "-c", CHECK, str(site)],
        cwd=tmp_path,  # not the checkout: nothing imports from it
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "grouped_lora-" in loaded.stdout
