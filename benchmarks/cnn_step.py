"""Training-step time of a small 1-D CNN on MNIST-1D: PathSGD vs torch.optim.SGD.

Model (input (1, 40)): Conv1d(1,32,5,p=2)-ReLU-Conv1d(32,32,3,p=1)-ReLU-MaxPool1d(2)-Conv1d(32,32,3,p=1)-ReLU-
Flatten-Linear(640,128)-ReLU-Linear(128,10); float32, CPU, batch 128, momentum 0.9, lr 0.01.

What is timed (torch.utils.benchmark ``Timer.timeit`` blocks of ~0.1 s (train steps ~0.3 s) after warm-up
steps; both optimizers in the same process, interleaved: ``rounds`` rounds, each timing one block of every
function in rotating order, so a machine busy with other jobs slows all of them alike; the median over the
blocks is reported, and the median of the per-round PathSGD/SGD ratios as a paired check):

* ``train step``: ``zero_grad`` + forward + cross-entropy + backward + ``step`` on MNIST-1D batches
  (cycled; random data of the same shape if mnist1d cannot generate them). Target: PathSGD
  <= 1.10x torch SGD (foreach).
* ``optimizer.step() only``: the step on fixed gradients, every block from the state after the warm-up
  steps (restored before each block). Momentum entries of units whose gradient became zero decay into
  subnormal numbers and stay there (0.9 x 4 ulps rounds back to 4 ulps); each costs a microcode assist
  per arithmetic op, which slowed both optimizers' steps 2x to 5x and made this ratio depend on how
  long the process had trained (the counts are reported). Target: <= 2.5x torch SGD (foreach).
* ``conv path scales``: the abs-pow network (float64, all-ones input) a PathSGD step runs for the conv
  trunk (the tape evaluator's forward and backward up to the head input, seeded with ones there; the
  dense head itself is the fused kernels' work), the whole network's kappas with the tape and with
  autograd, its forward alone, and the public ``pathsgd.path_scales`` (which also fx-traces and
  validates the model), reported separately.

``python -m benchmarks.cnn_step [--quick] [--threads N] [--rounds R] [--profile]`` prints a table and
writes ``benchmarks/results/cnn_step.json``; ``--profile`` adds a torch.profiler breakdown of
``PathSGD.step()``.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from .common import RESULTS_ROOT, machine_info, now, text_table

INPUT_SHAPE = (1, 40)
BATCH = 128
LR = 0.01
MOMENTUM = 0.9
TARGET_RATIO = 1.10       # train step, PathSGD / torch SGD (foreach)
STEP_TARGET_RATIO = 2.5   # optimizer.step() alone
TRUNK_ROW = "trunk forward + backward: conv trunk, VJP tape (a step's share, with the evaluator's Python)"


def make_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
        nn.Conv1d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 20, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )


def mnist1d_batches(n_batches: int, seed: int = 0) -> (List[tuple], str):
    """``n_batches`` training batches of MNIST-1D (generated locally by the mnist1d package)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
        args = get_dataset_args()
        args.num_samples = max(1000, int(n_batches * BATCH / args.train_split) + 1)
        args.seed = seed
        data = make_dataset(args)
        x = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(data["y"], dtype=torch.long)
        source = f"mnist1d.make_dataset (num_samples={args.num_samples}, seed={seed})"
    except Exception as exc:  # pragma: no cover - the benchmark does not depend on the values
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n_batches * BATCH, *INPUT_SHAPE, generator=gen)
        y = torch.randint(0, 10, (n_batches * BATCH,), generator=gen)
        source = f"random (mnist1d unavailable: {type(exc).__name__}: {exc})"
    batches = [(x[i * BATCH:(i + 1) * BATCH].contiguous(), y[i * BATCH:(i + 1) * BATCH].contiguous())
               for i in range(min(n_batches, len(x) // BATCH))]
    return batches, source


def make_optimizer(name: str, model: nn.Module):
    if name == "sgd_foreach":
        return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, foreach=True)
    if name == "pathsgd":
        import pathsgd
        return pathsgd.PathSGD(model, lr=LR, momentum=MOMENTUM, input_shape=INPUT_SHAPE)
    raise ValueError(name)


LABELS = {"sgd_foreach": "torch SGD (foreach)", "pathsgd": "PathSGD"}


class Setup:
    """A model, its optimizer and the closures that are timed."""

    def __init__(self, name: str, batches: List[tuple], warmup: int) -> None:
        self.name = name
        self.model = make_cnn()
        self.opt = make_optimizer(name, self.model)
        self.batches = itertools.cycle(batches)
        for _ in range(warmup):
            self.train_step()

    def train_step(self) -> None:
        x, y = next(self.batches)
        self.opt.zero_grad()
        F.cross_entropy(self.model(x), y).backward()
        self.opt.step()

    def opt_step(self) -> None:
        self.opt.step()

    def snapshot(self) -> None:
        """Keeps the parameters, gradients and momentum buffers, for :meth:`restore`."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        self._saved = [(p, p.detach().clone(), p.grad.clone(), self.opt.state[p]["momentum_buffer"].clone())
                       for p in params]

    def restore(self) -> None:
        """Back to :meth:`snapshot`'s values, in place (the optimizer keeps the same tensors)."""
        with torch.no_grad():
            for p, value, grad, buffer in self._saved:
                p.copy_(value)
                p.grad.copy_(grad)
                self.opt.state[p]["momentum_buffer"].copy_(buffer)

    def subnormal_buffer_entries(self) -> int:
        """Momentum-buffer entries that are subnormal numbers (each costs a microcode assist per op)."""
        tiny = torch.finfo(torch.float32).tiny
        bufs = [s["momentum_buffer"] for s in self.opt.state.values() if "momentum_buffer" in s]
        return sum(int(((b.abs() < tiny) & (b != 0)).sum()) for b in bufs)


def _stats(times: List[float]) -> Dict[str, Any]:
    times = sorted(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "iqr_s": q[2] - q[0], "min_s": times[0], "n_blocks": len(times)}


def _measure(fns: Dict[str, Callable[[], None]], rounds: int, block_s: float, threads: int,
             resets: Dict[str, Callable[[], None]] | None = None) -> Dict[str, Any]:
    """Interleaved blocks: every round times each function once (``Timer.timeit`` of a ~``block_s`` block),
    in rotating order, so a machine busy with other jobs loads all of them alike. Per-function medians over
    the blocks, plus the median over rounds of each function's ratio to the first one (paired by round).
    ``resets[name]`` runs (untimed) before each of that function's blocks."""
    resets = resets or {}
    timers = {k: Timer("fn()", setup="reset()", globals={"fn": f, "reset": resets.get(k, lambda: None)},
                       num_threads=threads) for k, f in fns.items()}
    number = {}
    for k, t in timers.items():  # calibrate the block size
        est = t.timeit(1).mean
        number[k] = max(1, int(block_s / max(est, 1e-7)))
    blocks: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            blocks[name].append(timers[name].timeit(number[name]).mean)
    out = {k: {**_stats(v), "calls_per_block": number[k]} for k, v in blocks.items()}
    base = names[0]
    for k in names[1:]:
        out[k]["paired_ratio_median"] = statistics.median(a / b for a, b in zip(blocks[k], blocks[base]))
    return out


def cprofile_step(setup: Setup, steps: int = 200, limit: int = 20) -> List[Dict[str, Any]]:
    """cProfile of PathSGD.step() on fixed gradients: the top functions by own time, per step."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        setup.opt_step()
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:limit]
    return [{"function": f"{os.path.relpath(f) if f.startswith('/') else f}:{line}({name})",
             "calls_per_step": nc / steps, "own_us_per_step": tt / steps * 1e6, "cum_us_per_step": ct / steps * 1e6}
            for (f, line, name), (cc, nc, tt, ct, _) in rows]


def profile_step(setup: Setup, steps: int = 30, row_limit: int = 25) -> Dict[str, Any]:
    """torch.profiler breakdown of PathSGD.step() on fixed gradients (self CPU time per op), plus cProfile."""
    from torch.profiler import ProfilerActivity, profile, record_function
    graph = setup.opt.graph
    for _ in range(3):
        setup.opt_step()
    cprof = cprofile_step(setup)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("PathSGD.step"):
                setup.opt_step()
    events = prof.key_averages()
    total = next((e.cpu_time_total for e in events if e.key == "PathSGD.step"), None)
    rows = sorted((e for e in events if e.key != "PathSGD.step"), key=lambda e: e.self_cpu_time_total, reverse=True)
    table = events.table(sort_by="self_cpu_time_total", row_limit=row_limit)
    return {"steps": steps, "step_cpu_time_us": total / steps if total else None,
            "ops": [{"op": e.key, "calls_per_step": e.count / steps,
                     "self_cpu_us_per_step": e.self_cpu_time_total / steps} for e in rows[:row_limit]],
            "graph_type": type(graph).__name__, "table": table, "cprofile": cprof}


def _autograd_kappas(graph: Any) -> None:
    from pathsgd import functional, graph as ir
    with ir.use_evaluator("autograd"):
        evaluator = functional.evaluator_for(graph, None, frozenset())
    evaluator.backward(evaluator.forward(2.0))


def run(rounds: int = 30, block_s: float = 0.1, warmup: int = 10, threads: int | None = None,
        do_profile: bool = False) -> Dict[str, Any]:
    import pathsgd
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    load_before = list(os.getloadavg())
    batches, source = mnist1d_batches(6)
    setups = {name: Setup(name, batches, warmup) for name in ("sgd_foreach", "pathsgd")}

    # Every block of steps on fixed gradients starts from the state after the warm-up steps: the
    # momentum entries of units whose gradient became zero decay into subnormal numbers (stuck at a few
    # ulps: 0.9 x 4 ulps rounds back to 4 ulps), which slowed both optimizers' steps 2x to 5x, by how
    # many of them the training so far made (reported at the end of the train-step timing).
    for s in setups.values():
        s.snapshot()
    subnormal = {"after_warmup": {n: s.subnormal_buffer_entries() for n, s in setups.items()}}
    train = _measure({n: s.train_step for n, s in setups.items()}, rounds, 3 * block_s, threads)
    subnormal["after_train_step_timing"] = {n: s.subnormal_buffer_entries() for n, s in setups.items()}
    step = _measure({n: s.opt_step for n, s in setups.items()}, rounds, block_s, threads,
                    resets={n: s.restore for n, s in setups.items()})

    ps = setups["pathsgd"]
    graph = ps.opt.graph
    fused = graph.dense_layers
    from pathsgd import functional
    trunk = functional.evaluator_for(graph, graph.head_input, frozenset())
    whole = functional.evaluator_for(graph, None, frozenset())

    def trunk_kappas() -> None:  # the head's gamma_out replaced by ones
        acts = trunk.forward(2.0)
        trunk.backward(acts, torch.ones_like(acts.env[graph.head_input]))

    model = ps.model
    scales = _measure({
        TRUNK_ROW: trunk_kappas,
        "all kappas, VJP tape": lambda: whole.backward(whole.forward(2.0)),
        "all kappas, autograd": lambda: _autograd_kappas(graph),
        "forward only (VJP tape's forward)": lambda: whole.forward(2.0),
        "pathsgd.path_scales (fx trace + validate + evaluate)": lambda: pathsgd.path_scales(model, 2, INPUT_SHAPE),
    }, max(3, rounds // 3), block_s, threads)

    base_train = train["sgd_foreach"]["median_s"]
    base_step = step["sgd_foreach"]["median_s"]
    ratio = train["pathsgd"]["median_s"] / base_train
    result: Dict[str, Any] = {
        "what": "median over interleaved rounds of the mean time per call of a torch.utils.benchmark "
                "Timer.timeit block",
        "model": "Conv1d(1,32,5,p=2)-ReLU-Conv1d(32,32,3,p=1)-ReLU-MaxPool1d(2)-Conv1d(32,32,3,p=1)-ReLU-Flatten-"
                 "Linear(640,128)-ReLU-Linear(128,10)",
        "params": sum(p.numel() for p in model.parameters()),
        "input_shape": list(INPUT_SHAPE), "batch": BATCH, "lr": LR, "momentum": MOMENTUM, "dtype": "float32",
        "data": source, "rounds": rounds, "block_s": block_s, "warmup_steps": warmup, "threads": threads,
        "graph_type": type(graph).__name__, "fused_linears": sorted(fused),
        "train_step": train, "optimizer_step": step, "path_scales": scales,
        "optimizer_step_state": "restored before every block (the state after the warm-up steps)",
        "subnormal_momentum_entries_at_step_timing": subnormal,
        "train_step_ratio": ratio,
        "train_step_paired_ratio_median": train["pathsgd"]["paired_ratio_median"],
        "optimizer_step_ratio": step["pathsgd"]["median_s"] / base_step,
        "step_overhead_over_sgd_s": step["pathsgd"]["median_s"] - base_step,
        "trunk_kappas_share_of_pathsgd_step": scales[TRUNK_ROW]["median_s"] / step["pathsgd"]["median_s"],
        "target_max_ratio": TARGET_RATIO, "target_met": ratio <= TARGET_RATIO,
        "step_target_max_ratio": STEP_TARGET_RATIO,
        "step_target_met": step["pathsgd"]["median_s"] / base_step <= STEP_TARGET_RATIO,
        "weights_finite": bool(all(torch.isfinite(p).all() for s in setups.values() for p in s.model.parameters())),
        "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
        "time": now(),
    }
    if do_profile:
        result["profile"] = profile_step(ps)
    return result


def suite_part(rounds: int, block_s: float, repeats: int, threads: int | None = None) -> Dict[str, Any]:
    """``repeats`` independent runs (fresh models each), for the benchmark suite: the train-step
    ratio is close to the target, so its spread over runs is reported, not one draw."""
    runs = [run(rounds=rounds, block_s=block_s, threads=threads) for _ in range(repeats)]
    ratios = [r["train_step_ratio"] for r in runs]
    step_ratios = [r["optimizer_step_ratio"] for r in runs]
    return {"runs": runs, "repeats": repeats, "train_step_ratios": ratios,
            "optimizer_step_ratios": step_ratios, "optimizer_step_ratio_median": statistics.median(step_ratios),
            "step_target_max_ratio": STEP_TARGET_RATIO,
            "step_target_met": statistics.median(step_ratios) <= STEP_TARGET_RATIO,
            "train_step_ratio_median": statistics.median(ratios), "train_step_ratio_min": min(ratios),
            "train_step_ratio_max": max(ratios), "target_max_ratio": TARGET_RATIO,
            "target_met": statistics.median(ratios) <= TARGET_RATIO, "model": runs[0]["model"],
            "batch": BATCH, "threads": runs[0]["threads"], "data": runs[0]["data"]}


def markdown(part: Dict[str, Any]) -> str:
    """The suite report's table: every run's medians, then the ratios."""
    ms = lambda s: f"{s * 1e3:.3f}"  # noqa: E731
    head = "| run | SGD train step ms | PathSGD train step ms | ratio (paired) | SGD step ms | PathSGD step ms | " \
           "step ratio | conv trunk kappas ms |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for i, r in enumerate(part["runs"]):
        tr, st = r["train_step"], r["optimizer_step"]
        lines.append(f"| {i + 1} | {ms(tr['sgd_foreach']['median_s'])} | {ms(tr['pathsgd']['median_s'])} | "
                     f"{r['train_step_ratio']:.3f}x ({r['train_step_paired_ratio_median']:.3f}x) | "
                     f"{ms(st['sgd_foreach']['median_s'])} | {ms(st['pathsgd']['median_s'])} | "
                     f"{r['optimizer_step_ratio']:.2f}x | {ms(r['path_scales'][TRUNK_ROW]['median_s'])} |")
    return "\n".join(lines)


def table(result: Dict[str, Any]) -> str:
    ms = lambda s: f"{s * 1e3:.3f}"  # noqa: E731
    rows = []
    for what, key in (("train step (zero_grad+fwd+CE+bwd+step)", "train_step"), ("optimizer.step() only",
                                                                                     "optimizer_step")):
        base = result[key]["sgd_foreach"]["median_s"]
        for name in ("sgd_foreach", "pathsgd"):
            t = result[key][name]
            rows.append([what, LABELS[name], ms(t["median_s"]), ms(t["iqr_s"]), f"{t['median_s'] / base:.3f}x"])
    for name, t in result["path_scales"].items():
        rows.append(["conv path scales", name, ms(t["median_s"]), ms(t["iqr_s"]), ""])
    return text_table(["what", "optimizer / call", "median ms", "IQR ms", "ratio to SGD"], rows)


def main(argv: Sequence[str]) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 rounds of 0.05 s blocks")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds (one block per function each)")
    ap.add_argument("--block", type=float, default=0.1, help="seconds per timed block (train steps: 3x)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--profile", action="store_true", help="add a torch.profiler breakdown of PathSGD.step()")
    ap.add_argument("--out", default=os.path.join(RESULTS_ROOT, "cnn_step.json"))
    args = ap.parse_args(argv)
    rounds, block = (5, 0.05) if args.quick else (args.rounds, args.block)
    t0 = time.time()
    result = run(rounds=rounds, block_s=block, threads=args.threads, do_profile=args.profile)
    result["wall_s"] = time.time() - t0
    result["machine"] = machine_info("cpu")
    print(f"MNIST-1D CNN ({result['params']} params), batch {BATCH}, CPU, {result['threads']} threads, "
          f"momentum {MOMENTUM}; data: {result['data']}")
    print(table(result))
    print(f"PathSGD / SGD train step: {result['train_step_ratio']:.3f}x (paired per-round median "
          f"{result['train_step_paired_ratio_median']:.3f}x; target <= {TARGET_RATIO}x: "
          f"{'met' if result['target_met'] else 'MISSED'}); step() {result['optimizer_step_ratio']:.2f}x (target <= "
          f"{STEP_TARGET_RATIO}x: {'met' if result['step_target_met'] else 'MISSED'}); conv trunk kappas = "
          f"{100 * result['trunk_kappas_share_of_pathsgd_step']:.0f}% of PathSGD.step(); load avg "
          f"{result['load_average_before'][0]:.2f} -> {result['load_average_after'][0]:.2f}")
    if "profile" in result:
        print(result["profile"]["table"])
        print(text_table(["function (cProfile of PathSGD.step)", "calls/step", "own us/step", "cum us/step"],
                         [[r["function"], f"{r['calls_per_step']:.0f}", f"{r['own_us_per_step']:.0f}",
                           f"{r['cum_us_per_step']:.0f}"] for r in result["profile"]["cprofile"]]))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {os.path.relpath(args.out)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
