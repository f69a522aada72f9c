"""Shared helpers: models, optimizers by name, machine/version info, subprocess workers, tables."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_ROOT = os.path.join(REPO_ROOT, "benchmarks", "results")

# Optimizers timed/measured by the step-time, memory and scaling parts.
OPTIMIZER_LABELS = {
    "sgd_forloop": "torch SGD (for-loop)",
    "sgd_foreach": "torch SGD (foreach)",
    "sgd_fused": "torch SGD (fused)",
    "pathsgd": "PathSGD",
    "pathsgd_reference": "PathSGD (reference backend)",
    "naive": "naive Path-SGD (baseline)",
}


# ----------------------------------------------------------------------------- models

def parse_sizes(sizes: str | Sequence[int]) -> List[int]:
    """``"784-2048-2048-10"`` -> ``[784, 2048, 2048, 10]``."""
    if isinstance(sizes, str):
        return [int(s) for s in sizes.split("-")]
    return [int(s) for s in sizes]


def sizes_str(sizes: Sequence[int]) -> str:
    return "-".join(str(s) for s in sizes)


def mlp(sizes: Sequence[int], bias: bool = True) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear`` with PyTorch's default initialization."""
    sizes = parse_sizes(sizes)
    layers: List[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def num_params(sizes: Sequence[int], bias: bool = True) -> int:
    sizes = parse_sizes(sizes)
    return sum(a * b + (b if bias else 0) for a, b in zip(sizes, sizes[1:]))


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def make_optimizer(name: str, model: nn.Module, lr: float, momentum: float):
    """An optimizer of :data:`OPTIMIZER_LABELS` over all parameters of ``model``.

    ``pathsgd_reference`` is :class:`pathsgd.PathSGD` itself: the caller is responsible for
    running it in a process started with ``PATHSGD_BACKEND=reference``.
    """
    if name == "sgd_forloop":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, foreach=False)
    if name == "sgd_foreach":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, foreach=True)
    if name == "sgd_fused":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, fused=True)
    if name in ("pathsgd", "pathsgd_reference"):
        import pathsgd
        if name == "pathsgd_reference" and pathsgd.ops.compiled_available():
            raise RuntimeError("pathsgd_reference must run in a process with PATHSGD_BACKEND=reference")
        return pathsgd.PathSGD(model, lr=lr, momentum=momentum)
    if name == "naive":
        from .baselines import NaivePathSGD
        return NaivePathSGD(model, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZER_LABELS)}")


def optimizers_for(device: str, include_reference: bool = True, include_naive: bool = True) -> List[str]:
    names = ["sgd_forloop", "sgd_foreach"]
    if device.startswith("cuda"):
        names.append("sgd_fused")
    names.append("pathsgd")
    if include_reference:
        names.append("pathsgd_reference")
    if include_naive:
        names.append("naive")
    return names


# ----------------------------------------------------------------------------- machine info

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def git_commit() -> Dict[str, Any]:
    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=20, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(status) if status is not None else None}


def default_device(full: bool = False) -> str:
    return "cuda" if full and torch.cuda.is_available() else "cpu"


def machine_info(device: str = "cpu") -> Dict[str, Any]:
    """Everything that identifies where and with what a result was measured."""
    import pathsgd
    from pathsgd import ops
    device_type = torch.device(device).type
    info: Dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": cpu_model(),
        "cpu_cores": cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "pathsgd_version": getattr(pathsgd, "__version__", None),
        "device": device,
        "pathsgd_backend": ops.backend_for(device_type),
        "pathsgd_backend_reason": ops.unavailable_reason(device_type),
        "pathsgd_backend_cpu": ops.backend_for("cpu"),
        "git": git_commit(),
        "env": {k: os.environ[k] for k in ("PATHSGD_BACKEND", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def machine_slug(device: str = "cpu") -> str:
    """A short directory-safe name of the machine: the accelerator or CPU model and core count."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = f"{cpu_model()}-{cpu_count()}c"
    name = re.sub(r"\((R|TM)\)|CPU|Processor|@.*?GHz|NVIDIA", "", name, flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "machine"


def today() -> str:
    return datetime.date.today().isoformat()


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- subprocess workers

def run_worker(module: str, config: Dict[str, Any], env: Optional[Dict[str, str]] = None,
               timeout: float = 600) -> Dict[str, Any]:
    """Runs ``python -m benchmarks.<module> --worker <json>`` in a fresh process; returns its JSON.

    The worker prints its result as the last stdout line, prefixed by ``RESULT ``.
    """
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--worker", json.dumps(config)],
                          cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark worker benchmarks.{module} failed (exit {proc.returncode}) for {config}:\n"
                       f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def worker_main(argv: Sequence[str], fn) -> bool:
    """If ``argv`` is ``--worker <json>``, runs ``fn(config)`` and prints ``RESULT <json>``; returns True."""
    if len(argv) >= 2 and argv[0] == "--worker":
        result = fn(json.loads(argv[1]))
        sys.stdout.write("RESULT " + json.dumps(result) + "\n")
        sys.stdout.flush()
        return True
    return False


# ----------------------------------------------------------------------------- formatting

def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|")
    out = ["| " + " | ".join(cell(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(out)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cols = [[str(h)] + [str(r[i]) for r in rows] for i, h in enumerate(headers)]
    widths = [max(len(c) for c in col) for col in cols]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def fmt_ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f}"


def fmt_ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    return f"{sign}{n}"


def setup_matplotlib():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "axes.grid": True, "grid.alpha": 0.3,
                         "font.size": 9})
    return plt
