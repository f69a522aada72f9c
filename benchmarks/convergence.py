"""Convergence on MNIST-1D: balanced vs unbalanced initialization (the paper's experiment, small).

Data: MNIST-1D (``mnist1d`` package) generated locally with ``make_dataset(get_dataset_args())``
(the package's ``get_dataset`` would try to download a pickle first; we never call it): 4000
training and 1000 test sequences of length 40, 10 classes. The 4000 training sequences are split
(fixed permutation, seed 0) into 3500 for training and 500 for validation.

Model: MLP 40-512-512-10 with ReLU, PyTorch's default initialization (*balanced*). The *unbalanced*
network is the same network after node rescaling: every hidden unit ``i`` of hidden layer ``l``
gets a factor ``c_i = exp(u)``, ``u ~ Uniform(log 1/100, log 100)`` (log-uniform in [1/100, 100]),
its incoming weights and bias are multiplied by ``c_i`` and its outgoing weights divided by
``c_i`` (computed in float64, stored in float32). ReLU is positively homogeneous, so the function
is unchanged: we check that the outputs on the training set agree to 1e-4 relative (max abs
difference / max abs output) before training, and record the difference.

Optimizers: SGD, SGD + momentum 0.9, Adam, Adagrad, PathSGD p=2 and PathSGD p=1 (momentum 0, the
paper's algorithm). Each one's learning rate is chosen per initialization (balanced and unbalanced
separately, so SGD gets its best chance on the unbalanced network) from a small grid by the final
validation accuracy of one run (seed ``GRID_SEED``; ties broken by validation loss), training on
the 3500. Then ``seeds`` runs with the chosen learning rate train on the 3500 and are evaluated on
the 1000 test sequences after every epoch. A run whose training loss becomes non-finite is
stopped and counted as diverged (its later epochs are NaN; it is excluded from the mean and
reported). Balanced and unbalanced runs of one seed start from the same function and see the same
mini-batches. Float32, batch 128, cross-entropy loss, no weight decay.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import md_table, mlp, text_table

SIZES = [40, 512, 512, 10]
GRID_SEED = 1000
RESCALE_RANGE = (1e-2, 1e2)
CHANCE_ERROR = 0.9

# Grids bracket each optimizer's best learning rate on *both* initializations (found by a wider
# preliminary sweep on the validation split): plain SGD needs ~1 on the balanced network and ~1e-3
# on the unbalanced one, hence its wider grid.
OPTIMIZERS: Dict[str, Dict[str, Any]] = {
    "sgd": {"label": "SGD", "grid": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]},
    "sgd_momentum": {"label": "SGD + momentum 0.9", "grid": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3]},
    "adam": {"label": "Adam", "grid": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]},
    "adagrad": {"label": "Adagrad", "grid": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1]},
    "pathsgd_p2": {"label": "PathSGD (p=2)", "grid": [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3]},
    "pathsgd_p1": {"label": "PathSGD (p=1)", "grid": [0.1, 0.3, 1.0, 3.0, 10.0, 30.0]},
}


def make_optimizer(name: str, model: nn.Module, lr: float):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if name == "sgd_momentum":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=lr)
    if name in ("pathsgd_p2", "pathsgd_p1"):
        import pathsgd
        return pathsgd.PathSGD(model, lr=lr, momentum=0.0, p=2 if name == "pathsgd_p2" else 1)
    raise ValueError(name)


# ----------------------------------------------------------------------------- data and models

_DATA_CACHE: Dict[int, Dict[str, torch.Tensor]] = {}


def load_data(val_size: int = 500) -> Dict[str, torch.Tensor]:
    """MNIST-1D generated locally (no download), split into train / val / test tensors."""
    if val_size in _DATA_CACHE:
        return _DATA_CACHE[val_size]
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    state = np.random.get_state()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(state)
    x = torch.as_tensor(raw["x"], dtype=torch.float32)
    y = torch.as_tensor(raw["y"], dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    data = {"x_train": x[train_idx], "y_train": y[train_idx], "x_val": x[val_idx], "y_val": y[val_idx],
            "x_test": torch.as_tensor(raw["x_test"], dtype=torch.float32),
            "y_test": torch.as_tensor(raw["y_test"], dtype=torch.long),
            "dataset_args": {k: v for k, v in vars(args).items() if k != "url"} if hasattr(args, "__dict__") else {}}
    _DATA_CACHE[val_size] = data
    return data


def unbalance_(model: nn.Sequential, seed: int, low: float = RESCALE_RANGE[0], high: float = RESCALE_RANGE[1]
               ) -> List[torch.Tensor]:
    """Node-rescales every hidden unit by a log-uniform factor in [low, high]; returns the factors."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    gen = torch.Generator().manual_seed(seed)
    factors = []
    with torch.no_grad():
        for layer, nxt in zip(linears, linears[1:]):
            u = torch.rand(layer.out_features, generator=gen, dtype=torch.float64)
            c = torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))
            layer.weight.copy_(layer.weight.double() * c[:, None])
            if layer.bias is not None:
                layer.bias.copy_(layer.bias.double() * c)
            nxt.weight.copy_(nxt.weight.double() / c[None, :])
            factors.append(c)
    return factors


def make_model(seed: int, init: str, check_x: Optional[torch.Tensor] = None) -> (nn.Sequential, Dict[str, Any]):
    torch.manual_seed(seed)
    model = mlp(SIZES)
    info: Dict[str, Any] = {}
    if init == "unbalanced":
        with torch.no_grad():
            before = model(check_x) if check_x is not None else None
        factors = unbalance_(model, seed + 7919)
        info["factor_min"] = min(float(c.min()) for c in factors)
        info["factor_max"] = max(float(c.max()) for c in factors)
        if before is not None:
            with torch.no_grad():
                after = model(check_x)
            rel = float((after - before).abs().max() / before.abs().max())
            info["output_rel_diff"] = rel
            if not rel <= 1e-4:
                raise AssertionError(f"unbalancing changed the function: relative output difference {rel:.3g}")
    elif init != "balanced":
        raise ValueError(init)
    return model, info


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> (float, float):
    out = model(x)
    loss = float(F.cross_entropy(out, y))
    err = float((out.argmax(1) != y).float().mean())
    return loss, err


def train_epochs(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, xe: torch.Tensor, ye: torch.Tensor,
                 epochs: int, batch: int, seed: int):
    """Mini-batch training with cross-entropy; ``(train_loss, eval_loss, eval_err, diverged_at)`` after every
    epoch (index 0 = before training). A non-finite training loss stops the run (later epochs NaN)."""
    gen = torch.Generator().manual_seed(seed + 104729)
    train_loss, eval_loss, eval_err = [], [], []

    def record():
        tl, _ = evaluate(model, x, y)
        el, ee = evaluate(model, xe, ye)
        train_loss.append(tl)
        eval_loss.append(el)
        eval_err.append(ee)
        return math.isfinite(tl)

    record()
    diverged_at = None
    n = len(x)
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=gen)
        model.train()
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        model.eval()
        if not record():
            diverged_at = epoch
            pad = epochs - epoch
            train_loss += [float("nan")] * pad
            eval_loss += [float("nan")] * pad
            eval_err[-1] = float("nan")
            eval_err += [float("nan")] * pad
            break
    return train_loss, eval_loss, eval_err, diverged_at


def train_run(data: Dict[str, torch.Tensor], opt_name: str, lr: float, init: str, seed: int, epochs: int,
              batch: int, eval_split: str) -> Dict[str, Any]:
    """One training run; metrics after every epoch (index 0 = before training)."""
    t0 = time.perf_counter()
    x, y = data["x_train"], data["y_train"]
    model, info = make_model(seed, init, check_x=x)
    opt = make_optimizer(opt_name, model, lr)
    train_loss, eval_loss, eval_err, diverged_at = train_epochs(
        model, opt, x, y, data[f"x_{eval_split}"], data[f"y_{eval_split}"], epochs, batch, seed)
    return {"optimizer": opt_name, "lr": lr, "init": init, "seed": seed, "epochs": epochs, "batch": batch,
            "eval_split": eval_split, "train_loss": train_loss, f"{eval_split}_loss": eval_loss,
            f"{eval_split}_error": eval_err, "diverged": diverged_at is not None, "diverged_at_epoch": diverged_at,
            "time_s": time.perf_counter() - t0, **info}


# ----------------------------------------------------------------------------- the experiment

def _init_worker() -> None:
    torch.set_num_threads(1)
    import pathsgd  # noqa: F401  (import once per worker)


def _task(args) -> Dict[str, Any]:
    name, lr, init, seed, epochs, batch, split = args
    return train_run(load_data(), name, lr, init, seed, epochs, batch, split)


class _Serial:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _pool(workers: int):
    if workers <= 1:
        return _Serial()
    import concurrent.futures
    import multiprocessing
    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_init_worker)


def _map(pool, tasks, bar, run_task: Callable = _task) -> List[Dict[str, Any]]:
    """Runs the tasks with ``run_task`` (a module-level function: it goes to the pool's processes, or runs
    here); results in task order."""
    results: List[Optional[Dict[str, Any]]] = [None] * len(tasks)
    if isinstance(pool, _Serial):
        for i, task in enumerate(tasks):
            results[i] = run_task(task)
            if bar:
                bar.update(1)
        return results  # type: ignore[return-value]
    import concurrent.futures
    futures = {pool.submit(run_task, task): i for i, task in enumerate(tasks)}
    for future in concurrent.futures.as_completed(futures):
        results[futures[future]] = future.result()
        if bar:
            bar.update(1)
    return results  # type: ignore[return-value]


def run(epochs: int = 20, seeds: Sequence[int] = (0, 1, 2), batch: int = 128, grid_size: Optional[int] = None,
        optimizers: Optional[Sequence[str]] = None, progress_factory: Optional[Callable] = None,
        workers: int = 2) -> Dict[str, Any]:
    """The experiment; training runs go to ``workers`` single-threaded processes (1 = here, in this process)."""
    torch.manual_seed(0)
    data = load_data()
    names = list(optimizers or OPTIMIZERS)
    inits = ["balanced", "unbalanced"]

    def grid_of(name):
        grid = OPTIMIZERS[name]["grid"]
        if grid_size is not None and grid_size < len(grid):  # the middle of the grid
            start = (len(grid) - grid_size + 1) // 2
            grid = grid[start:start + grid_size]
        return grid

    total = sum(len(grid_of(n)) for n in names) * len(inits) + len(names) * len(inits) * len(seeds)
    bar = progress_factory(total=total, desc="convergence") if progress_factory else None
    grid_tasks = [(name, lr, init, GRID_SEED, epochs, batch, "val") for name in names for init in inits
                  for lr in grid_of(name)]
    with _pool(workers) as pool:
        grid_runs = _map(pool, grid_tasks, bar)
        chosen = {}
        for name in names:
            for init in inits:
                scores = []
                for r in grid_runs:
                    if r["optimizer"] == name and r["init"] == init:
                        acc = -1.0 if r["diverged"] else 1.0 - r["val_error"][-1]
                        loss = r["val_loss"][-1] if math.isfinite(r["val_loss"][-1]) else float("inf")
                        scores.append((acc, -loss, -r["lr"], r["lr"]))
                best = max(scores)
                grid = grid_of(name)
                chosen[f"{name}/{init}"] = {"lr": best[3], "val_accuracy": best[0],
                                            "at_grid_edge": len(grid) > 1 and best[3] in (grid[0], grid[-1])}
        final_tasks = [(name, chosen[f"{name}/{init}"]["lr"], init, seed, epochs, batch, "test")
                       for name in names for init in inits for seed in seeds]
        final_runs = _map(pool, final_tasks, bar)
    if bar:
        bar.close()
    result = {"dataset": "MNIST-1D (mnist1d.data.make_dataset(get_dataset_args()), generated locally)",
              "dataset_args": data["dataset_args"], "n_train": len(data["x_train"]), "n_val": len(data["x_val"]),
              "n_test": len(data["x_test"]), "model": "MLP " + "-".join(map(str, SIZES)) + " ReLU",
              "rescale_range": list(RESCALE_RANGE), "epochs": epochs, "batch": batch, "seeds": list(seeds),
              "grid_seed": GRID_SEED, "grids": {n: grid_of(n) for n in names},
              "labels": {n: OPTIMIZERS[n]["label"] for n in names}, "chosen_lr": chosen,
              "grid_runs": grid_runs, "runs": final_runs,
              "parallelism": f"{workers} worker processes x 1 torch thread" if workers > 1
              else f"1 process x {torch.get_num_threads()} torch threads"}
    result["summary"] = summarize(result)
    return result


def summarize(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for name in result["labels"]:
        row: Dict[str, Any] = {"optimizer": name, "label": result["labels"][name]}
        per_init = {}
        for init in ("balanced", "unbalanced"):
            runs = [r for r in result["runs"] if r["optimizer"] == name and r["init"] == init]
            ok = [r for r in runs if not r["diverged"]]
            accs = [1.0 - r["test_error"][-1] for r in ok]
            row[init] = {"lr": result["chosen_lr"][f"{name}/{init}"]["lr"],
                         "lr_at_grid_edge": result["chosen_lr"][f"{name}/{init}"]["at_grid_edge"],
                         "test_acc_mean": statistics.mean(accs) if accs else None,
                         "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else (0.0 if accs else None),
                         "final_train_loss_mean": statistics.mean(r["train_loss"][-1] for r in ok) if ok else None,
                         "diverged": len(runs) - len(ok), "n": len(runs)}
            per_init[init] = {r["seed"]: r for r in runs}
        # How far apart are the balanced and unbalanced curves of the same seed?
        diffs_err, diffs_loss = [], []
        for seed, rb in per_init["balanced"].items():
            ru = per_init["unbalanced"].get(seed)
            if ru is None or rb["diverged"] or ru["diverged"]:
                continue
            diffs_err.append(max(abs(a - b) for a, b in zip(rb["test_error"], ru["test_error"])))
            diffs_loss.append(max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(rb["train_loss"], ru["train_loss"])))
        row["max_abs_test_error_gap"] = max(diffs_err) if diffs_err else None
        row["max_rel_train_loss_gap"] = max(diffs_loss) if diffs_loss else None
        rows.append(row)
    return rows


def _acc(cell: Dict[str, Any]) -> str:
    if cell["test_acc_mean"] is None:
        return f"diverged ({cell['diverged']}/{cell['n']})"
    s = f"{100 * cell['test_acc_mean']:.1f} ± {100 * cell['test_acc_std']:.1f}"
    if cell["diverged"]:
        s += f" ({cell['diverged']}/{cell['n']} diverged)"
    return s


def _lr(cell: Dict[str, Any]) -> str:
    return f"{cell['lr']:g}" + (" (grid edge)" if cell["lr_at_grid_edge"] else "")


def table_rows(result: Dict[str, Any]):
    headers = ["optimizer", "lr (balanced)", "test acc % balanced", "lr (unbalanced)", "test acc % unbalanced",
               "max |test err gap| bal vs unbal", "max rel train-loss gap"]
    rows = []
    for row in result["summary"]:
        rows.append([row["label"], _lr(row["balanced"]), _acc(row["balanced"]), _lr(row["unbalanced"]),
                     _acc(row["unbalanced"]),
                     "n/a" if row["max_abs_test_error_gap"] is None else f"{100 * row['max_abs_test_error_gap']:.2f} pts",
                     "n/a" if row["max_rel_train_loss_gap"] is None else f"{row['max_rel_train_loss_gap']:.2g}"])
    return headers, rows


def markdown(result):
    return md_table(*table_rows(result))


def text(result):
    return text_table(*table_rows(result))


def grid_markdown(result: Dict[str, Any]) -> str:
    headers = ["optimizer", "init"] + ["lr: final val acc %"]
    rows = []
    for name, label in result["labels"].items():
        for init in ("balanced", "unbalanced"):
            cells = []
            for r in result["grid_runs"]:
                if r["optimizer"] == name and r["init"] == init:
                    cells.append(f"{r['lr']:g}: " + ("diverged" if r["diverged"] else f"{100 * (1 - r['val_error'][-1]):.1f}"))
            rows.append([label, init, ", ".join(cells)])
    return md_table(headers, rows)


def plot(result: Dict[str, Any], path: str) -> None:
    import warnings
    from .common import setup_matplotlib
    plt = setup_matplotlib()
    names = list(result["labels"])
    colors = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
    loss_cap = 10.0
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True, sharey="row")
    epochs = np.arange(result["epochs"] + 1)
    for col, init in enumerate(("balanced", "unbalanced")):
        for name in names:
            runs = [r for r in result["runs"] if r["optimizer"] == name and r["init"] == init]
            if not runs:
                continue
            lr = result["chosen_lr"][f"{name}/{init}"]["lr"]
            diverged = sum(r["diverged"] for r in runs)
            label = f"{result['labels'][name]}, lr {lr:g}" + (f" (diverged {diverged}/{len(runs)})" if diverged else "")
            path_sgd = name.startswith("pathsgd")
            for row, key in enumerate(("train_loss", "test_error")):
                vals = np.array([[np.nan if v is None else v for v in r[key]] for r in runs], dtype=float)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(vals, axis=0)
                    lo, hi = np.nanmin(vals, axis=0), np.nanmax(vals, axis=0)
                if key == "test_error":
                    mean, lo, hi = 100 * mean, 100 * lo, 100 * hi
                else:
                    mean, lo, hi = (np.minimum(a, loss_cap) for a in (mean, lo, hi))
                ax = axes[row, col]
                ax.plot(epochs, mean, "-" if path_sgd else "--", color=colors[name], lw=2.4 if path_sgd else 1.4,
                        label=label, zorder=3 if path_sgd else 2)
                ax.fill_between(epochs, lo, hi, color=colors[name], alpha=0.15, lw=0)
        title = ("balanced: PyTorch default initialization" if init == "balanced" else
                 f"unbalanced: same function, hidden units rescaled by\nlog-uniform factors in "
                 f"[{RESCALE_RANGE[0]:g}, {RESCALE_RANGE[1]:g}]")
        axes[0, col].set_title(title, fontsize=9)
        axes[0, col].set_yscale("log")
        axes[0, col].set_ylim(top=loss_cap)
        axes[0, col].set_ylabel(f"training loss (full train split; clipped at {loss_cap:g})")
        axes[1, col].set_ylabel("test error %")
        axes[1, col].set_xlabel("epoch")
        axes[1, col].legend(fontsize=7, loc="upper right")
    axes[1, 0].set_ylim(0, 100)
    fig.suptitle(f"MNIST-1D, {result['model']}, batch {result['batch']}: mean of {len(result['seeds'])} seeds "
                 f"(band: min to max)\nlearning rate chosen per optimizer and initialization on a validation split",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str]) -> None:
    from tqdm import tqdm
    quick = "--quick" in argv
    result = run(epochs=3 if quick else 20, seeds=(0,) if quick else (0, 1, 2), grid_size=1 if quick else None,
                 progress_factory=tqdm, workers=2)
    print(text(result))


if __name__ == "__main__":
    main(sys.argv[1:])
