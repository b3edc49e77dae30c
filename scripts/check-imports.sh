#!/usr/bin/env bash
# Checks the import rules of DESIGN.md ([tool.importlinter] in pyproject.toml).
#
# import-linter reads a package's modules from disk, and loraplex's subpackages live
# in top-level folders mapped by `package-dir` (adapters/ is loraplex.adapters): so the
# package is first assembled as it installs, into a temporary folder, and checked there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LORAPLEX_VENV:-.venv}
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
"$VENV/bin/python" - "$tree" <<'PY'
import shutil
import sys
import tomllib
from pathlib import Path

tree = Path(sys.argv[1])
package_dir = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
# Parents before children, so a subpackage's folder lands inside its parent's copy.
for package, folder in sorted(package_dir.items(), key=lambda item: item[0].count(".")):
    target = tree.joinpath(*package.split("."))
    shutil.copytree(folder, target, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "csrc"))
PY
cd "$tree" && PYTHONPATH="$tree" "$OLDPWD/$VENV/bin/lint-imports" --config "$OLDPWD/pyproject.toml"
