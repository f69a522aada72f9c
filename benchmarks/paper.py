"""The paper's comparison under the paper's protocol (Neyshabur et al., 2015, section 5), on this machine.

Protocol: MLP in-512-512-10 with ReLU; *balanced* initialization = the paper's: weights Gaussian
with std 1/sqrt(fan_in), biases zero; *unbalanced* = the same function after node rescaling (every
hidden unit scaled by a log-uniform factor in [1/100, 100], incoming weights and bias times c,
outgoing weights divided by c). Batch 100, no momentum, no weight decay, cross-entropy, float32.
Step sizes 10^-a in half decades (3 to 1e-4, the same grid for all): each optimizer's is chosen per dataset and initialization by the final validation
accuracy of one run (seed ``GRID_SEED``; ties by validation loss); then ``seeds`` runs with it train on
the training split and are evaluated on the test split after every epoch.

Optimizers: SGD, AdaGrad, PathSGD (p=2) with kappa recomputed every step (``kappa_every=1``, the
paper's algorithm) and with kappa computed once at the first step and kept (``kappa_every=None``).

Datasets: MNIST-1D (generated locally, 3500 train / 500 val / 1000 test sequences of length 40) and
scikit-learn's bundled digits (8x8 images scaled to [0, 1]; fixed split 1197 train / 200 val / 400
test). Reported: training loss (full training split) and test error per epoch (mean and range over
seeds), final test accuracy, the chosen step sizes with the whole grid, and for every optimizer the
first epoch from which its mean training loss stays the lowest of all optimizers (None: never).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import convergence
from .common import md_table, text_table

GRID_SEED = 1000
RESCALE_RANGE = convergence.RESCALE_RANGE
BATCH = 100
HIDDEN = 512
DATASETS = {"mnist1d": "MNIST-1D", "digits": "sklearn digits"}
# Step sizes 10^-a in half decades (the paper's grid is whole decades; a whole-decade grid left SGD at its
# edge and every optimizer one factor of 10 from its best), the same grid for every optimizer.
GRID = [3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4]
OPTIMIZERS: Dict[str, Dict[str, Any]] = {
    "sgd": {"label": "SGD", "grid": GRID},
    "adagrad": {"label": "AdaGrad", "grid": GRID},
    "pathsgd": {"label": "PathSGD (kappa every step)", "grid": GRID},
    "pathsgd_frozen": {"label": "PathSGD (kappa_every=None)", "grid": GRID},
}


def make_optimizer(name: str, model: nn.Module, lr: float):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=lr)
    import pathsgd
    return pathsgd.PathSGD(model, lr=lr, kappa_every=1 if name == "pathsgd" else None)


_DIGITS: Optional[Dict[str, torch.Tensor]] = None


def load_digits() -> Dict[str, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (no download), pixels / 16, fixed split (seed 0)."""
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits as sk_digits
        raw = sk_digits()
        x = torch.as_tensor(raw.data, dtype=torch.float32) / 16.0
        y = torch.as_tensor(raw.target, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        test, val, train = perm[:400], perm[400:600], perm[600:]
        _DIGITS = {"x_train": x[train], "y_train": y[train], "x_val": x[val], "y_val": y[val],
                   "x_test": x[test], "y_test": y[test]}
    return _DIGITS


def load(dataset: str) -> Dict[str, torch.Tensor]:
    return convergence.load_data() if dataset == "mnist1d" else load_digits()


def make_model(dataset: str, seed: int, init: str) -> nn.Sequential:
    data = load(dataset)
    sizes = [data["x_train"].shape[1], HIDDEN, HIDDEN, 10]
    gen = torch.Generator().manual_seed(seed)
    layers: List[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        linear = nn.Linear(fan_in, fan_out)
        with torch.no_grad():  # the paper's initialization
            linear.weight.copy_(torch.randn(fan_out, fan_in, generator=gen) / math.sqrt(fan_in))
            linear.bias.zero_()
        layers += [linear, nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    if init == "unbalanced":
        x = data["x_train"]
        with torch.no_grad():
            before = model(x)
        convergence.unbalance_(model, seed + 7919)
        with torch.no_grad():
            rel = float((model(x) - before).abs().max() / before.abs().max())
        if not rel <= 1e-4:
            raise AssertionError(f"unbalancing changed the function: relative output difference {rel:.3g}")
    return model


def train_run(dataset: str, name: str, lr: float, init: str, seed: int, epochs: int, split: str) -> Dict[str, Any]:
    """One run; training loss and ``split`` loss / error after every epoch (index 0: before training)."""
    t0 = time.perf_counter()
    data = load(dataset)
    model = make_model(dataset, seed, init)
    opt = make_optimizer(name, model, lr)
    train_loss, eval_loss, eval_err, diverged = convergence.train_epochs(
        model, opt, data["x_train"], data["y_train"], data[f"x_{split}"], data[f"y_{split}"], epochs, BATCH, seed)
    return {"dataset": dataset, "optimizer": name, "lr": lr, "init": init, "seed": seed, "split": split,
            "train_loss": train_loss, f"{split}_loss": eval_loss, f"{split}_error": eval_err,
            "diverged": diverged is not None, "diverged_at_epoch": diverged, "time_s": time.perf_counter() - t0}


def _task(args) -> Dict[str, Any]:
    return train_run(*args)


def grid_of(name: str, grid_size: Optional[int] = None) -> List[float]:
    """The step sizes tried (``grid_size``: that many from the middle of the grid, for smoke tests)."""
    grid = OPTIMIZERS[name]["grid"]
    if grid_size is not None and grid_size < len(grid):
        start = (len(grid) - grid_size + 1) // 2
        grid = grid[start:start + grid_size]
    return grid


def run(epochs: Dict[str, int], seeds: Sequence[int] = (0, 1, 2), datasets: Sequence[str] = tuple(DATASETS),
        optimizers: Optional[Sequence[str]] = None, progress_factory: Optional[Callable] = None,
        workers: int = 2, grid_size: Optional[int] = None) -> Dict[str, Any]:
    """The experiment; ``epochs`` per dataset."""
    names = list(optimizers or OPTIMIZERS)
    inits = ("balanced", "unbalanced")
    grid_tasks = [(d, n, lr, init, GRID_SEED, epochs[d], "val") for d in datasets for n in names for init in inits
                  for lr in grid_of(n, grid_size)]
    total = len(grid_tasks) + len(datasets) * len(names) * len(inits) * len(seeds)
    bar = progress_factory(total=total, desc="paper protocol") if progress_factory else None
    with convergence._pool(workers) as pool:
        grid_runs = convergence._map(pool, grid_tasks, bar, _task)
        chosen: Dict[str, Dict[str, Any]] = {}
        for d in datasets:
            for n in names:
                for init in inits:
                    scores = []
                    for r in grid_runs:
                        if (r["dataset"], r["optimizer"], r["init"]) == (d, n, init):
                            acc = -1.0 if r["diverged"] else 1.0 - r["val_error"][-1]
                            loss = r["val_loss"][-1] if math.isfinite(r["val_loss"][-1]) else float("inf")
                            scores.append((acc, -loss, r["lr"]))
                    best = max(scores)
                    grid = grid_of(n, grid_size)
                    chosen[f"{d}/{n}/{init}"] = {"lr": best[2], "val_accuracy": best[0],
                                                 "at_grid_edge": len(grid) > 1 and best[2] in (max(grid), min(grid))}
        final_tasks = [(d, n, chosen[f"{d}/{n}/{init}"]["lr"], init, s, epochs[d], "test") for d in datasets
                       for n in names for init in inits for s in seeds]
        runs = convergence._map(pool, final_tasks, bar, _task)
    if bar:
        bar.close()
    result = {"protocol": __doc__.split("\n\n")[1].replace("\n", " "), "datasets": {d: DATASETS[d] for d in datasets},
              "sizes": {d: [int(load(d)["x_train"].shape[1]), HIDDEN, HIDDEN, 10] for d in datasets},
              "splits": {d: {s: int(len(load(d)[f"x_{s}"])) for s in ("train", "val", "test")} for d in datasets},
              "epochs": dict(epochs), "batch": BATCH, "seeds": list(seeds), "grid_seed": GRID_SEED,
              "grids": {n: grid_of(n, grid_size) for n in names}, "labels": {n: OPTIMIZERS[n]["label"] for n in names},
              "rescale_range": list(RESCALE_RANGE), "chosen_lr": chosen, "grid_runs": grid_runs, "runs": runs,
              "parallelism": f"{workers} worker processes x 1 torch thread" if workers > 1 else "1 process"}
    result["summary"] = summarize(result)
    return result


def _mean_curve(runs: List[Dict[str, Any]], key: str) -> np.ndarray:
    vals = np.array([r[key] for r in runs if not r["diverged"]], dtype=float)
    return vals.mean(axis=0) if len(vals) else np.full(len(runs[0][key]), np.nan)


def lowest_from(curves: Dict[str, np.ndarray]) -> Dict[str, Optional[int]]:
    """For every curve, the first epoch from which it stays the lowest of all (None: it does not end lowest)."""
    names = list(curves)
    stacked = np.stack([np.where(np.isfinite(curves[n]), curves[n], np.inf) for n in names])
    lowest = stacked.argmin(axis=0)
    out: Dict[str, Optional[int]] = {}
    for k, name in enumerate(names):
        if lowest[-1] != k:
            out[name] = None
            continue
        e = len(lowest) - 1
        while e > 0 and lowest[e - 1] == k:
            e -= 1
        out[name] = int(e)
    return out


def summarize(result: Dict[str, Any]) -> Dict[str, Any]:
    summary: Dict[str, Any] = {}
    for d in result["datasets"]:
        per_d: Dict[str, Any] = {}
        for init in ("balanced", "unbalanced"):
            curves, rows = {}, {}
            for n in result["labels"]:
                runs = [r for r in result["runs"] if (r["dataset"], r["optimizer"], r["init"]) == (d, n, init)]
                ok = [r for r in runs if not r["diverged"]]
                accs = [1.0 - r["test_error"][-1] for r in ok]
                curves[n] = _mean_curve(runs, "train_loss")
                rows[n] = {"lr": result["chosen_lr"][f"{d}/{n}/{init}"]["lr"],
                           "lr_at_grid_edge": result["chosen_lr"][f"{d}/{n}/{init}"]["at_grid_edge"],
                           "test_acc_mean": statistics.mean(accs) if accs else None,
                           "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
                           "final_train_loss_mean": float(curves[n][-1]),
                           "diverged": len(runs) - len(ok), "n": len(runs)}
            for n, e in lowest_from(curves).items():
                rows[n]["lowest_train_loss_from_epoch"] = e
            per_d[init] = rows
        summary[d] = per_d
    return summary


def _fmt_acc(row: Dict[str, Any]) -> str:
    if row["test_acc_mean"] is None:
        return f"diverged ({row['diverged']}/{row['n']})"
    s = f"{100 * row['test_acc_mean']:.1f} ± {100 * (row['test_acc_std'] or 0):.1f}"
    return s + (f" ({row['diverged']}/{row['n']} diverged)" if row["diverged"] else "")


def table_rows(result: Dict[str, Any]):
    headers = ["dataset", "optimizer", "lr bal / unbal", "test acc % balanced", "test acc % unbalanced",
               "final train loss bal / unbal", "lowest train loss from epoch bal / unbal"]
    rows = []
    for d, label in result["datasets"].items():
        for n, opt_label in result["labels"].items():
            b, u = result["summary"][d]["balanced"][n], result["summary"][d]["unbalanced"][n]
            lr = f"{b['lr']:g}{'*' if b['lr_at_grid_edge'] else ''} / {u['lr']:g}{'*' if u['lr_at_grid_edge'] else ''}"
            loss = f"{b['final_train_loss_mean']:.3g} / {u['final_train_loss_mean']:.3g}"
            low = " / ".join("never" if r["lowest_train_loss_from_epoch"] is None else
                             str(r["lowest_train_loss_from_epoch"]) for r in (b, u))
            rows.append([f"{label} ({result['epochs'][d]} epochs)", opt_label, lr, _fmt_acc(b), _fmt_acc(u), loss,
                         low])
    return headers, rows


def markdown(result: Dict[str, Any]) -> str:
    return md_table(*table_rows(result))


def text(result: Dict[str, Any]) -> str:
    return text_table(*table_rows(result))


def grid_markdown(result: Dict[str, Any]) -> str:
    rows = []
    for d, label in result["datasets"].items():
        for n, opt_label in result["labels"].items():
            for init in ("balanced", "unbalanced"):
                cells = [f"{r['lr']:g}: " + ("diverged" if r["diverged"] else f"{100 * (1 - r['val_error'][-1]):.1f}")
                         for r in result["grid_runs"] if (r["dataset"], r["optimizer"], r["init"]) == (d, n, init)]
                rows.append([label, opt_label, init, ", ".join(cells)])
    return md_table(["dataset", "optimizer", "init", "step size: final val acc %"], rows)


def plot(result: Dict[str, Any], path: str) -> None:
    """Per dataset: training loss (log) and test error, balanced and unbalanced side by side."""
    import warnings
    from .common import setup_matplotlib
    plt = setup_matplotlib()
    names = list(result["labels"])
    colors = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
    datasets = list(result["datasets"])
    fig, axes = plt.subplots(2 * len(datasets), 2, figsize=(11, 7.5 * len(datasets)), sharey="row")
    axes = np.atleast_2d(axes)
    for k, d in enumerate(datasets):
        epochs = np.arange(result["epochs"][d] + 1)
        for col, init in enumerate(("balanced", "unbalanced")):
            for n in names:
                runs = [r for r in result["runs"] if (r["dataset"], r["optimizer"], r["init"]) == (d, n, init)]
                lr = result["chosen_lr"][f"{d}/{n}/{init}"]["lr"]
                for row, key in enumerate(("train_loss", "test_error")):
                    vals = np.array([r[key] for r in runs], dtype=float) * (100 if key == "test_error" else 1)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        mean, lo, hi = np.nanmean(vals, 0), np.nanmin(vals, 0), np.nanmax(vals, 0)
                    ax = axes[2 * k + row, col]
                    style = "-" if n.startswith("pathsgd") else "--"
                    ax.plot(epochs, mean, style, color=colors[n], lw=2, label=f"{result['labels'][n]}, lr {lr:g}")
                    ax.fill_between(epochs, lo, hi, color=colors[n], alpha=0.15, lw=0)
            top, bottom = axes[2 * k, col], axes[2 * k + 1, col]
            top.set_yscale("log")
            top.set_title(f"{result['datasets'][d]}, {init}", fontsize=10)
            top.set_ylabel("training loss (log)")
            bottom.set_ylabel("test error %")
            bottom.set_xlabel("epoch")
            bottom.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"The paper's protocol: MLP with 2 hidden layers of {HIDDEN}, batch {BATCH}, no momentum; "
                 f"mean of {len(result['seeds'])} seeds (band: min to max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
