"""A user's first hour: ordinary PyTorch training code, run as written, checking real numbers."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pathsgd
from pathsgd import reference

from conftest import make_mlp, set_random_grads


def params(model):
    return {n: t.detach().clone() for n, t in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------
# Drop-in signature
# ---------------------------------------------------------------------------------------------------------------
def test_signature_and_defaults_are_torch_sgds():
    ours = inspect.signature(pathsgd.PathSGD).parameters
    for name, theirs in inspect.signature(torch.optim.SGD).parameters.items():
        if name == "params":
            continue
        assert name in ours, f"torch.optim.SGD's argument {name} is missing"
        assert ours[name].default == theirs.default, (name, ours[name].default, theirs.default)
        assert ours[name].kind == theirs.kind, (name, ours[name].kind, theirs.kind)


def test_default_step_is_plain_path_sgd():
    """PathSGD(model) with the defaults: lr 1e-3, no momentum (w <- w - 1e-3 g / kappa), no buffer."""
    model = make_mlp((3, 4, 2), seed=1)
    twin = copy.deepcopy(model)
    set_random_grads(model, seed=2)
    set_random_grads(twin, seed=2)
    kappas = pathsgd.path_scales(twin, 2)
    pathsgd.PathSGD(model).step()
    for name, t in twin.named_parameters():
        expected = t - 1e-3 * t.grad / kappas[name].clamp_min(1e-12)
        torch.testing.assert_close(dict(model.named_parameters())[name], expected, rtol=1e-12, atol=1e-15)


def test_foreach_false_steps_with_the_reference_ops(monkeypatch):
    calls = []
    for name in ("gamma_forward", "fused_dense_step_"):
        original = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    model = make_mlp((5, 7, 3), seed=3)
    twin = copy.deepcopy(model)
    for flags in (dict(foreach=False), dict(fused=False)):
        calls.clear()
        opt = pathsgd.PathSGD(model, lr=0.01, momentum=0.9, **flags)
        set_random_grads(model, seed=4)
        opt.step()
        assert "fused_dense_step_" in calls, flags
    calls.clear()
    for _ in range(2):  # the same two first steps on the compiled kernels
        set_random_grads(twin, seed=4)
        opt_twin = pathsgd.PathSGD(twin, lr=0.01, momentum=0.9, foreach=True)
        opt_twin.step()
    if pathsgd.ops.has_kernel("cpu"):
        assert calls == [], "foreach=True must use the compiled kernels"
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m: f"{name}: {m}")


def test_differentiable_and_foreach_with_fused_refused():
    model = make_mlp((3, 4, 2))
    with pytest.raises(ValueError, match="differentiable=True"):
        pathsgd.PathSGD(model, differentiable=True)
    with pytest.raises(ValueError, match="cannot be `True` together"):
        pathsgd.PathSGD(model, foreach=True, fused=True)


def test_py_typed_marker_ships():
    import importlib.resources
    assert importlib.resources.files("pathsgd").joinpath("py.typed").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Changing dtype / device after steps
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_model_cast_after_momentum_steps_carries_on_like_torch(dtype):
    """model.double() / .to(torch.bfloat16) after momentum steps: the buffers follow the parameters, as
    torch.optim's load_state_dict casts them, and training continues."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    opt = pathsgd.PathSGD(model, lr=0.01, momentum=0.9)
    opt_twin = pathsgd.PathSGD(twin, lr=0.01, momentum=0.9)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for m, o in ((model, opt), (twin, opt_twin)):
        for _ in range(3):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    model.to(dtype)
    twin.to(dtype)
    opt_twin.load_state_dict(opt_twin.state_dict())  # torch's way: casts the buffers to the parameters
    for m, o in ((model, opt), (twin, opt_twin)):
        for _ in range(3):
            o.zero_grad()
            F.cross_entropy(m(x.to(dtype)), y).backward()
            o.step()
    for name, t in model.named_parameters():
        assert opt.state[t]["momentum_buffer"].dtype == dtype, name
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------------------------
# torch.compile'd models
# ---------------------------------------------------------------------------------------------------------------
def test_compiled_model_is_unwrapped_and_trains_like_the_eager_one():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    opt = pathsgd.PathSGD(compiled, lr=0.01)
    opt_eager = pathsgd.PathSGD(eager, lr=0.01)
    assert pathsgd.path_norm(compiled).item() == pytest.approx(pathsgd.path_norm(eager).item(), rel=1e-12)
    x, y = torch.randn(8, 10), torch.randint(0, 4, (8,))
    start = params(model)
    try:
        for _ in range(3):
            for m, o in ((compiled, opt), (eager, opt_eager)):
                o.zero_grad()
                F.cross_entropy(m(x), y).backward()
                o.step()
    finally:
        torch._dynamo.reset()
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert (model[0].weight - start["0.weight"]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm in a normal training loop
# ---------------------------------------------------------------------------------------------------------------
class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.flatten(F.relu(self.bn(self.conv(x))), 1)))


def _fix_from(message: str) -> str:
    """The code block of an error message (the lines after its blank line)."""
    return message.split("\n\n", 1)[1].strip()


def test_batchnorm_message_shows_the_fix_and_the_fix_works():
    torch.manual_seed(0)
    model = BNNet()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    with torch.no_grad():  # some running statistics, as after a pre-training phase
        model(x)
    with pytest.raises(ValueError, match="training mode") as info:
        pathsgd.PathSGD(model, lr=0.01, input_shape=(1, 8, 8))
    fix = _fix_from(str(info.value))
    assert "m.eval()" in fix and "requires_grad_(False)" in fix
    exec(fix, {"model": model, "torch": torch})
    opt = pathsgd.PathSGD(model, lr=0.01, input_shape=(1, 8, 8))
    losses = []
    for epoch in range(3):
        model.train()  # the usual loop: BatchNorm goes back to training mode ...
        if epoch == 0:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            fc_before = model.fc.weight.clone()
            with pytest.raises(ValueError, match="training mode") as info:
                opt.step()
            assert torch.equal(model.fc.weight, fc_before), "a refused step must change nothing"
            assert _fix_from(str(info.value)) == fix
            bn_before = {n: t.clone() for n, t in model.bn.state_dict().items()}
        exec(fix, {"model": model, "torch": torch})  # ... and the message's fix, after model.train()
        assert model.drop.training and not model.bn.training
        for _ in range(5):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, t in model.bn.state_dict().items():  # BatchNorm stayed frozen
        assert torch.equal(t, bn_before[n]), n
    # the README shows the same snippet
    import pathlib
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert fix in readme


# ---------------------------------------------------------------------------------------------------------------
# Output transforms: the pytorch/examples MNIST Net, verbatim
# ---------------------------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


class LogitsNet(Net):
    """The same network without its output transform."""

    def forward(self, x):
        x = torch.flatten(F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2), 1)
        return self.fc2(F.relu(self.fc1(x)))


def test_mnist_example_net_with_log_softmax_trains_like_its_logits():
    torch.manual_seed(1)
    net = Net()
    logits_net = LogitsNet()
    logits_net.load_state_dict(net.state_dict())
    kappa = pathsgd.path_scales(net, 2, (1, 28, 28))
    kappa_logits = pathsgd.path_scales(logits_net, 2, (1, 28, 28))
    for name in kappa_logits:
        torch.testing.assert_close(kappa[name], kappa_logits[name], rtol=1e-12, atol=0)
    assert float(kappa["conv1.weight"].max()) > 0
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    net.eval()  # dropout off, so both nets see the same function
    opt = pathsgd.PathSGD(net, lr=1e-4, momentum=0.9)  # the input shape comes from the forward input
    opt_logits = pathsgd.PathSGD(logits_net, lr=1e-4, momentum=0.9, input_shape=(1, 28, 28))
    logits_net.eval()
    for _ in range(2):
        opt.zero_grad()
        F.nll_loss(net(x), y).backward()  # as in pytorch/examples
        opt.step()
        opt_logits.zero_grad()
        F.cross_entropy(logits_net(x), y).backward()
        opt_logits.step()
    for (name, a), b in zip(net.named_parameters(), logits_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert (net.fc2.weight - LogitsNet().fc2.weight).abs().max() > 0


@pytest.mark.parametrize("transform", [lambda x: torch.softmax(x, 1), torch.sigmoid, torch.tanh,
                                       lambda x: x.log_softmax(-1), nn.LogSoftmax(dim=1)],
                         ids=["softmax", "sigmoid", "tanh", "log_softmax-method", "LogSoftmax-module"])
def test_output_transforms_leave_kappa_of_the_logits(transform):
    class WithTransform(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = make_mlp((4, 6, 3), seed=5)
            self.out = transform if isinstance(transform, nn.Module) else None

        def forward(self, x):
            y = self.body(x)
            return self.out(y) if self.out is not None else transform(y)

    model = WithTransform()
    got = pathsgd.path_scales(model, 2)
    want = pathsgd.path_scales(model.body, 2)
    for name, k in want.items():
        torch.testing.assert_close(got[f"body.{name}"], k, rtol=0, atol=0)


def test_transform_between_layers_is_still_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2), nn.LogSoftmax(dim=1))
    with pytest.raises(ValueError, match=r"'1' \(Sigmoid\).*between weighted layers.*output transforms"):
        pathsgd.PathSGD(model)


# ---------------------------------------------------------------------------------------------------------------
# PReLU: a pass-through unit whose slope takes the plain gradient
# ---------------------------------------------------------------------------------------------------------------
def _prelu_net(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.PReLU(7), nn.Linear(7, 6), nn.PReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.05, 0.5)
        model[3].weight.fill_(0.3)
    return model


def _rescaled(model, seed):
    """Node rescaling of every hidden unit by c in [0.1, 10]: incoming weights and bias times c,
    outgoing weights times 1/c; PReLU slopes unchanged. The function is the same."""
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, j in ((0, 2), (2, 4)):
            c = torch.exp(torch.empty(twin[i].out_features, dtype=torch.float64).uniform_(-2.3, 2.3, generator=gen))
            twin[i].weight.mul_(c[:, None])
            twin[i].bias.mul_(c)
            twin[j].weight.div_(c[None, :])
    return twin


def test_prelu_net_is_rescaling_invariant_and_updates_its_slopes():
    model = _prelu_net(0)
    twin = _rescaled(model, 1)
    gen = torch.Generator().manual_seed(2)
    x_test = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    batches = [(torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen))
               for _ in range(40)]
    torch.testing.assert_close(model(x_test), twin(x_test), rtol=1e-12, atol=1e-12)
    slopes = model[1].weight.detach().clone()

    def train(m, opt):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()

    sgd_a, sgd_b = copy.deepcopy(model), copy.deepcopy(twin)  # negative control: plain SGD drifts apart
    train(sgd_a, torch.optim.SGD(sgd_a.parameters(), lr=0.05, momentum=0.9))
    train(sgd_b, torch.optim.SGD(sgd_b.parameters(), lr=0.05, momentum=0.9))
    assert (sgd_a(x_test) - sgd_b(x_test)).abs().max() > 1e-3

    train(model, pathsgd.PathSGD(model, lr=0.01, momentum=0.9, weight_decay=1e-4))
    train(twin, pathsgd.PathSGD(twin, lr=0.01, momentum=0.9, weight_decay=1e-4))
    torch.testing.assert_close(model(x_test), twin(x_test), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(model[1].weight, twin[1].weight, rtol=1e-9, atol=1e-12)
    assert (model[1].weight - slopes).abs().max() > 1e-3, "the slopes must be trained"


def test_prelu_slope_takes_the_plain_sgd_update():
    model = _prelu_net(3)
    twin = copy.deepcopy(model)
    set_random_grads(model, seed=4)
    set_random_grads(twin, seed=4)
    kappas = pathsgd.path_scales(twin, 2)
    assert "1.weight" not in kappas  # a slope is not on any path
    pathsgd.PathSGD(model, lr=0.1, eps=10.0).step()  # eps only bounds kappa^(2/p) of path weights
    for name, t in twin.named_parameters():
        scale = kappas[name].clamp_min(10.0) if name in kappas else 1.0
        torch.testing.assert_close(dict(model.named_parameters())[name], t - 0.1 * t.grad / scale,
                                   rtol=1e-12, atol=1e-15, msg=lambda m: f"{name}: {m}")


class AttentionBlock(nn.Module):
    """Attention as users write it, in a block with data-dependent control flow (fx cannot trace it)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.abs().max() > 10:  # data-dependent: fx fails inside this block
            x = x / 10
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(out)


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(8, 8), AttentionBlock(), nn.Flatten(), nn.Linear(24, 2)),
                                   nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
                                                 nn.Flatten(), nn.Linear(24, 2))],
                         ids=["block-with-mask", "TransformerEncoderLayer"])
def test_attention_is_reported_as_attention(model):
    with pytest.raises(ValueError, match="attention multiplies activations") as info:
        pathsgd.PathSGD(model, input_shape=(3, 8))
    assert "control flow" not in str(info.value)
    assert "MultiheadAttention" in str(info.value) or "TransformerEncoderLayer" in str(info.value)


def test_source_tree_shadowing_the_installed_package_is_explained(tmp_path):
    """`python -m pathsgd.env` from a source checkout without the built extension says why."""
    import shutil
    import subprocess
    import sys
    src = __import__("pathlib").Path(pathsgd.__file__).parent
    shutil.copytree(src, tmp_path / "pathsgd", ignore=shutil.ignore_patterns("_C*", "__pycache__", "_build_info.py"))
    (tmp_path / "setup.py").write_text("# a source checkout\n")
    # `python -m pathsgd.env` as after a regular (not editable) install: no editable-install finder
    run_env = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
               "repr(f).lower()]; sys.path.insert(0, ''); runpy.run_module('pathsgd.env', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", run_env], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in __import__("os").environ.items() if k != "PATHSGD_BACKEND"})
    assert proc.returncode == 0, proc.stderr
    assert "shadows the installed package" in proc.stdout and "backend cpu   reference" in proc.stdout
    assert "circular import" not in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# Input shape without ceremony
# ---------------------------------------------------------------------------------------------------------------
def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)).double()


def _train_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("size", [8, 13])
def test_conv_net_without_input_shape_uses_the_forward_input(size):
    """PathSGD(cnn) with no input_shape steps exactly like PathSGD(cnn, input_shape=the real shape)."""
    model = small_cnn()
    twin = copy.deepcopy(model)
    opt = pathsgd.PathSGD(model, lr=0.01, momentum=0.9)
    opt_twin = pathsgd.PathSGD(twin, lr=0.01, momentum=0.9, input_shape=(1, size, size))
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(6, 1, size, size, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (6,), generator=gen)
        _train_step(model, opt, x, y)
        _train_step(twin, opt_twin, x, y)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_fully_convolutional_net_gets_the_kappa_of_each_batch_size():
    """Fed 8x8 and 32x32 batches in turn, each step uses the kappa of the batch that made the gradients."""
    model = small_cnn()
    opt = pathsgd.PathSGD(model, lr=0.01)
    gen = torch.Generator().manual_seed(2)
    for size in (8, 32, 8, 32):
        x = torch.randn(4, 1, size, size, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (4,), generator=gen)
        expected = copy.deepcopy(model)
        kappa = pathsgd.path_scales(expected, 2, (1, size, size))
        F.cross_entropy(expected(x), y).backward()
        with torch.no_grad():
            for name, t in expected.named_parameters():
                t -= 0.01 * t.grad / kappa[name].clamp_min(1e-12)
        _train_step(model, opt, x, y)
        for (name, a), b in zip(model.named_parameters(), expected.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=lambda m: f"size {size}, {name}: {m}")
    k8 = pathsgd.path_scales(model, 2, (1, 8, 8))["0.weight"]
    k32 = pathsgd.path_scales(model, 2, (1, 32, 32))["0.weight"]
    assert float((k8 / k32).min()) > 5  # really different graphs (adaptive pooling averages 16x more)


def test_wrong_input_shape_is_an_error_before_anything_changes():
    model = small_cnn()
    opt = pathsgd.PathSGD(model, lr=0.01, momentum=0.9, input_shape=(1, 8, 8))
    x, y = torch.randn(4, 1, 32, 32, dtype=torch.float64), torch.randint(0, 3, (4,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before = params(model)
    with pytest.raises(ValueError, match=r"input_shape=\(1, 8, 8\).*\(1, 32, 32\)"):
        opt.step()
    assert all(torch.equal(before[n], t) for n, t in model.named_parameters()) and not opt.state


def test_step_before_any_forward_says_what_to_do():
    model = small_cnn()
    opt = pathsgd.PathSGD(model, lr=0.01)
    set_random_grads(model, seed=0)
    with pytest.raises(ValueError, match="has not run yet.*input_shape"):
        opt.step()


@pytest.mark.parametrize("fn", [pathsgd.path_norm, pathsgd.path_scales, pathsgd.path_magnitudes])
def test_path_norm_of_a_conv_net_without_input_shape_says_which_shape(fn):
    """The path-norm tools have no forward input to follow: the error names the first convolution and
    the shape to pass; passing it works."""
    model = small_cnn()
    with pytest.raises(ValueError, match=r"input_shape.*required.*'0' is a Conv2d with 1 input channels: pass "
                                         r"input_shape=\(1, H, W\)"):
        fn(model, 2)
    out = fn(model, 2, (1, 8, 8))
    value = out if isinstance(out, torch.Tensor) else out["0.weight"]
    assert bool((value > 0).all()) and bool(torch.isfinite(value).all())


def test_input_shape_hook_goes_with_the_optimizer():
    import gc
    model = small_cnn()
    opt = pathsgd.PathSGD(model, lr=0.01)
    assert len(model._forward_pre_hooks) == 1
    del opt
    gc.collect()
    assert len(model._forward_pre_hooks) == 0
