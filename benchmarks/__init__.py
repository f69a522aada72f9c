"""pathsgd benchmark suite: ``python -m benchmarks.run [--quick | --full] [--out DIR]``.

Parts: step time (:mod:`benchmarks.step_time`), peak memory (:mod:`benchmarks.memory`),
convergence on MNIST-1D (:mod:`benchmarks.convergence`), step time vs size
(:mod:`benchmarks.scaling`); the authors'-style naive Path-SGD baseline is in
:mod:`benchmarks.baselines`. Results go to ``benchmarks/results/<machine>-<date>/``.
"""
