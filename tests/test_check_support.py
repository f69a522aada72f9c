"""pathsgd.check_support: every reason a model is not supported, without raising."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import pathsgd


class ThreeProblems(nn.Module):
    """A LayerNorm, a GELU between layers and a BatchNorm in training mode: three different problems."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 8)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm1d(8)
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc3(self.bn(self.act(self.fc2(self.norm(self.fc1(x))))))


def test_three_problems_are_all_listed_and_the_errors_name_the_first():
    model = ThreeProblems()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    problems = pathsgd.check_support(model)
    assert len(problems) == 3, problems
    for needles, problem in zip([("'norm'", "LayerNorm", "normaliz", "supported:"),
                                 ("'act'", "GELU", "homogeneous", "supported:"),
                                 ("'bn'", "BatchNorm1d", "training mode", "m.eval()")], problems):
        assert all(n in problem for n in needles), (needles, problem)
    # none of the three modules' parameters is reported again as "not on any path"
    assert not any("not on any" in p for p in problems)
    for call in (lambda: pathsgd.PathSGD(model, lr=0.1), lambda: pathsgd.path_norm(model)):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == problems[0]
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items()) and model.training


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
    nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2), nn.LogSoftmax(1)),
    nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2)),
], ids=["mlp", "cnn-log-softmax", "prelu"])
def test_supported_models_give_an_empty_list(model):
    assert pathsgd.check_support(model) == []
    assert pathsgd.check_support(model, input_shape=(1, 8) if isinstance(model[0], nn.Conv1d) else (3,)) == []


def test_untraceable_model_and_wrong_input_shape():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    (problem,) = pathsgd.check_support(Gate())
    assert "control flow" in problem
    cnn = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(12, 2))
    (problem,) = pathsgd.check_support(cnn, input_shape=(1, 9))
    assert "(1, 9)" in problem and "inconsistent" in problem


def test_unused_parameter_and_problem_module_together():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.emb = nn.Embedding(4, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) + self.emb(x.long().clamp(0, 3)).sum(1)

    problems = pathsgd.check_support(Net())
    assert any("'emb'" in p and "Embedding" in p for p in problems), problems
    assert any("unused.weight" in p and "not on any" in p for p in problems), problems
    assert not any("emb.weight" in p and "not on any" in p for p in problems), problems
