"""Step time of PathSGD vs torch.optim.SGD, the reference backend and the naive baseline.

What is timed: ``optimizer.step()`` alone (the gradients are fixed random tensors set once),
with ``torch.utils.benchmark.Timer.blocked_autorange`` after explicit warm-up steps (the first
step allocates the momentum buffers). For every (model, momentum) configuration all optimizers are
measured in the same process, ``rounds`` times in rotating order, and the per-block times of the
rounds are pooled; the median is reported, and ratios are to the torch SGD (foreach) median of the
same configuration in the same run.

The reference backend (``PATHSGD_BACKEND=reference``, the pure-PyTorch twin in
``pathsgd/reference.py``) is selected when pathsgd is imported, so it is timed in a fresh
subprocess started with that environment variable: exactly what a user who sets it gets. That
subprocess also times torch SGD (foreach), and the reference ratio is to that measurement.

Standalone: ``python -m benchmarks.step_time [--quick]`` prints the table.
"""
from __future__ import annotations

import gc
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.benchmark import Timer

from .common import (OPTIMIZER_LABELS, fmt_ms, fmt_ratio, make_optimizer, md_table, mlp, num_params, parse_sizes,
                     run_worker, sizes_str, text_table, worker_main)

LR = 1e-4          # small, so thousands of timed steps on fixed gradients keep the weights finite
GRAD_SCALE = 1e-3

# CPU targets for MLP 784-2048-2048-10, momentum 0.9.
HEADLINE_SIZES = "784-2048-2048-10"
HEADLINE_MOMENTUM = 0.9
TARGET_RATIO_TO_SGD = 1.6
TARGET_SPEEDUP_VS_NAIVE = 3.0


def _setup(sizes: Sequence[int], name: str, momentum: float, device: str, seed: int = 0):
    torch.manual_seed(seed)
    model = mlp(sizes).to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    for param in model.parameters():
        param.grad = (torch.randn(param.shape, generator=gen) * GRAD_SCALE).to(device)
    return model, make_optimizer(name, model, lr=LR, momentum=momentum)


def _timer(opt, device: str) -> Timer:
    # Timer defaults to num_threads=1: pass the process's thread count explicitly.
    return Timer("opt.step()", globals={"opt": opt}, num_threads=torch.get_num_threads(),
                 label="optimizer.step", description=device)


def measure_configuration(sizes: Sequence[int], momentum: float, names: Sequence[str], device: str = "cpu",
                          min_run_time: float = 0.5, rounds: int = 2, warmup: int = 3, seed: int = 0
                          ) -> Dict[str, Dict[str, Any]]:
    """``{optimizer: {median_s, iqr_s, blocks, round_medians_s, ...}}`` for one model and momentum, all
    in this process (``round_medians_s``: the median block of each round, for paired ratios)."""
    states = {}
    for name in names:
        model, opt = _setup(sizes, name, momentum, device, seed)
        for _ in range(warmup):
            opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        states[name] = (model, opt)
    blocks: Dict[str, List[float]] = {name: [] for name in names}
    round_medians: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = list(names[r % len(names):]) + list(names[:r % len(names)])
        for name in order:
            measurement = _timer(states[name][1], device).blocked_autorange(min_run_time=min_run_time)
            blocks[name].extend(measurement.times)
            round_medians[name].append(statistics.median(measurement.times))
    out = {}
    for name in names:
        model = states[name][0]
        times = sorted(blocks[name])
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        out[name] = {"median_s": statistics.median(times), "iqr_s": q[2] - q[0], "min_s": times[0],
                     "n_blocks": len(times), "round_medians_s": round_medians[name],
                     "weights_finite": bool(all(torch.isfinite(p).all() for p in model.parameters()))}
    del states
    gc.collect()
    return out


def _worker(config: Dict[str, Any]) -> Dict[str, Any]:
    """Runs in a subprocess (``PATHSGD_BACKEND=reference`` for the reference backend)."""
    import pathsgd
    torch.set_num_threads(config["threads"])
    result = measure_configuration(parse_sizes(config["sizes"]), config["momentum"], config["names"],
                                   config["device"], config["min_run_time"], config["rounds"], config["warmup"])
    return {"times": result, "backend": pathsgd.ops.backend_for(torch.device(config["device"]).type)}


def run(sizes_list: Sequence[str], momenta: Sequence[float], device: str = "cpu", min_run_time: float = 0.5,
        rounds: int = 2, warmup: int = 3, include_reference: bool = True, include_naive: bool = True,
        progress=None, headline_repeats: int = 0) -> Dict[str, Any]:
    names = ["sgd_forloop", "sgd_foreach"] + (["sgd_fused"] if device.startswith("cuda") else []) + ["pathsgd"]
    if include_naive:
        names.append("naive")
    configs = []
    for sizes in sizes_list:
        for momentum in momenta:
            sizes_l = parse_sizes(sizes)
            entry: Dict[str, Any] = {"sizes": sizes_str(sizes_l), "params": num_params(sizes_l),
                                     "momentum": momentum, "device": device}
            times = measure_configuration(sizes_l, momentum, names, device, min_run_time, rounds, warmup)
            base = times["sgd_foreach"]["median_s"]
            entry["times"] = times
            entry["ratio_to_sgd_foreach"] = {n: t["median_s"] / base for n, t in times.items()}
            # paired: the median over rounds of each round's ratio (both timed in the same round, so a burst
            # of load on the machine slows both alike)
            entry["paired_ratio_to_sgd_foreach"] = {
                n: statistics.median(a / b for a, b in zip(t["round_medians_s"], times["sgd_foreach"]["round_medians_s"]))
                for n, t in times.items()}
            # secondary, robust to interference from other processes: ratio of the fastest blocks
            entry["ratio_of_min_to_sgd_foreach"] = {n: t["min_s"] / times["sgd_foreach"]["min_s"]
                                                    for n, t in times.items()}
            if include_reference:
                ref = run_worker("step_time", {"sizes": entry["sizes"], "momentum": momentum,
                                               "names": ["sgd_foreach", "pathsgd"], "device": device,
                                               "min_run_time": min_run_time, "rounds": rounds, "warmup": warmup,
                                               "threads": torch.get_num_threads()},
                                 env={"PATHSGD_BACKEND": "reference"})
                if ref["backend"] != "reference":
                    raise RuntimeError(f"the reference-backend worker ran on backend {ref['backend']!r}")
                ref_times = ref["times"]
                entry["reference_subprocess"] = {
                    "backend": ref["backend"], "times": ref_times,
                    "ratio_to_its_sgd_foreach": ref_times["pathsgd"]["median_s"] / ref_times["sgd_foreach"]["median_s"],
                }
                entry["times"]["pathsgd_reference"] = ref_times["pathsgd"]
                entry["ratio_to_sgd_foreach"]["pathsgd_reference"] = entry["reference_subprocess"]["ratio_to_its_sgd_foreach"]
            if include_naive:
                entry["pathsgd_speedup_vs_naive"] = times["naive"]["median_s"] / times["pathsgd"]["median_s"]
            configs.append(entry)
            if progress is not None:
                progress.update(1)
    result = {"lr": LR, "grad_scale": GRAD_SCALE, "min_run_time_s": min_run_time, "rounds": rounds,
              "warmup_steps": warmup, "threads": torch.get_num_threads(), "configs": configs,
              "what": "median time of optimizer.step() with fixed gradients (torch.utils.benchmark blocked_autorange)"}
    if headline_repeats > 0 and device == "cpu" and any(
            e["sizes"] == HEADLINE_SIZES and e["momentum"] == HEADLINE_MOMENTUM for e in configs):
        result["headline_repeats"] = repeat_headline(headline_repeats, min_run_time, rounds, warmup)
    result["headline"] = headline(result)
    return result


def repeat_headline(repeats: int, min_run_time: float, rounds: int, warmup: int) -> Dict[str, Any]:
    """The headline ratio measured ``repeats`` more times (fresh models each time), with this process's
    thread count and with 1 thread: how much the single number of the table moves, and how it depends
    on threads."""
    threads_now = torch.get_num_threads()
    out: Dict[str, Any] = {"sizes": HEADLINE_SIZES, "momentum": HEADLINE_MOMENTUM, "repeats": repeats, "by_threads": {}}
    try:
        for threads in sorted({threads_now, 1}, reverse=True):
            torch.set_num_threads(threads)
            ratios, sgd, path = [], [], []
            for _ in range(repeats):
                t = measure_configuration(parse_sizes(HEADLINE_SIZES), HEADLINE_MOMENTUM, ["sgd_foreach", "pathsgd"],
                                          "cpu", min_run_time, rounds, warmup)
                sgd.append(t["sgd_foreach"]["median_s"])
                path.append(t["pathsgd"]["median_s"])
                ratios.append(path[-1] / sgd[-1])
            out["by_threads"][str(threads)] = {"ratios": ratios, "median_ratio": statistics.median(ratios),
                                               "min_ratio": min(ratios), "max_ratio": max(ratios),
                                               "sgd_foreach_median_s": sgd, "pathsgd_median_s": path}
    finally:
        torch.set_num_threads(threads_now)
    return out


def headline(result: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    for entry in result["configs"]:
        if entry["sizes"] == HEADLINE_SIZES and entry["momentum"] == HEADLINE_MOMENTUM:
            ratio = entry["ratio_to_sgd_foreach"]["pathsgd"]
            out = {"sizes": HEADLINE_SIZES, "momentum": HEADLINE_MOMENTUM, "device": entry["device"],
                   "pathsgd_over_sgd_foreach": ratio, "target_max": TARGET_RATIO_TO_SGD,
                   "ratio_target_met": ratio <= TARGET_RATIO_TO_SGD}
            if "headline_repeats" in result:
                out["repeats"] = {t: {k: v[k] for k in ("median_ratio", "min_ratio", "max_ratio")}
                                  for t, v in result["headline_repeats"]["by_threads"].items()}
                out["repeats_count"] = result["headline_repeats"]["repeats"]
            if "pathsgd_speedup_vs_naive" in entry:
                speedup = entry["pathsgd_speedup_vs_naive"]
                out.update({"pathsgd_speedup_vs_naive": speedup, "speedup_target_min": TARGET_SPEEDUP_VS_NAIVE,
                            "speedup_target_met": speedup >= TARGET_SPEEDUP_VS_NAIVE})
            return out
    return None


def table_rows(result: Dict[str, Any]) -> (List[str], List[List[str]]):
    names = [n for n in OPTIMIZER_LABELS if any(n in e["times"] for e in result["configs"])]
    headers = ["MLP", "params", "momentum"] + [f"{OPTIMIZER_LABELS[n]} ms (ratio)" for n in names]
    headers.insert(3 + names.index("pathsgd") + 1, "PathSGD paired ratio")
    rows = []
    for e in result["configs"]:
        row = [e["sizes"], f"{e['params'] / 1e6:.2f}M", e["momentum"]]
        for n in names:
            if n in e["times"]:
                row.append(f"{fmt_ms(e['times'][n]['median_s'])} ({fmt_ratio(e['ratio_to_sgd_foreach'][n])})")
            else:
                row.append("n/a")
            if n == "pathsgd":
                paired = e.get("paired_ratio_to_sgd_foreach", {}).get("pathsgd")
                row.append(fmt_ratio(paired) if paired is not None else "n/a")
        rows.append(row)
    return headers, rows


def markdown(result: Dict[str, Any]) -> str:
    headers, rows = table_rows(result)
    return md_table(headers, rows)


def text(result: Dict[str, Any]) -> str:
    headers, rows = table_rows(result)
    return text_table(headers, rows)


def plot(result: Dict[str, Any], path: str) -> None:
    from .common import setup_matplotlib
    plt = setup_matplotlib()
    import numpy as np
    configs = result["configs"]
    names = [n for n in OPTIMIZER_LABELS if any(n in e["times"] for e in configs)]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(configs) + 2), 4.2))
    width = 0.8 / len(names)
    x = np.arange(len(configs))
    for i, name in enumerate(names):
        ratios = [e["ratio_to_sgd_foreach"].get(name, np.nan) for e in configs]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, ratios, width, label=OPTIMIZER_LABELS[name])
        for bar, r in zip(bars, ratios):
            if np.isfinite(r):
                ax.annotate(f"{r:.2g}", (bar.get_x() + bar.get_width() / 2, r), ha="center", va="bottom",
                            fontsize=6, rotation=90, xytext=(0, 2), textcoords="offset points")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(TARGET_RATIO_TO_SGD, color="tab:red", lw=0.8, ls="--", label=f"target PathSGD <= {TARGET_RATIO_TO_SGD}x")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{e['sizes']}\nmomentum {e['momentum']}" for e in configs], fontsize=7)
    ax.set_ylabel("step time / torch SGD (foreach) step time")
    ax.set_title(f"optimizer.step() time relative to torch SGD (foreach), {configs[0]['device']}, "
                 f"{result['threads']} threads (lower is better)")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ymax = max(max(e["ratio_to_sgd_foreach"].values()) for e in configs)
    ymin = min(min(e["ratio_to_sgd_foreach"].values()) for e in configs)
    ax.set_ylim(min(0.5, ymin / 1.5), ymax * 3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str]) -> None:
    if worker_main(argv, _worker):
        return
    quick = "--quick" in argv
    torch.set_num_threads(torch.get_num_threads())
    sizes = ["40-512-512-10", "784-2048-2048-10"] + ([] if quick else ["3072-4000-4000-10"])
    result = run(sizes, [0.0, 0.9], min_run_time=0.2 if quick else 0.5, rounds=1 if quick else 2)
    print(text(result))
    print("headline:", result["headline"])


if __name__ == "__main__":
    main(sys.argv[1:])
