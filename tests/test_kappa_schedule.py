"""PathSGD(kappa_every=...): kappa recomputed every N steps (1: the paper's algorithm) or once (None).

* SGD parity against the brute-force oracle with the kappa of the last refresh step;
* rescaling invariance for kappa_every in {1, 7, None} (float64, momentum, weight decay), with a
  negative control (a stored kappa that does not transform with the rescaling breaks it);
* state_dict resume in the middle of an interval is bit-identical to an uninterrupted run
  (float32 parameters: the float64 kappas and log scales keep their dtype);
* a step between refreshes runs no path-graph evaluation and no gamma forward.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

import pathsgd
from pathsgd import ops

from conftest import brute_force, make_mlp, set_random_grads
from test_optimizer import max_rel_diff, rescaled_copy, train_both

EPS = 1e-12


def _refresh_steps(every, steps):
    return [s for s in range(steps) if s == 0 or (every is not None and s % every == 0)]


@pytest.mark.parametrize("every", [1, 3, None])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_kappa_every_matches_brute_force_with_the_stored_kappa(every, p):
    model = make_mlp((3, 4, 3, 2), seed=p)
    twin = copy.deepcopy(model)
    hyper = dict(lr=0.02, momentum=0.9, weight_decay=1e-2)
    opt = pathsgd.PathSGD(model, p=p, kappa_every=every, **hyper)
    sgd = torch.optim.SGD(twin.parameters(), **hyper)
    refresh = _refresh_steps(every, 8)
    kappa = None
    for step in range(8):
        set_random_grads(model, seed=100 + step)
        set_random_grads(twin, seed=100 + step)
        if step in refresh:
            kappa = brute_force(twin, p)[1]  # from the weights before this step
        with torch.no_grad():
            for name, t in twin.named_parameters():
                t.grad = t.grad / kappa[name].pow(2.0 / p).clamp_min(EPS)
        opt.step()
        sgd.step()
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=lambda m: f"step {step} {name}: {m}")
    assert all(opt.state[t]["kappa_age"] == 8 - refresh[-1] for t in model.parameters()) if every != 1 else True


def _cnn(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(3, 4, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 2)).to(dtype)


@pytest.mark.parametrize("every", [2, None])
def test_kappa_every_conv_net_uses_the_kappa_of_its_last_refresh(every):
    """A CNN (conv trunk and dense head): kappa from pathsgd.path_scales (checked against unrolled
    graphs in test_general_graphs.py) at each refresh step, SGD on g / kappa^(2/p) in between."""
    model = _cnn()
    twin = copy.deepcopy(model)
    opt = pathsgd.PathSGD(model, lr=0.01, momentum=0.9, kappa_every=every, input_shape=(2, 8))
    sgd = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)
    refresh, kappa = _refresh_steps(every, 6), None
    for step in range(6):
        set_random_grads(model, seed=step)
        set_random_grads(twin, seed=step)
        if step in refresh:
            kappa = pathsgd.path_scales(twin, 2, (2, 8))
        with torch.no_grad():
            for name, t in twin.named_parameters():
                t.grad = t.grad / kappa[name].clamp_min(EPS)
        opt.step()
        sgd.step()
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=lambda m: f"step {step} {name}: {m}")


def test_kappa_every_changes_the_trajectory():
    """Not vacuous: with kappa kept, the weights differ from the every-step algorithm's."""
    finals = []
    for every in (1, 4):
        model = make_mlp((3, 8, 2), seed=0)
        opt = pathsgd.PathSGD(model, lr=0.05, kappa_every=every)
        for step in range(6):
            set_random_grads(model, seed=step)
            opt.step()
        finals.append(torch.cat([t.detach().flatten() for t in model.parameters()]))
    assert max_rel_diff(finals[0], finals[1]) > 1e-4


@pytest.mark.parametrize("every", [1, 7, None])
def test_rescaling_invariance_with_kappa_every(every):
    model = make_mlp((6, 16, 16, 3), seed=11)
    twin = rescaled_copy(model, seed=12)
    x_test = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    f0 = model(x_test).detach()
    train_both(model, twin, lambda m: pathsgd.PathSGD(m, lr=0.01, momentum=0.9, weight_decay=1e-3,
                                                      kappa_every=every), seed=14)
    f1, f2 = model(x_test).detach(), twin(x_test).detach()
    assert max_rel_diff(f1, f0) > 0.1, "training did not change the function"
    assert max_rel_diff(f1, f2) < 1e-8


def test_rescaling_negative_control_foreign_stored_kappa():
    """The stored kappa must be the twin's own: given the unrescaled model's kappa, the rescaled
    twin drifts away (so the invariance above comes from kappa transforming with the rescaling)."""
    model = make_mlp((6, 16, 16, 3), seed=11)
    twin = rescaled_copy(model, seed=12)
    x_test = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    opts = [pathsgd.PathSGD(m, lr=0.01, momentum=0.9, kappa_every=None) for m in (model, twin)]
    gen = torch.Generator().manual_seed(14)
    for step in range(30):
        x = torch.randn(32, 6, generator=gen, dtype=torch.float64)
        y = torch.randn(32, 3, generator=gen, dtype=torch.float64)
        for m, o in zip((model, twin), opts):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
        if step == 0:  # swap in the other network's kappa
            for a, b in zip(model.parameters(), twin.parameters()):
                for key in ("gamma_in", "gamma_in_log_scale", "gamma_out", "gamma_out_log_scale", "kappa"):
                    if key in opts[0].state[a]:
                        opts[1].state[b][key] = opts[0].state[a][key].clone()
    f1, f2 = model(x_test).detach(), twin(x_test).detach()
    assert torch.isfinite(f2).all()
    assert max_rel_diff(f1, f2) > 1e-3


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_state_dict_resume_mid_interval_is_bit_identical(kind):
    make = (lambda: make_mlp((5, 7, 3), seed=2, dtype=torch.float32)) if kind == "mlp" else \
        (lambda: _cnn(seed=2, dtype=torch.float32))
    kw = dict(lr=0.01, momentum=0.9, weight_decay=1e-3, kappa_every=4)
    if kind == "cnn":
        kw["input_shape"] = (2, 8)

    def run(model, opt, steps):
        for step in steps:
            set_random_grads(model, seed=step)
            opt.step()

    straight = make()
    opt = pathsgd.PathSGD(straight, **kw)
    run(straight, opt, range(10))
    first = make()
    opt = pathsgd.PathSGD(first, **kw)
    run(first, opt, range(6))  # refreshed at steps 0 and 4: two steps into an interval
    saved_model, saved_opt = _roundtrip(first.state_dict()), _roundtrip(opt.state_dict())
    dtypes = {k for s in saved_opt["state"].values() for k, v in s.items()
              if torch.is_tensor(v) and v.dtype == torch.float64}
    assert dtypes == ({"gamma_in_log_scale", "gamma_out_log_scale"} | ({"kappa"}))
    resumed = make()
    resumed.load_state_dict(saved_model)
    opt = pathsgd.PathSGD(resumed, **kw)
    opt.load_state_dict(saved_opt)
    for t in resumed.parameters():
        state = opt.state[t]
        for key, value in state.items():
            if key in ("kappa", "gamma_in_log_scale", "gamma_out_log_scale"):
                assert value.dtype == torch.float64, key  # not cast to the parameters' float32
    run(resumed, opt, range(6, 10))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_steps_between_refreshes_evaluate_nothing(monkeypatch):
    model = make_mlp((4, 6, 3), seed=0)
    opt = pathsgd.PathSGD(model, lr=0.01, kappa_every=None)
    calls = []
    for name in ("gamma_forward", "dense_chain_step_", "abs_pow_vjp"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    set_random_grads(model, seed=0)
    opt.step()
    assert calls, "the first step computes kappa"
    calls.clear()
    for step in range(1, 4):
        set_random_grads(model, seed=step)
        opt.step()
    assert calls == []


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_bad_kappa_every_raises(bad):
    with pytest.raises(ValueError, match="kappa_every"):
        pathsgd.PathSGD(make_mlp((3, 2)), lr=0.1, kappa_every=bad)
