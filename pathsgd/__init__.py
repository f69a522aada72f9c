"""pathsgd: Path-SGD (path-normalized SGD, Neyshabur et al., NeurIPS 2015) for PyTorch.

    opt = pathsgd.PathSGD(model, lr=0.01, momentum=0.9, p=2, clamp=None)
    pathsgd.path_norm(model)            # differentiable path norm
    pathsgd.path_scales(model)          # {name: kappa}
    pathsgd.clamp_after_step(opt, lo, hi)
"""
from . import ops  # noqa: F401  (loads the compiled extension, or warns why not)
from .clamp import clamp_after_step
from .optimizer import PathSGD, path_sgd
from .scales import path_norm, path_scales

__all__ = ["PathSGD", "path_sgd", "path_norm", "path_scales", "clamp_after_step"]
__version__ = "0.1.0"
