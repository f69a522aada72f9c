"""Step time vs model size: PathSGD and torch SGD (foreach) on MLPs ``in-w-w-10`` of growing width w.

Same method as :mod:`benchmarks.step_time` (``optimizer.step()`` on fixed gradients,
``blocked_autorange`` medians after warm-up, both optimizers in the same process, rounds pooled),
momentum 0.9. The ratio should stay flat (or fall) as the model grows if PathSGD's extra work is
a constant number of passes over the weights.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Sequence

import torch

from .common import fmt_ms, md_table, num_params, text_table
from .step_time import measure_configuration

NAMES = ["sgd_foreach", "pathsgd"]


def run(widths: Sequence[int], in_features: int = 784, out_features: int = 10, momentum: float = 0.9,
        device: str = "cpu", min_run_time: float = 0.3, rounds: int = 2, warmup: int = 3, progress=None
        ) -> Dict[str, Any]:
    points = []
    names = NAMES + (["sgd_fused"] if device.startswith("cuda") else [])
    for width in widths:
        sizes = [in_features, width, width, out_features]
        times = measure_configuration(sizes, momentum, names, device, min_run_time, rounds, warmup)
        points.append({"width": width, "sizes": "-".join(map(str, sizes)), "params": num_params(sizes),
                       "times": times,
                       "ratio_pathsgd_to_sgd_foreach": times["pathsgd"]["median_s"] / times["sgd_foreach"]["median_s"]})
        if progress is not None:
            progress.update(1)
    ratios = [p["ratio_pathsgd_to_sgd_foreach"] for p in points]
    return {"momentum": momentum, "device": device, "threads": torch.get_num_threads(), "min_run_time_s": min_run_time,
            "rounds": rounds, "points": points, "ratio_min": min(ratios), "ratio_max": max(ratios),
            "what": "median time of optimizer.step() with fixed gradients vs number of parameters"}


def table_rows(result: Dict[str, Any]):
    headers = ["MLP", "params", "torch SGD (foreach) ms", "PathSGD ms", "PathSGD / SGD"]
    rows = [[p["sizes"], f"{p['params']:,}", fmt_ms(p["times"]["sgd_foreach"]["median_s"]),
             fmt_ms(p["times"]["pathsgd"]["median_s"]), f"{p['ratio_pathsgd_to_sgd_foreach']:.2f}x"]
            for p in result["points"]]
    return headers, rows


def markdown(result):
    return md_table(*table_rows(result))


def text(result):
    return text_table(*table_rows(result))


def plot(result: Dict[str, Any], path: str) -> None:
    from .common import OPTIMIZER_LABELS, setup_matplotlib
    plt = setup_matplotlib()
    pts = result["points"]
    params = [p["params"] for p in pts]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [n for n in ("sgd_foreach", "sgd_fused", "pathsgd") if n in pts[0]["times"]]
    for name in names:
        ax.loglog(params, [p["times"][name]["median_s"] * 1e3 for p in pts], "o-", label=OPTIMIZER_LABELS[name])
    # reference slope 1 (time proportional to parameters) through the largest SGD point
    ref = pts[-1]["times"]["sgd_foreach"]["median_s"] * 1e3
    ax.loglog(params, [ref * n / params[-1] for n in params], ":", color="gray", label="slope 1 (time ∝ params)")
    ax.set_xlabel("number of parameters")
    ax.set_ylabel("optimizer.step() median time (ms)")
    ax.set_title(f"Step time vs size, MLP {pts[0]['sizes'].split('-')[0]}-w-w-10, momentum {result['momentum']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax2.semilogx(params, [p["ratio_pathsgd_to_sgd_foreach"] for p in pts], "o-", color="tab:red")
    for p in pts:
        ax2.annotate(f"w={p['width']}", (p["params"], p["ratio_pathsgd_to_sgd_foreach"]), fontsize=7,
                     xytext=(3, 4), textcoords="offset points")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_ylim(0, max(2.0, 1.15 * max(p["ratio_pathsgd_to_sgd_foreach"] for p in pts)))
    ax2.set_xlabel("number of parameters")
    ax2.set_ylabel("PathSGD / torch SGD (foreach)")
    ax2.set_title(f"Ratio ({result['device']}, {result['threads']} threads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str]) -> None:
    quick = "--quick" in argv
    result = run([128, 256, 512, 1024, 2048] if quick else [256, 512, 1024, 2048, 4096],
                 min_run_time=0.1 if quick else 0.3, rounds=1 if quick else 2)
    print(text(result))


if __name__ == "__main__":
    main(sys.argv[1:])
