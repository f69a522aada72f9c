"""The pathsgd benchmark suite (the project's main job).

    python -m benchmarks.run            # default: CPU, < 15 minutes on 2 cores
    python -m benchmarks.run --quick    # about a minute: CI smoke test
    python -m benchmarks.run --full     # GPUs: larger sizes, more seeds; device cuda when available
    python -m benchmarks.run --part paper [--full]   # the paper's protocol alone (--full: 100 epochs)
    options: --out DIR, --parts step_time,cnn_step,scaling,memory,path_norm,convergence,paper, --device cpu|cuda,
             --threads N (torch threads for the timing parts; default: all cores), --workers N

Writes ``benchmarks/results/<machine>-<date>[-quick|-full]/`` (or ``--out``): ``report.md``
(tables, plots, method), ``results.json`` (every figure, with machine, versions, backend, seeds
and git commit) and PNG plots. Timing parts run first, alone; then memory (fresh subprocesses)
and convergence (a pool of single-threaded worker processes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List

import torch

from . import common

PARTS = ["step_time", "cnn_step", "scaling", "memory", "path_norm", "convergence", "paper"]

MODES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "quick": {
        "step_time": {"sizes": ["784-2048-2048-10"], "momenta": [0.9], "min_run_time": 0.1, "rounds": 2, "warmup": 2},
        "cnn_step": {"rounds": 5, "block_s": 0.05, "repeats": 1},
        "scaling": {"widths": [128, 256, 512, 1024, 2048], "min_run_time": 0.05, "rounds": 2, "warmup": 2},
        "memory": {"sizes": ["784-2048-2048-10"], "momenta": [0.9], "optimizers": ["sgd_foreach", "pathsgd", "naive"],
                   "warmup": 2, "repeats": 3, "processes": 1},
        "convergence": {"epochs": 3, "seeds": [0], "grid_size": 1},
        "paper": {"epochs": {"mnist1d": 2, "digits": 2}, "seeds": [0], "grid_size": 1},
        "path_norm": {"repeats": 1, "ps": [2.0]},
    },
    "default": {
        "step_time": {"sizes": ["40-512-512-10", "784-256-256-10", "784-2048-2048-10", "3072-4000-4000-10"],
                      "momenta": [0.0, 0.9],
                      "min_run_time": 0.2, "rounds": 5, "warmup": 3,
                      "headline_repeats": 3},
        "cnn_step": {"rounds": 30, "block_s": 0.1, "repeats": 3},
        "scaling": {"widths": [256, 512, 1024, 2048, 4096], "min_run_time": 0.1, "rounds": 5, "warmup": 3},
        "memory": {"sizes": ["784-2048-2048-10", "3072-4000-4000-10"], "momenta": [0.0, 0.9],
                   "optimizers": ["sgd_forloop", "sgd_foreach", "pathsgd", "pathsgd_reference", "naive"],
                   "warmup": 3, "repeats": 5, "processes": 1},
        "convergence": {"epochs": 20, "seeds": [0, 1, 2], "grid_size": None},
        "paper": {"epochs": {"mnist1d": 20, "digits": 20}, "seeds": [0, 1, 2], "grid_size": None},
        "path_norm": {"repeats": 5, "ps": [2.0, float("inf")]},
    },
    "full": {
        "step_time": {"sizes": ["40-512-512-10", "784-2048-2048-10", "3072-4000-4000-10", "4096-8192-8192-10"],
                      "momenta": [0.0, 0.9], "min_run_time": 0.5, "rounds": 5, "warmup": 5,
                      "headline_repeats": 3},
        "cnn_step": {"rounds": 30, "block_s": 0.1, "repeats": 3},
        "scaling": {"widths": [256, 512, 1024, 2048, 4096, 8192, 16384], "min_run_time": 0.5, "rounds": 3,
                    "warmup": 5},
        "memory": {"sizes": ["784-2048-2048-10", "3072-4000-4000-10", "4096-8192-8192-10"], "momenta": [0.0, 0.9],
                   "optimizers": ["sgd_forloop", "sgd_foreach", "pathsgd", "pathsgd_reference", "naive"],
                   "warmup": 3, "repeats": 5, "processes": 2},
        "convergence": {"epochs": 40, "seeds": [0, 1, 2, 3, 4], "grid_size": None},
        "paper": {"epochs": {"mnist1d": 100, "digits": 100}, "seeds": [0, 1, 2], "grid_size": None},
        "path_norm": {"repeats": 5, "ps": [1.0, 2.0, float("inf")]},
    },
}


def _jsonable(x: Any) -> Any:
    """NaN/inf -> None (strict JSON), recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _load() -> List[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="about a minute (CI smoke test)")
    mode.add_argument("--full", action="store_true", help="larger sizes and more seeds, for GPUs (device cuda if available)")
    parser.add_argument("--out", help="output directory (default benchmarks/results/<machine>-<date>[-mode])")
    parser.add_argument("--parts", "--part", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--device", help="cpu or cuda (default: cuda with --full when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the timing parts (default: all cores)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes for convergence runs and memory workers (default: min(cores, 2), 8 with --full)")
    args = parser.parse_args(argv)
    args.mode = "quick" if args.quick else "full" if args.full else "default"
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    return args


def main(argv: List[str] = None) -> Dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from tqdm import tqdm

    t_start = time.perf_counter()
    device = args.device or common.default_device(full=args.full)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    cores = common.cpu_count()
    threads = args.threads or cores
    torch.set_num_threads(threads)
    workers = args.workers or (min(cores, 8) if args.full else min(cores, 2))
    cfg = MODES[args.mode]

    slug = f"{common.machine_slug(device)}-{common.today()}" + ("" if args.mode == "default" else f"-{args.mode}")
    out = os.path.abspath(args.out or os.path.join(common.RESULTS_ROOT, slug))
    os.makedirs(out, exist_ok=True)

    results: Dict[str, Any] = {
        "suite": "pathsgd benchmarks", "mode": args.mode, "command": "python -m benchmarks.run " + " ".join(
            sys.argv[1:] if argv is None else argv), "started": common.now(),
        "machine": common.machine_info(device), "device": device, "torch_threads_timing": threads,
        "workers": workers, "config": {p: cfg[p] for p in args.parts}, "parts": {}, "part_seconds": {},
        "load_average": {"start": _load()},
    }

    def save():
        results["total_seconds"] = time.perf_counter() - t_start
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(_jsonable(results), f, indent=1)

    print(f"pathsgd benchmarks ({args.mode} mode) on {device}: {results['machine']['cpu_model']}, {cores} cores, "
          f"torch {torch.__version__}, pathsgd backend {results['machine']['pathsgd_backend']}; writing {out}",
          file=sys.stderr)

    for part in args.parts:
        t0 = time.perf_counter()
        results["load_average"][f"{part}_start"] = _load()
        c = cfg[part]
        if part == "step_time":
            from . import step_time
            with tqdm(total=len(c["sizes"]) * len(c["momenta"]), desc="step time", unit="config") as bar:
                r = step_time.run(c["sizes"], c["momenta"], device, c["min_run_time"], c["rounds"], c["warmup"],
                                  progress=bar, headline_repeats=c.get("headline_repeats", 0))
            step_time.plot(r, os.path.join(out, "step_time.png"))
            print(step_time.text(r), file=sys.stderr)
        elif part == "cnn_step":  # CPU: the MNIST-1D CNN training step
            from . import cnn_step
            r = cnn_step.suite_part(c["rounds"], c["block_s"], c["repeats"], threads)
            print(cnn_step.markdown(r), file=sys.stderr)
        elif part == "scaling":
            from . import scaling
            with tqdm(total=len(c["widths"]), desc="scaling", unit="width") as bar:
                r = scaling.run(c["widths"], device=device, min_run_time=c["min_run_time"], rounds=c["rounds"],
                                warmup=c["warmup"], progress=bar)
            scaling.plot(r, os.path.join(out, "scaling.png"))
            print(scaling.text(r), file=sys.stderr)
        elif part == "memory":
            from . import memory
            n = len(c["sizes"]) * len(c["momenta"]) * len(c["optimizers"])
            with tqdm(total=n, desc="memory", unit="config") as bar:
                r = memory.run(c["sizes"], c["momenta"], c["optimizers"], device, warmup=c["warmup"],
                               repeats=c["repeats"], processes=c["processes"], parallel=workers, progress=bar)
            memory.plot(r, os.path.join(out, "memory.png"))
            print(memory.text(r), file=sys.stderr)
        elif part == "convergence":
            from . import convergence
            r = convergence.run(epochs=c["epochs"], seeds=c["seeds"], grid_size=c["grid_size"],
                                progress_factory=lambda **kw: tqdm(unit="run", **kw), workers=workers)
            convergence.plot(r, os.path.join(out, "convergence.png"))
            print(convergence.text(r), file=sys.stderr)
        elif part == "path_norm":  # CPU: pathsgd.path_norm of a ResNet-18 in float64 at 224x224
            from . import resnet
            r = resnet.time_path_norms(c["repeats"], c["ps"], threads)
            print(r, file=sys.stderr)
        elif part == "paper":
            from . import paper
            r = paper.run(epochs=c["epochs"], seeds=c["seeds"], grid_size=c["grid_size"],
                          progress_factory=lambda **kw: tqdm(unit="run", **kw), workers=workers)
            paper.plot(r, os.path.join(out, "paper.png"))
            print(paper.text(r), file=sys.stderr)
        results["parts"][part] = r
        results["part_seconds"][part] = time.perf_counter() - t0
        results["load_average"][f"{part}_end"] = _load()
        save()

    results["finished"] = common.now()
    results["load_average"]["end"] = _load()
    save()
    from .report import write_report
    write_report(results, out)
    save()
    print(f"done in {results['total_seconds']:.0f} s: {os.path.join(out, 'report.md')}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
