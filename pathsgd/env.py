"""``python -m pathsgd.env``: versions, built kernels, and the backend of each device."""
from __future__ import annotations

import platform
import sys

import torch

from . import ops


def report() -> str:
    lines = [
        f"python        {sys.version.split()[0]} ({platform.platform()})",
        f"torch         {torch.__version__} (CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()})",
    ]
    try:
        from . import _build_info
        lines.append(f"built against torch {_build_info.TORCH_VERSION}, CUDA kernels built: {_build_info.CUDA_BUILT}"
                     f" (CUDA {_build_info.CUDA_VERSION})")
    except ImportError:
        lines.append("built against (no build info: the extension was never built here)")
    lines.append(f"extension     {'loaded' if ops.compiled_available() else 'NOT loaded: ' + str(ops._UNAVAILABLE_REASON)}")
    if ops.compiled_available():
        from . import _C
        lines.append(f"CPU kernels   {'OpenMP, ' + str(torch.get_num_threads()) + ' threads' if _C.WITH_OPENMP else 'one thread (built without OpenMP)'}")
    for device_type in ("cpu", "cuda"):
        reason = ops.unavailable_reason(device_type)
        lines.append(f"backend {device_type:5} {ops.backend_for(device_type)}" + (f" ({reason})" if reason else ""))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"cuda:{i}        {torch.cuda.get_device_name(i)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
