"""Run every benchmark and write one JSON file per benchmark into ``--out`` (``make bench``)."""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import platform
import sys

import torch

BENCHMARKS = ("bench_selective_scan", "bench_models", "bench_aligner", "bench_data", "bench_render")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results"))
    parser.add_argument("--only", nargs="*", default=None, help="run only these benchmarks (module names)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    for name in args.only or BENCHMARKS:
        module = importlib.import_module(name)
        result = module.run(args.out)
        result["machine"] = machine
        path = args.out / f"{name.removeprefix('bench_')}.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"{name}: {json.dumps(result)}\nwritten to {path}")


if __name__ == "__main__":
    main()
