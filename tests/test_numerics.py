"""Numerical robustness: log-scaled gammas on 100-layer nets, dead units, extreme weights,
non-finite gradients (same as torch SGD), and check_finite."""
import math

import pytest
import torch
import torch.nn as nn

import pathsgd


def _log_kappas_float64(linears, p):
    """Independent float64 log-domain kappa: log gamma via logsumexp, never leaving range."""
    log_gin = [torch.zeros(linears[0].in_features, dtype=torch.float64)]
    for lin in linears:
        logw = p * lin.weight.detach().double().abs().log()  # -inf for zero weights
        z = torch.logsumexp(logw + log_gin[-1].unsqueeze(0), dim=1)
        if lin.bias is not None:
            z = torch.logaddexp(z, p * lin.bias.detach().double().abs().log())
        log_gin.append(z)
    log_gout = torch.zeros(linears[-1].out_features, dtype=torch.float64)
    out = {}
    for i in reversed(range(len(linears))):
        lin = linears[i]
        out[(i, "weight")] = log_gout.unsqueeze(1) + log_gin[i].unsqueeze(0)
        if lin.bias is not None:
            out[(i, "bias")] = log_gout.clone()
        logw = p * lin.weight.detach().double().abs().log()
        log_gout = torch.logsumexp(logw + log_gout.unsqueeze(1), dim=0)
    return out, log_gin


def _deep_rescaled_mlp(depth=100, width=8, peak_log10=25.0, seed=0):
    """A float32 MLP whose hidden units are node-rescaled by up to 10**peak_log10 at mid-depth.

    Balanced, its weights are near-identity, so activations and gammas stay O(1). After
    rescaling, activations reach ~1e25 (in float32 range) while gamma_in reaches ~1e50 and
    gamma_out ~1e-50 (p=2): outside float32.
    """
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(width) + 0.05 * torch.randn(width, width))
            lin.bias.copy_(0.01 * torch.rand(width))
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    linears = [m for m in model if isinstance(m, nn.Linear)]
    half = depth // 2
    log10_c = [peak_log10 * min(l, depth - 1 - l) / half for l in range(depth)]  # hidden layer l scale
    with torch.no_grad():
        for l in range(depth - 1):  # units after linears[l] are hidden units
            c = 10.0 ** log10_c[l]
            linears[l].weight.mul_(c / (10.0 ** log10_c[l - 1] if l > 0 else 1.0))
            linears[l].bias.mul_(c)
        linears[-1].weight.div_(10.0 ** log10_c[depth - 2])
    return model, linears


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_100_layer_float32_step_matches_log_domain_reference(p):
    # p=1 needs a larger rescaling for |w|^p products to leave float32 range.
    model, linears = _deep_rescaled_mlp(peak_log10=25.0 if p == 2 else 37.0)
    log_kappa, log_gin = _log_kappas_float64(linears, p)
    assert max(float(v.max()) for v in log_gin) / math.log(10) > 39, "gamma_in must leave float32 range"
    x = torch.rand(16, 8)
    out = model(x)
    assert torch.isfinite(out).all()
    out.pow(2).mean().backward()
    before = [(l.weight.detach().double().clone(), l.bias.detach().double().clone()) for l in linears]
    grads = [(l.weight.grad.double().clone(), l.bias.grad.double().clone()) for l in linears]
    lr = 1e-3
    pathsgd.PathSGD(model, lr=lr, momentum=0.0, p=p).step()
    for i, lin in enumerate(linears):
        for j, name in enumerate(("weight", "bias")):
            w0, g = before[i][j], grads[i][j]
            expected = w0 - lr * g / (log_kappa[(i, name)] * (2.0 / p)).exp().clamp_min(1e-12)
            got = getattr(lin, name).detach().double()
            assert torch.isfinite(got).all()
            delta_got, delta_exp = got - w0, expected - w0
            # The update itself (not just the weight) must match within 1e-3 relative.
            scale = delta_exp.abs().max().clamp_min(1e-30)
            err = float(((delta_got - delta_exp).abs().max() / scale))
            assert err < 1e-3 or float((got - expected).abs().max() / expected.abs().max()) < 1e-6, (i, name, err)


def test_path_scales_of_deep_net_are_finite_float64():
    model, linears = _deep_rescaled_mlp()
    log_kappa, _ = _log_kappas_float64(linears, 2.0)
    scales = pathsgd.path_scales(model, p=2)
    for i in (0, 49, 99):
        k = scales[f"{2 * i}.weight"]
        assert k.dtype == torch.float64 and torch.isfinite(k).all()
        torch.testing.assert_close(k.log(), log_kappa[(i, "weight")], rtol=0, atol=1e-8)


def test_dead_units_zero_layers_and_extreme_weights_give_finite_steps():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight[2].zero_()      # dead unit: no incoming weights
        model[0].bias[2] = 0
        model[2].weight[:, 4].zero_()   # dead unit: no outgoing weights
        model[2].weight[0] *= 1e15      # huge
        model[4].weight[1] *= 1e-15     # tiny
    x = torch.randn(4, 5)
    model(x).sum().backward()
    pathsgd.PathSGD(model, lr=0.01, momentum=0.9).step()
    assert all(torch.isfinite(t).all() for t in model.parameters())
    # An all-zero layer: every path is dead; kappa is 0 outside the zero layer, the step stays finite.
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
    model.zero_grad()
    model(x).sum().backward()
    pathsgd.PathSGD(model, lr=0.01, momentum=0.9).step()
    assert all(torch.isfinite(t).all() for t in model.parameters())


def test_non_finite_gradients_behave_like_torch_sgd():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    twin = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    twin.load_state_dict(model.state_dict())
    kappas = pathsgd.path_scales(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    for m in (model, twin):
        m(x).sum().backward()
        m[0].weight.grad[1, 2] = float("nan")
        m[2].weight.grad[0, 1] = float("inf")
    for name, t in twin.named_parameters():
        t.grad = t.grad / kappas[name].clamp_min(1e-12)
    pathsgd.PathSGD(model, lr=0.1, momentum=0.9).step()
    torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9).step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        assert torch.equal(torch.isinf(a), torch.isinf(b)), name
        torch.testing.assert_close(a[torch.isfinite(a)], b[torch.isfinite(b)], rtol=1e-12, atol=1e-14)


def test_check_finite_raises_before_anything_changes():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    model(torch.randn(2, 3)).sum().backward()
    opt = pathsgd.PathSGD(model, lr=0.1, momentum=0.9, check_finite=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"'2\.weight'.*non-finite"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) or (torch.isnan(v) == torch.isnan(before[k])).all()
    assert len(opt.state) == 0


def test_check_finite_names_a_non_finite_prelu_slope():
    """A PReLU slope is a parameter the step updates (unscaled): check_finite covers it as well."""
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2))
    model(torch.randn(2, 3)).sum().backward()
    opt = pathsgd.PathSGD(model, lr=0.1, check_finite=True)
    opt.step()  # finite: steps
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"'1\.weight'.*non-finite"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) or bool(torch.isnan(v).all()), k
