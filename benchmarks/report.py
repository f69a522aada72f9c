"""report.md from the results dict of :mod:`benchmarks.run` (only measured numbers)."""
from __future__ import annotations

import os
from typing import Any, Dict, List

from . import common


def _machine_lines(results: Dict[str, Any]) -> List[str]:
    m = results["machine"]
    git = m.get("git", {})
    lines = [
        f"- **Machine**: {m['cpu_model']}, {m['cpu_cores']} cores"
        + (f", {', '.join(m['cuda_devices'])}" if m.get("cuda_devices") else "")
        + (f", {m['mem_total_kib'] / 2**20:.1f} GiB RAM" if m.get("mem_total_kib") else "")
        + f" ({m['platform']})",
        f"- **Device**: {results['device']}; torch threads for the timing parts: {results['torch_threads_timing']}; "
        f"worker processes: {results['workers']}",
        f"- **Versions**: torch {m['torch_version']} (CUDA {m['torch_cuda']}), python {m['python']}, "
        f"pathsgd {m['pathsgd_version']}, pathsgd backend on {results['device']}: **{m['pathsgd_backend']}**"
        + (f" ({m['pathsgd_backend_reason']})" if m.get("pathsgd_backend_reason") else ""),
        f"- **Code**: git {git.get('commit')} on {git.get('branch')}"
        + (" (with uncommitted changes to tracked files)" if git.get("dirty") else ""),
        f"- **Run**: `{results['command']}` ({results['mode']} mode), started {results['started']}, "
        f"total **{results['total_seconds'] / 60:.1f} min** ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in results["part_seconds"].items()) + ")",
    ]
    load = results.get("load_average", {})
    if load.get("start"):
        lines.append(f"- **Load average** (1/5/15 min) at start {load['start']}, at end {load.get('end')}")
        worst = max((v[0] for k, v in load.items() if v), default=0.0)
        if worst > 1.5 * m["cpu_cores"]:
            lines.append(f"- **Warning**: the 1-minute load average reached {worst:.1f} on {m['cpu_cores']} cores "
                         "during the run (other processes were running): timings are noisy, compare the ratios "
                         "measured in the same run rather than absolute times.")
    return lines


def _headline(results: Dict[str, Any]) -> List[str]:
    parts = results["parts"]
    lines = []
    st = parts.get("step_time", {}).get("headline")
    if st:
        lines.append(f"- Step time, MLP {st['sizes']}, momentum {st['momentum']}, {st['device']}: PathSGD / torch SGD "
                     f"(foreach) = **{st['pathsgd_over_sgd_foreach']:.2f}x** (target <= {st['target_max']}: "
                     f"{'met' if st['ratio_target_met'] else 'NOT met'})")
        for threads, rep in st.get("repeats", {}).items():
            lines.append(f"  - the same ratio measured {st['repeats_count']} more times in this run (fresh models each "
                         f"time), {threads} thread{'s' if threads != '1' else ''}: median {rep['median_ratio']:.2f}x, "
                         f"range {rep['min_ratio']:.2f}x to {rep['max_ratio']:.2f}x")
        if "pathsgd_speedup_vs_naive" in st:
            lines.append(f"- PathSGD is **{st['pathsgd_speedup_vs_naive']:.1f}x** faster than the naive authors'-style "
                         f"implementation (target >= {st['speedup_target_min']}x: "
                         f"{'met' if st['speedup_target_met'] else 'NOT met'})")
    cnn = parts.get("cnn_step")
    if cnn:
        lines.append(f"- Training step of a small CNN (MNIST-1D, batch {cnn['batch']}, CPU): PathSGD / torch SGD "
                     f"(foreach) = **{cnn['train_step_ratio_median']:.3f}x** (median of {cnn['repeats']} runs, range "
                     f"{cnn['train_step_ratio_min']:.3f}x to {cnn['train_step_ratio_max']:.3f}x; target <= "
                     f"{cnn['target_max_ratio']}: {'met' if cnn['target_met'] else 'NOT met'}); its "
                     f"`optimizer.step()` alone **{cnn['optimizer_step_ratio_median']:.2f}x** (target <= "
                     f"{cnn['step_target_max_ratio']}: {'met' if cnn['step_target_met'] else 'NOT met'})")
    for h in parts.get("memory", {}).get("headline", []):
        lines.append(f"- Peak memory of a training step, MLP {h['sizes']}, momentum {h['momentum']}: PathSGD - torch SGD "
                     f"(foreach) = {common.fmt_bytes(h['pathsgd_over_sgd_bytes'])} = "
                     f"**{h['pathsgd_over_sgd_pct_of_params']:+.2f}% of the parameter bytes** (target < "
                     f"{h['target_max_pct']}%: {'met' if h['target_met'] else 'NOT met'})")
    sc = parts.get("scaling")
    if sc:
        lines.append(f"- Scaling: PathSGD / torch SGD (foreach) between {sc['ratio_min']:.2f}x and {sc['ratio_max']:.2f}x "
                     f"over {sc['points'][0]['params']:,} to {sc['points'][-1]['params']:,} parameters")
    cv = parts.get("convergence")
    if cv:
        for row in cv["summary"]:
            b, u = row["balanced"], row["unbalanced"]

            def acc(c):
                return "diverged" if c["test_acc_mean"] is None else f"{100 * c['test_acc_mean']:.1f}%"
            gap = row["max_abs_test_error_gap"]
            lines.append(f"- MNIST-1D {row['label']}: final test accuracy balanced {acc(b)}, unbalanced {acc(u)}"
                         + (f"; largest same-seed test-error gap between the two curves {100 * gap:.2f} points"
                            if gap is not None else ""))
    return lines


def write_report(results: Dict[str, Any], out: str) -> str:
    parts = results["parts"]
    md: List[str] = ["# pathsgd benchmark report", ""]
    md += _machine_lines(results)
    md += ["", "Reproduce: `make bench` (or `.venv/bin/python -m benchmarks.run` for this default mode; `--quick`, "
           "`--full`). Every number below is in `results.json` next to this file.", "", "## Headline", ""]
    md += _headline(results)

    if "convergence" in parts:
        from . import convergence
        cv = parts["convergence"]
        md += ["", "## 1. Convergence on MNIST-1D: balanced vs unbalanced initialization", "",
               f"{cv['model']}, {cv['dataset']}: {cv['n_train']} training / {cv['n_val']} validation / "
               f"{cv['n_test']} test sequences; batch {cv['batch']}, {cv['epochs']} epochs, seeds {cv['seeds']} "
               f"(learning-rate grid: seed {cv['grid_seed']}, one run per learning rate, selected by final validation "
               f"accuracy per optimizer *and* initialization); {cv['parallelism']}. "
               f"*Unbalanced*: every hidden unit rescaled by a log-uniform factor in "
               f"[{cv['rescale_range'][0]:g}, {cv['rescale_range'][1]:g}] (incoming weights and bias times c, outgoing "
               f"weights divided by c): the same function (largest relative output difference measured: "
               f"{max(r.get('output_rel_diff', 0.0) for r in cv['runs']):.2g}). PathSGD runs with momentum 0 "
               "(the paper's algorithm). A run whose training loss becomes non-finite is stopped and counted as "
               "diverged.", "",
               "Final test accuracy (mean ± std over seeds) and how far the balanced and unbalanced curves of the same "
               "seed are apart (largest difference over epochs of test error, and of training loss relative):", "",
               convergence.markdown(cv), ""]
        differing = [row["label"] for row in cv["summary"] if row["optimizer"].startswith("pathsgd")
                     and row["balanced"]["lr"] != row["unbalanced"]["lr"]]
        if differing:
            md += [f"Note: for {', '.join(differing)} the grid selected different learning rates for the two "
                   "initializations (see the grid below), so part of the gap between its curves comes from the "
                   "learning rate, not from the initialization.", ""]
        md += ["![convergence](convergence.png)", "",
               "Learning-rate grid (final validation accuracy %, seed "
               f"{cv['grid_seed']}):", "", convergence.grid_markdown(cv)]
    if "paper" in parts:
        from . import paper
        pp = parts["paper"]
        md += ["", "## 1b. The paper's protocol: SGD, AdaGrad and PathSGD with two kappa schedules", "",
               pp["protocol"], "",
               f"Splits: {pp['splits']}; epochs {pp['epochs']}; seeds {pp['seeds']} (step-size grid: seed "
               f"{pp['grid_seed']}); {pp['parallelism']}. Final test accuracy (mean ± std over seeds), final training "
               "loss (mean), and the first epoch from which each optimizer's mean training loss stays the lowest of "
               "the four (`never`: it does not end lowest). `*`: the chosen step size is at the edge of the grid.", "",
               paper.markdown(pp), "", "![paper protocol](paper.png)", "",
               "Step-size grid (final validation accuracy %):", "", paper.grid_markdown(pp)]
    if "path_norm" in parts:
        pn = parts["path_norm"]
        rows = [[p, f"{v['median_s']:.3f}", f"{v['min_s']:.3f}", f"{v['log_path_norm']:.6g}"] for p, v in pn["p"].items()]
        from .common import md_table
        md += ["", "## 1c. Path norm of a ResNet-18", "",
               f"`pathsgd.path_norm(model, p, (3, 224, 224), log=True)` on {pn['model']} (`benchmarks/resnet.py`), "
               f"{pn['threads']} threads, the whole call (trace, validation, shape propagation, evaluation), median of "
               f"{pn['repeats']} after one warm-up call. p = inf is the forward max-propagation in log domain.", "",
               md_table(["p", "median s", "min s", "log path norm"], rows)]
    if "step_time" in parts:
        from . import step_time
        st = parts["step_time"]
        md += ["", "## 2. Step time", "",
               f"Median time of `optimizer.step()` (fixed random gradients, lr {st['lr']:g}) from "
               f"`torch.utils.benchmark.Timer.blocked_autorange` (min_run_time {st['min_run_time_s']} s, {st['rounds']} "
               f"rounds in rotating order, pooled) after {st['warmup_steps']} warm-up steps, {st['threads']} threads. "
               "Ratios are to torch SGD (foreach) in the same configuration of the same run; the *paired ratio* is the "
               "median over the rounds of PathSGD's median block over torch SGD (foreach)'s in the same round (a burst "
               "of load on the machine slows both alike). The reference backend "
               "(`PATHSGD_BACKEND=reference`, pure PyTorch) is timed in a subprocess started with that variable, and its "
               "ratio is to torch SGD (foreach) timed in that same subprocess. The naive baseline is "
               "`benchmarks/baselines.py` (deep copy, |w|^p, forward ones, backward, divide, torch SGD).", "",
               step_time.markdown(st), "", "![step time](step_time.png)"]
    if "cnn_step" in parts:
        from . import cnn_step
        cnn = parts["cnn_step"]
        md += ["", "## 2b. Conv net training step", "",
               f"{cnn['model']}, float32, batch {cnn['batch']}, CPU, {cnn['threads']} threads, momentum 0.9, data: "
               f"{cnn['data']}. Whole training step (`zero_grad`, forward, cross-entropy, backward, `step`) and "
               "`optimizer.step()` alone, PathSGD and torch SGD (foreach) interleaved in the same process "
               "(`benchmarks/cnn_step.py`: medians over rounds of `Timer.timeit` blocks; the paired ratio is the "
               "median of per-round ratios); *conv trunk kappas* is the abs-pow network evaluation a PathSGD step "
               f"runs for the convolutions. {cnn['repeats']} independent runs:", "", cnn_step.markdown(cnn)]
    if "scaling" in parts:
        from . import scaling
        sc = parts["scaling"]
        md += ["", "## 3. Scaling", "",
               f"Same method as the step time, momentum {sc['momentum']}, MLP 784-w-w-10:", "",
               scaling.markdown(sc), "", "![scaling](scaling.png)"]
    if "memory" in parts:
        from . import memory
        mem = parts["memory"]
        metric = mem["configs"][0]["optimizers"]["sgd_foreach"]["metric"]
        md += ["", "## 4. Memory", "",
               f"Peak memory of one training step (`zero_grad(set_to_none=True)`, forward, backward, `step`; batch "
               f"{mem['batch']}) measured as {metric}, each configuration in a fresh process ({mem['processes']} per "
               f"configuration, {mem['repeats_per_process']} measured steps each after {mem['warmup_steps']} warm-up "
               "steps, median), every process with the same modules imported and every optimizer's code path run "
               f"once on a tiny MLP first; workers run with {mem['worker_env']}. Shown: the step's peak, its excess over "
               "torch SGD (foreach) with the same momentum, and that excess as % of the parameter bytes. Differences "
               "of a few hundred KiB are at the noise level of RSS.", "",
               memory.markdown(mem), "", "![memory](memory.png)"]
    md.append("")
    text = "\n".join(md)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    return text
