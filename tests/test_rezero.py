"""ReZero study: the blocks' formulas, ReZero's identity at init and its gradient, a smoke study."""
import json

import pytest
import torch
import torch.nn.functional as F

from backproplab.data import load_dataset
from backproplab.experiments import rezero as rz
from backproplab.models.deep import NORMS, Block, DeepNet
from conftest import run_cli


@pytest.mark.parametrize("kind,shape", [("mlp", (5, 16)), ("conv", (3, 16, 8, 8))])
def test_rezero_block_is_the_identity_at_init(kind, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    b = Block(kind, "rezero", 16)
    assert float(b.a.detach()) == 0.0
    assert torch.equal(b(x), x)
    net = DeepNet(kind, 6, 16, "rezero", seed=1)
    xin = torch.randn(4, 1, 16, 16)
    h = net.stem(xin.reshape(4, 256) if kind == "mlp" else xin)
    assert torch.equal(net(xin), net.head(h.flatten(1)))  # all six blocks pass the stem's output through


def test_rezero_gradient_wrt_a_is_the_branch_output_dot_upstream_gradient():
    torch.manual_seed(2)
    b = Block("mlp", "rezero", 8)
    x = torch.randn(6, 8)
    w = torch.randn(6, 8)
    (b(x) * w).sum().backward()
    want = (w * F.relu(b.f(x))).sum()   # d/da of sum(w * (x + a F(x))) = sum(w * F(x))
    assert float(b.a.grad) != 0.0
    torch.testing.assert_close(b.a.grad, want.detach())


def test_every_residual_weight_gets_a_nonzero_gradient_in_a_deep_stack():
    net = DeepNet("mlp", 16, 32, "rezero", seed=0)
    x = load_dataset("mnist10k", 64, 10).train_x
    F.cross_entropy(net(x), torch.arange(64) % 10).backward()
    grads = torch.stack([b.a.grad for b in net.blocks])
    assert bool((grads != 0).all())


@pytest.mark.parametrize("norm", NORMS)
def test_block_formulas(norm):
    torch.manual_seed(3)
    b = Block("mlp", norm, 12)
    if norm == "rezero":
        with torch.no_grad():
            b.a.fill_(0.3)
    x = torch.randn(7, 12)
    f = lambda t: F.relu(t @ b.f.weight.t() + b.f.bias)  # noqa: E731
    ln = lambda t: F.layer_norm(t, (12,), b.n.weight, b.n.bias) if norm.startswith("layer") else None  # noqa: E731
    want = {"none": lambda: x + f(x),
            "batch": lambda: x + F.relu((lambda z: (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5))(
                x @ b.f.weight.t() + b.f.bias)),
            "layer_pre": lambda: x + f(ln(x)),
            "layer_post": lambda: ln(x + f(x)),
            "rezero": lambda: x + 0.3 * f(x)}[norm]()
    torch.testing.assert_close(b.train()(x), want, atol=1e-5, rtol=1e-5)


def test_smoke_study_table_and_claims():
    data = load_dataset("mnist10k", 400, 100)
    runs = rz.run_study(data, ["mlp", "conv"], [2], ["none", "rezero"], 2, steps=12, log=lambda s: None)
    assert len(runs) == 2 * 2 * 2
    for r in runs:
        assert len(r["losses"]) == 12 and r["steps"] == 12 and not r["diverged"]
    rows = rz.summarize(runs)
    assert [(r["stack"], r["norm"]) for r in rows] == [("mlp", "none"), ("mlp", "rezero"), ("conv", "none"),
                                                        ("conv", "rezero")]
    r0 = [r for r in runs if r["stack"] == "mlp" and r["norm"] == "none"]
    assert abs(rows[0]["final_loss"] - sum(r["final_loss"] for r in r0) / 2) < 1e-9
    claims = rz.claims(rows)
    assert {(c["stack"], c["depth"]) for c in claims} == {("mlp", 2), ("conv", 2)}
    assert "steps to target" in rz.format_table(rows)


def test_steps_to_target_is_the_first_window_at_or_below_target():
    data = load_dataset("mnist10k", 400, 100)
    r = rz.run_one(data, "mlp", 2, "none", 0, 40, 32, 32, target=10.0)  # any loss is below 10
    assert r["steps_to_target"] == rz.WINDOW
    r = rz.run_one(data, "mlp", 2, "none", 0, 20, 32, 32, target=0.0)
    assert r["steps_to_target"] is None


def test_cli_smoke_writes_table_plot_and_record(tmp_path):
    r = run_cli("rezero", "--smoke", "--stacks", "mlp", "--norms", "none,rezero", "--out", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res["rows"]) == 4 and res["smoke"]
    assert (tmp_path / "rezero" / "rezero-smoke.png").stat().st_size > 1000
    from backproplab.store import list_runs
    assert list_runs(tmp_path)[-1]["kind"] == "rezero"


@pytest.mark.parametrize("args", [["--depths", "0"], ["--depths", "a,b"], ["--stacks", "rnn"], ["--norms", "x"],
                                  ["--seeds", "0"], ["--budget-steps", "3"]])
def test_bad_arguments_exit_2(tmp_path, capsys, args):
    from backproplab.cli import main
    assert main(["rezero", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
