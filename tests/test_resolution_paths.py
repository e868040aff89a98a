"""A run at data.resolution=20 through the commands that rebuild its model or re-read its data:
quantize (the int8 net and its digits at 20x20), distillation (a teacher at the student's side,
and one at another side refused), and the report's predict (the model built at the input's side)."""
import json

import numpy as np
import pytest
import torch

from backproplab.cli import main
from backproplab.commands.quantize import load_trained
from backproplab.config import apply_overrides, preset
from backproplab.engine.evaluate import predict
from backproplab.engine.population import Population
from backproplab.errors import UserError

SMALL = ["model.name=convnet", "model.dropout=0", "train.shift=0", "data.n_train=160", "data.n_test=60",
         "train.passes=1", "train.eval_every=100"]


@pytest.fixture(scope="module")
def run20(tmp_path_factory):
    d = tmp_path_factory.mktemp("r20")
    assert main(["train", "modern", "--quiet", "--out", str(d), "data.resolution=20", *SMALL]) == 0
    return d


def test_predict_builds_the_model_at_the_inputs_side(run20):
    rec, cfg, reps = load_trained(run20)
    pop = Population(cfg, [cfg.train.seed])
    x = torch.rand(5, 1, 20, 20) * 2 - 1
    w = torch.cat([torch.as_tensor(np.asarray(reps[0][n])).reshape(-1) for n in pop.names])
    pop.W.copy_(w[None])
    torch.testing.assert_close(predict(cfg.model, reps[0], x), pop.outputs(x)[0], rtol=1e-5, atol=1e-5)


def test_quantize_a_run_at_20x20(run20, capsys):
    rec, _, _ = load_trained(run20)
    assert main(["quantize", str(run20), "--smoke", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the deployed fp32 net on the run's own 20x20 test digits gives the engine's own test error
    assert s["fp32_test_error"] == pytest.approx(rec["summary"]["test_error"])   # one seed: its own
    assert s["weights_ratio"] == 4.0


def test_distillation_needs_a_teacher_at_the_students_side(run20, tmp_path):
    student = apply_overrides(preset("modern"), ["data.resolution=20", *SMALL,
                                                 f"+method=distill:teacher={run20},targets=cached"])
    pop = Population(student, [0])
    x = torch.rand(3, 1, 20, 20) * 2 - 1
    sw = next(sw for name, sw in pop.switches if name == "distill")
    p = sw.teacher.probs(x, 2.0)
    assert p.shape == (3, 10) and torch.allclose(p.sum(1), torch.ones(3))
    with pytest.raises(UserError, match="at 20x20, this run sees mnist10k at 16x16"):
        apply_overrides(preset("modern"), [*SMALL, f"+method=distill:teacher={run20}"])
