"""WGAN with weight clipping (Arjovsky, Chintala & Bottou, 2017) on a ring of 8 Gaussians.

The critic is trained with ``torch.optim.RMSprop(lr=5e-5)`` and its weights are clipped to
``[-0.01, 0.01]`` after every step by ``pathsgd.clamp_after_step`` (one fused multi-tensor
clamp per step, for any optimizer); ``n_critic = 5`` critic steps per generator step. Runs
on CPU in a few minutes (about 4.5 min on one core; ``--quick``: about 15 s) and saves a PNG of
real vs generated samples. As in the WGAN reference code, the critic gets 100 steps per generator
step for the first 25 generator steps and every 500th (``--critic-warmup 0`` turns that off). Both
networks are 3-hidden-layer ReLU MLPs of width 256; the generator maps 8-D Gaussian noise and uses
RMSprop(lr=1e-4)::

    python examples/wgan_clip.py                       # full run -> examples/wgan_clip.png
    python examples/wgan_clip.py --quick --out /tmp/wgan.png --save-critic /tmp/critic.pt

Pitfalls of weight clipping, and how pathsgd avoids them
--------------------------------------------------------
* **Clip after the step, not before.** Clipping before ``optimizer.step()`` lets the update
  push the weights out of the box again, so the critic the generator trains against is not in
  the clipped (Lipschitz-bounded) family and the estimate of the Wasserstein distance is off.
  ``clamp_after_step`` registers a step *post*-hook: it clips right after every step, only the
  parameters the step updated (those with a gradient), with no extra line in the training loop.
  (If the step is skipped, e.g. by a ``GradScaler`` on an inf gradient, the hook does not run
  and the weights are untouched.) The Path-SGD optimizer has the same built in:
  ``pathsgd.PathSGD(critic, clamp=0.01)``.
* **Every parameter is clipped by default, BatchNorm's too.** A critic with ``BatchNorm`` (or
  LayerNorm) layers would get its affine ``weight`` (initialized to 1) clamped to 0.01 as well,
  which silently rescales every normalized activation by 1/100. Pass ``params=`` to clip only
  the layers you mean, e.g.
  ``clamp_after_step(opt, -0.01, 0.01, params=[p for m in critic.modules()
  if isinstance(m, (nn.Linear, nn.Conv2d)) for p in m.parameters(recurse=False)])``.
  (The WGAN reference code clips every critic parameter, BatchNorm's included: decide deliberately.)
* **Momentum-free optimizer.** The paper found momentum-based optimizers (Adam) unstable with
  clipping, hence RMSprop with a small learning rate; the generator uses RMSprop too.
* **The clip value is a trade-off** (paper, section 3): a large box takes the weights long to
  reach, so the critic is slow to approach optimality; a small one shrinks the critic's output and
  gradients (RMSprop normalizes the step size, so tiny gradients are fine here). Wide critic
  layers keep enough capacity inside the box.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pathsgd  # noqa: E402

CLIP = 0.01
N_MODES = 8
RADIUS = 2.0
STD = 0.05


def modes() -> torch.Tensor:
    angles = torch.arange(N_MODES, dtype=torch.float32) * (2 * math.pi / N_MODES)
    return RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)


def sample_real(n: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(N_MODES, (n,), generator=gen)
    return modes()[idx] + STD * torch.randn(n, 2, generator=gen)


def mlp(d_in: int, width: int, d_out: int, depth: int = 3) -> nn.Sequential:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def fit_metrics(samples: torch.Tensor) -> dict:
    """Mean distance to the nearest mode, modes covered (>= 2% of samples within 4 std), precision."""
    d = torch.cdist(samples, modes())
    nearest, which = d.min(dim=1)
    close = nearest < 4 * STD
    counts = torch.bincount(which[close], minlength=N_MODES)
    return dict(mean_dist=float(nearest.mean()), modes_covered=int((counts >= 0.02 * len(samples)).sum()),
                high_quality=float(close.float().mean()))


def plot(real: torch.Tensor, fake: torch.Tensor, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.scatter(real[:, 0], real[:, 1], s=4, alpha=0.35, c="tab:blue", label="real")
    ax.scatter(fake[:, 0], fake[:, 1], s=4, alpha=0.35, c="tab:orange", label="generated")
    m = modes()
    ax.scatter(m[:, 0], m[:, 1], s=25, marker="x", c="black", label="mode centres")
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=2, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="generator steps (default 6000, --quick 400)")
    parser.add_argument("--quick", action="store_true", help="short smoke run (~15 s, width 128, 400 steps) for tests")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "wgan_clip.png"))
    parser.add_argument("--save-critic", default=None, help="save the critic's state_dict here")
    parser.add_argument("--summary", default=None, help="write the metrics as JSON here")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n-critic", type=int, default=5)
    parser.add_argument("--critic-lr", type=float, default=5e-5)
    parser.add_argument("--gen-lr", type=float, default=1e-4)
    parser.add_argument("--width", type=int, default=None, help="hidden width (default 256, --quick 128)")
    parser.add_argument("--z-dim", type=int, default=8)
    parser.add_argument("--critic-warmup", type=int, default=1,
                        help="1: 100 critic steps for the first 25 generator steps and every 500th (WGAN reference code)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these matmuls are too small to gain from more)")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (400 if args.quick else 6000)
    width = args.width if args.width is not None else (128 if args.quick else 256)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen_data = torch.Generator().manual_seed(args.seed + 1)
    z_dim = args.z_dim
    generator = mlp(z_dim, width, 2)
    critic = mlp(2, width, 1)
    critic_opt = torch.optim.RMSprop(critic.parameters(), lr=args.critic_lr)
    pathsgd.clamp_after_step(critic_opt, -CLIP, CLIP)  # clip AFTER every critic step
    gen_opt = torch.optim.RMSprop(generator.parameters(), lr=args.gen_lr)
    with torch.no_grad():  # start inside the box too (the first step would clip anyway)
        for prm in critic.parameters():
            prm.clamp_(-CLIP, CLIP)

    z_eval = torch.randn(2000, z_dim, generator=torch.Generator().manual_seed(12345))
    with torch.no_grad():
        initial = fit_metrics(generator(z_eval))
    warmup = 5 if args.quick else 25  # --quick: a shorter critic warm-up
    t0 = time.time()
    for step in range(steps):
        # As in the WGAN reference code: 100 critic steps for the first 25 generator steps and every
        # 500th, so the generator trains against a near-optimal critic; n_critic otherwise.
        n_critic = 100 if args.critic_warmup and (step < warmup or step % 500 == 0) else args.n_critic
        for _ in range(n_critic):
            real = sample_real(args.batch, gen_data)
            with torch.no_grad():
                fake = generator(torch.randn(args.batch, z_dim))
            critic_opt.zero_grad()
            f_real, f_fake = critic(torch.cat([real, fake])).split(args.batch)  # one forward for both
            loss_c = f_fake.mean() - f_real.mean()  # maximize E[f(real)] - E[f(fake)]
            loss_c.backward()
            critic_opt.step()  # clamp_after_step clips here
        gen_opt.zero_grad()
        loss_g = -critic(generator(torch.randn(args.batch, z_dim))).mean()
        loss_g.backward()
        gen_opt.step()
        if (step + 1) % max(1, steps // 10) == 0 or step == steps - 1:
            with torch.no_grad():
                m = fit_metrics(generator(z_eval))
            print(f"step {step + 1:5d}/{steps}  W estimate {-float(loss_c.detach()):.5f}  mean dist {m['mean_dist']:.3f}  "
                  f"modes {m['modes_covered']}/8  high quality {m['high_quality']:.2f}  ({time.time() - t0:.0f} s)",
                  flush=True)

    with torch.no_grad():
        fake = generator(z_eval)
        final = fit_metrics(fake)
        max_abs = max(float(prm.abs().max()) for prm in critic.parameters())
    real = sample_real(2000, torch.Generator().manual_seed(54321))
    title = (f"WGAN, weight clipping [-{CLIP}, {CLIP}], RMSprop, n_critic={args.n_critic}, {steps} generator steps\n"
             f"modes covered {final['modes_covered']}/8, mean distance to nearest mode {final['mean_dist']:.3f}")
    plot(real, fake, args.out, title)
    summary = dict(steps=steps, seconds=time.time() - t0, initial=initial, final=final, critic_max_abs=max_abs,
                   out=args.out)
    if args.save_critic:
        torch.save(critic.state_dict(), args.save_critic)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
    print(f"critic max |w| = {max_abs:.6f} (clip {CLIP}); initial mean dist {initial['mean_dist']:.3f} -> final "
          f"{final['mean_dist']:.3f}; saved {args.out}")
    return summary


if __name__ == "__main__":
    main()
