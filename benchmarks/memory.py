"""Peak memory of one training step (forward + backward + optimizer step) per optimizer.

Every configuration (model, momentum, optimizer) runs in a fresh subprocess that imports the same
modules (torch, pathsgd, the baseline) whatever it measures, so library code is the same for all.

CPU (peak RSS): the worker runs ``warmup`` training steps (steady state: momentum buffers exist,
the allocator has seen the step), then ``repeats`` times: reads the current RSS, resets the
kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), runs one step
(``zero_grad(set_to_none=True)``, forward, backward, ``step``) and reads the peak RSS of the step
(``VmHWM`` of /proc/self/status; ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` only where /proc is
missing, because on Linux a subprocess's ru_maxrss also holds its parent's RSS at fork time and
is not reset by clear_refs); the median over repeats is the step's peak.
Before measuring, every worker runs a few steps of every optimizer on a tiny MLP, so that the
same library code is resident in all workers (otherwise code pages of the optimizer that ran, about
1-2 MiB, would count as its memory). Where the mark cannot be reset the process-lifetime peak is used (and recorded as such).
The workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc): large blocks are always
mmap-ed and returned to the kernel when freed, so RSS follows live memory instead of glibc's
dynamically raised thresholds keeping freed blocks resident; and with one torch thread (no
per-thread malloc arenas). GPU: ``torch.cuda.max_memory_allocated`` over the step after
``reset_peak_memory_stats``.

Reported: the step's peak per optimizer, its excess over torch SGD (foreach) with the same
momentum in bytes and as % of the parameter bytes (target: PathSGD < 5%).
"""
from __future__ import annotations

import gc
import os
import resource
import statistics
import sys
from typing import Any, Dict, List, Sequence

import torch
import torch.nn.functional as F

from .common import (OPTIMIZER_LABELS, fmt_bytes, make_optimizer, md_table, mlp, num_params, parse_sizes, run_worker,
                     sizes_str, text_table, worker_main)

TARGET_PCT_OF_PARAMS = 5.0
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """The peak RSS: ``VmHWM`` where /proc exists, else ``getrusage().ru_maxrss``.

    Not ru_maxrss on Linux: it is ``max(signal->maxrss, mm hiwater)``, and ``signal->maxrss``
    keeps the pre-exec peak of the forked child, i.e. the *parent's* RSS at fork time, which
    clear_refs does not reset (measured: every worker then reported the parent's RSS).
    """
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _touch_code_paths(device: str) -> None:
    """A few steps of every optimizer on a tiny MLP, so that every worker has the same library code
    resident (and lazily initialized state set up) before it measures: the measured differences are
    then data, not code pages of the optimizer that happened to run."""
    names = ["sgd_forloop", "sgd_foreach", "pathsgd", "naive"] + (["sgd_fused"] if device.startswith("cuda") else [])
    for name in names:
        for momentum in (0.0, 0.9):
            torch.manual_seed(0)
            model = mlp([8, 16, 16, 4]).to(device)
            opt = make_optimizer(name, model, lr=1e-3, momentum=momentum)
            x = torch.randn(4, 8, device=device)
            for _ in range(2):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long, device=device)).backward()
                opt.step()
            del model, opt
    gc.collect()


def _worker(config: Dict[str, Any]) -> Dict[str, Any]:
    import pathsgd  # noqa: F401  (same imports in every worker)
    from . import baselines  # noqa: F401
    torch.set_num_threads(config["threads"])
    device = config["device"]
    _touch_code_paths(device)
    sizes = parse_sizes(config["sizes"])
    torch.manual_seed(0)
    model = mlp(sizes).to(device)
    x = torch.randn(config["batch"], sizes[0], device=device)
    y = torch.randint(0, sizes[-1], (config["batch"],), device=device)
    opt = make_optimizer(config["optimizer"], model, lr=1e-3, momentum=config["momentum"])

    def train_step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(config["warmup"]):
        train_step()
    gc.collect()
    cuda = device.startswith("cuda")
    peaks: List[int] = []
    before: List[int] = []
    reset_ok = True
    for _ in range(config["repeats"]):
        if cuda:
            torch.cuda.synchronize()
            before.append(torch.cuda.memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            train_step()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
        else:
            before.append(_status_kib("VmRSS") * 1024)
            reset_ok = _reset_peak_rss() and reset_ok
            train_step()
            peaks.append(_peak_rss_bytes())
    return {"peaks": peaks, "before": before, "peak_median": statistics.median(peaks),
            "before_median": statistics.median(before), "peak_reset": reset_ok if not cuda else True,
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "backend": pathsgd.ops.backend_for(torch.device(device).type),
            "metric": "cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM after clear_refs)"}


def run(sizes_list: Sequence[str], momenta: Sequence[float], optimizers: Sequence[str], device: str = "cpu",
        batch: int = 128, warmup: int = 3, repeats: int = 5, processes: int = 1, parallel: int = 1,
        progress=None) -> Dict[str, Any]:
    """``processes`` fresh worker processes per configuration, ``parallel`` of them at a time."""
    if "sgd_foreach" not in optimizers:
        raise ValueError("memory.run needs sgd_foreach as the baseline")
    from concurrent.futures import ThreadPoolExecutor
    jobs = []
    for sizes in sizes_list:
        for momentum in momenta:
            for name in optimizers:
                env = dict(WORKER_ENV)
                if name == "pathsgd_reference":
                    env["PATHSGD_BACKEND"] = "reference"
                config = {"sizes": sizes_str(parse_sizes(sizes)), "momentum": momentum, "optimizer": name,
                          "device": device, "batch": batch, "warmup": warmup, "repeats": repeats, "threads": 1}
                jobs.append((config, env))

    def job(i):
        config, env = jobs[i]
        runs = [run_worker("memory", config, env=env) for _ in range(processes)]
        if progress is not None:
            progress.update(1)
        return runs

    # CUDA memory workers share one GPU: run them one at a time there.
    with ThreadPoolExecutor(max_workers=1 if device.startswith("cuda") else max(1, parallel)) as pool:
        all_runs = list(pool.map(job, range(len(jobs))))
    configs: List[Dict[str, Any]] = []
    by_key: Dict[Any, Dict[str, Any]] = {}
    for (config, _), runs in zip(jobs, all_runs):
        key = (config["sizes"], config["momentum"])
        if key not in by_key:
            by_key[key] = {"sizes": config["sizes"], "params": num_params(parse_sizes(config["sizes"])),
                           "momentum": config["momentum"], "device": device, "optimizers": {}}
            configs.append(by_key[key])
        entry = by_key[key]
        peaks = [r["peak_median"] for r in runs]
        entry["param_bytes"] = runs[0]["param_bytes"]
        entry["optimizers"][config["optimizer"]] = {
            "peak_bytes": statistics.median(peaks),
            "peak_bytes_per_process": peaks,
            "peak_spread_bytes": max(max(r["peaks"]) for r in runs) - min(min(r["peaks"]) for r in runs),
            "pre_step_bytes": statistics.median(r["before_median"] for r in runs),
            "peak_reset": all(r["peak_reset"] for r in runs),
            "backend": runs[0]["backend"], "metric": runs[0]["metric"],
        }
    for entry in configs:
        base = entry["optimizers"]["sgd_foreach"]["peak_bytes"]
        for name, o in entry["optimizers"].items():
            o["over_sgd_foreach_bytes"] = o["peak_bytes"] - base
            o["over_sgd_foreach_pct_of_params"] = 100.0 * (o["peak_bytes"] - base) / entry["param_bytes"]
    result = {"batch": batch, "warmup_steps": warmup, "repeats_per_process": repeats, "processes": processes,
              "worker_env": WORKER_ENV, "configs": configs,
              "what": "peak memory of one training step (zero_grad, forward, backward, step); see benchmarks/memory.py"}
    result["headline"] = headline(result)
    return result


def headline(result: Dict[str, Any]):
    out = []
    for e in result["configs"]:
        if "pathsgd" in e["optimizers"]:
            pct = e["optimizers"]["pathsgd"]["over_sgd_foreach_pct_of_params"]
            out.append({"sizes": e["sizes"], "momentum": e["momentum"],
                        "pathsgd_over_sgd_bytes": e["optimizers"]["pathsgd"]["over_sgd_foreach_bytes"],
                        "pathsgd_over_sgd_pct_of_params": pct, "target_max_pct": TARGET_PCT_OF_PARAMS,
                        "target_met": pct < TARGET_PCT_OF_PARAMS})
    return out


def table_rows(result: Dict[str, Any]):
    names = [n for n in OPTIMIZER_LABELS if any(n in e["optimizers"] for e in result["configs"])]
    headers = ["MLP", "param bytes", "momentum"] + [f"{OPTIMIZER_LABELS[n]}: peak (over SGD foreach, % params)"
                                                   for n in names]
    rows = []
    for e in result["configs"]:
        row = [e["sizes"], fmt_bytes(e["param_bytes"]), e["momentum"]]
        for n in names:
            o = e["optimizers"].get(n)
            row.append("n/a" if o is None else
                       f"{fmt_bytes(o['peak_bytes'])} ({'+' if o['over_sgd_foreach_bytes'] >= 0 else ''}"
                       f"{fmt_bytes(o['over_sgd_foreach_bytes'])}, {o['over_sgd_foreach_pct_of_params']:+.1f}%)")
        rows.append(row)
    return headers, rows


def markdown(result):
    return md_table(*table_rows(result))


def text(result):
    return text_table(*table_rows(result))


def plot(result: Dict[str, Any], path: str) -> None:
    from .common import setup_matplotlib
    plt = setup_matplotlib()
    import numpy as np
    configs = result["configs"]
    names = [n for n in OPTIMIZER_LABELS if n != "sgd_foreach" and any(n in e["optimizers"] for e in configs)]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(configs) + 2), 4.2))
    width = 0.8 / len(names)
    x = np.arange(len(configs))
    for i, name in enumerate(names):
        vals = [e["optimizers"][name]["over_sgd_foreach_pct_of_params"] if name in e["optimizers"] else np.nan
                for e in configs]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=OPTIMIZER_LABELS[name])
        for bar, v in zip(bars, vals):
            if np.isfinite(v):
                ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, max(v, 0)), ha="center", va="bottom",
                            fontsize=6, xytext=(0, 2), textcoords="offset points")
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(TARGET_PCT_OF_PARAMS, color="tab:red", lw=0.8, ls="--", label=f"target PathSGD < {TARGET_PCT_OF_PARAMS}%")
    ax.set_yscale("symlog", linthresh=10)
    all_vals = [o["over_sgd_foreach_pct_of_params"] for e in configs for o in e["optimizers"].values()]
    ax.set_ylim(min(-5.0, 1.5 * min(all_vals)), max(20.0, 3 * max(all_vals)))
    ax.set_xticks(x)
    ax.set_xticklabels([f"{e['sizes']}\nmomentum {e['momentum']}" for e in configs], fontsize=7)
    ax.set_ylabel("step peak - torch SGD (foreach) step peak\n(% of parameter bytes)")
    ax.set_title(f"Peak memory of a training step over torch SGD (foreach), {configs[0]['device']} "
                 f"({configs[0]['optimizers']['sgd_foreach']['metric'].split(' (')[0]})")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str]) -> None:
    if worker_main(argv, _worker):
        return
    quick = "--quick" in argv
    result = run(["784-2048-2048-10"], [0.0, 0.9],
                 ["sgd_forloop", "sgd_foreach", "pathsgd", "pathsgd_reference", "naive"],
                 processes=1 if quick else 2)
    print(text(result))


if __name__ == "__main__":
    main(sys.argv[1:])
