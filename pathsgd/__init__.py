"""pathsgd: Path-SGD (path-normalized SGD, Neyshabur et al., NeurIPS 2015) for PyTorch.

    opt = pathsgd.PathSGD(model, lr=1e-3, momentum=0, p=2, clamp=None)   # torch.optim.SGD's signature
    pathsgd.path_norm(model, p=2)      # differentiable path norm, any p in [0, inf]
    pathsgd.path_norms(model, [1, 2, float("inf")])  # several exponents, one trace
    pathsgd.path_scales(model)          # {name: kappa}
    pathsgd.path_magnitudes(model)      # {name: |w|^p kappa}: each weight's share of phi_p^p
    pathsgd.check_support(model)       # every reason a model is not supported ([] if it is)
    pathsgd.clamp_after_step(opt, lo, hi)
"""
from . import ops  # noqa: F401  (loads the compiled extension, or warns why not)
from .clamp import clamp_after_step
from .optimizer import PathSGD
from .scales import check_support, path_magnitudes, path_norm, path_norms, path_scales

# The functional step (pathsgd.functional.path_sgd) works on a path graph and per-parameter updates,
# not on plain lists like torch.optim.sgd.sgd, so it is not part of the public API.
__all__ = ["PathSGD", "path_norm", "path_norms", "path_scales", "path_magnitudes", "check_support",
           "clamp_after_step"]
__version__ = "0.1.0"
