"""The ReZero study on the population engine: model.name=deep, a hand-written Adam loop as the
oracle, replica k of a population against a solo run of seed k, resume with BatchNorm, bad input."""
import json

import pytest
import torch
import torch.nn.functional as F

from backproplab.config import PRESETS, apply_overrides, preset
from backproplab.data import load_dataset
from backproplab.engine.population import Population
from backproplab.experiments import rezero as rz
from backproplab.models.deep import DeepNet

LR = 1e-2   # large enough that a few steps move the weights


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist10k", 300, 100)


def hand_adam(data, kind, depth, width, norm, seed, idx, lr=LR, b1=0.9, b2=0.999, eps=1e-8):
    """Adam written out on a DeepNet trained alone on the batches idx (steps, B) -> (model, losses)."""
    model = DeepNet(kind, depth, width, norm, seed).train()
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    x, y, losses = data.train_x.reshape(-1, 1, 16, 16), data.train_labels, []
    for t, i in enumerate(idx, start=1):
        loss = F.cross_entropy(model(x[i]), y[i])
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, mk, vk in zip(params, grads, m, v):
                mk.mul_(b1).add_((1 - b1) * g)
                vk.mul_(b2).add_((1 - b2) * g * g)
                p.sub_(lr * (mk / (1 - b1 ** t)) / ((vk / (1 - b2 ** t)).sqrt() + eps))
    return model, losses


@pytest.mark.parametrize("kind,norm", [("mlp", "rezero"), ("mlp", "batch"), ("conv", "layer_post")])
def test_engine_run_equals_a_hand_written_adam_loop(data, kind, norm):
    depth, width, batch, steps, seed = (3, 16, 16, 6, 2) if kind == "mlp" else (2, 4, 8, 4, 2)
    idx = rz.seed_batches(seed, len(data.train_x), batch, steps)
    want, want_losses = hand_adam(data, kind, depth, width, norm, seed, idx)
    pop = Population(rz.cell_config(kind, depth, norm, [seed], width, batch, LR), [seed], path="autograd")
    x, y = data.train_x.reshape(-1, 1, 16, 16), data.train_labels
    got_losses = [float(pop.train_batch(x[i], y[i], steps)[0]) for i in idx]
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), rtol=1e-5, atol=1e-6)
    got = dict(pop.models[0].named_parameters())
    for n, p in want.named_parameters():
        if norm == "batch" and n.endswith("f.bias"):  # BatchNorm cancels the bias before it: its gradient is
            assert float((got[n] - p).detach().abs().max()) <= 2 * steps * LR  # rounding noise that Adam scales to
            continue                                                  # +-lr steps, bounded by lr a step
        torch.testing.assert_close(got[n].detach(), p.detach(), rtol=1e-4, atol=2e-5, msg=n)
    moved = any(not torch.equal(p, q) for p, q in zip(want.parameters(), DeepNet(kind, depth, width, norm,
                                                                                 seed).parameters()))
    assert moved
    # the study's record of the same run: its minibatch losses, final loss and residual weights
    r = rz.run_one(data, kind, depth, norm, seed, steps, width, batch, target=0.0, lr=LR)
    torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(want_losses), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        want.eval()
        fl = F.cross_entropy(want(data.train_x[:rz.N_EVAL]), data.train_labels[:rz.N_EVAL])
        err = 100.0 * float((want(data.test_x[:rz.N_EVAL]).argmax(1) != data.test_labels[:rz.N_EVAL]).float().mean())
    tol = 2e-2 if norm == "batch" else 1e-4  # the running means carry the noise-driven biases above
    assert r["final_loss"] == pytest.approx(float(fl), rel=tol) and abs(r["test_error"] - err) < 1.01  # a digit
    assert r["rezero_a"] == pytest.approx(want.residual_weights(), abs=1e-5)
    assert r["path"] == "autograd" and r["vmap"] is False  # a population of one runs the module


@pytest.mark.parametrize("norm", ["rezero", "batch"])  # vmap of the forward; the module loop (BatchNorm)
def test_replica_k_of_a_population_equals_a_solo_run_of_seed_k(data, norm):
    args = ("mlp", 4, norm)
    pair = rz.run_cell(data, *args, [3, 5], 25, 16, 16, target=1.8, lr=LR)
    assert pair[0]["vmap"] is (norm != "batch")
    for k, seed in enumerate([3, 5]):
        solo = rz.run_one(data, *args, seed, 25, 16, 16, target=1.8, lr=LR)
        assert pair[k]["seed"] == seed
        torch.testing.assert_close(torch.tensor(pair[k]["losses"]), torch.tensor(solo["losses"]),
                                   rtol=1e-4, atol=1e-5)
        assert pair[k]["steps_to_target"] == solo["steps_to_target"]
        assert pair[k]["final_loss"] == pytest.approx(solo["final_loss"], rel=1e-4)
    assert pair[0]["losses"] != pair[1]["losses"]


def test_same_minibatches_for_every_variant_of_a_seed(data):
    a = rz.run_one(data, "mlp", 2, "none", 1, 3, 8, 8, target=0.0)
    b = rz.run_one(data, "mlp", 2, "rezero", 1, 3, 8, 8, target=0.0)
    c = rz.run_one(data, "mlp", 2, "none", 4, 3, 8, 8, target=0.0)
    # rezero's blocks are the identity at init and its stem and head are those of `none`'s seed:
    # the two nets differ at step 1 only by the blocks, so a different first loss means other digits
    assert torch.equal(rz.seed_batches(1, 300, 8, 3), rz.seed_batches(1, 300, 8, 3))
    assert not torch.equal(rz.seed_batches(1, 300, 8, 3), rz.seed_batches(4, 300, 8, 3))
    assert a["losses"][0] != c["losses"][0] and b["losses"] != a["losses"]


def test_divergence_stops_the_losses_and_the_run(data):
    # 64 residual layers without normalization at lr 100: activations overflow float32 at step 2
    runs = rz.run_cell(data, "mlp", 64, "none", [0, 1], 50, 8, 8, target=0.0, lr=100.0)
    for r in runs:
        assert r["diverged"] and 1 <= len(r["losses"]) < 5
        assert all(v == v and abs(v) != float("inf") for v in r["losses"])
        assert r["final_loss"] != r["final_loss"] and r["test_error"] != r["test_error"]  # NaN
        assert r["steps_to_target"] is None
    ok = rz.run_cell(data, "mlp", 64, "none", [0, 1], 5, 8, 8, target=0.0, lr=1e-3)
    assert not any(r["diverged"] for r in ok) and all(len(r["losses"]) == 5 for r in ok)


def test_a_deep_batchnorm_population_resumes_bit_for_bit(data):
    cfg = rz.cell_config("mlp", 3, "batch", [0, 1], 8, 8, LR)
    x, y = data.train_x.reshape(-1, 1, 16, 16), data.train_labels
    idx = torch.stack([rz.seed_batches(s, len(x), 8, 4) for s in (0, 1)], 1)
    whole = Population(cfg, [0, 1], path="autograd")
    for i in idx:
        whole.train_batch(x[i], y[i], 4)
    first = Population(cfg, [0, 1], path="autograd")
    for i in idx[:2]:
        first.train_batch(x[i], y[i], 4)
    st = first.state()
    assert any(k.endswith("running_mean") for k in st)
    again = Population(cfg, [0, 1], path="autograd")
    again.load_state(st)
    for i in idx[2:]:
        again.train_batch(x[i], y[i], 4)
    assert torch.equal(again.W, whole.W)
    for r in range(2):
        for n, b in whole._bn_buffers(r).items():
            assert torch.equal(again._bn_buffers(r)[n], b), n


def test_deep_is_a_model_of_the_config_and_leaves_every_preset_digest_alone(tmp_path, capsys):
    for name, make in PRESETS.items():
        d = make().to_dict()["model"]
        assert "stack" not in d and "norm" not in d, name
    cfg = apply_overrides(preset("modern"), ["model.name=deep", "model.stack=conv", "model.norm=layer_pre"])
    assert cfg.to_dict()["model"]["stack"] == "conv"
    assert cfg.digest() != apply_overrides(preset("modern"), ["model.name=deep", "model.norm=layer_pre"]).digest()
    from backproplab.cli import main
    assert main(["train", "modern", "model.name=deep", "model.depth=2", "model.width=8", "data.n_train=200",
                 "data.n_test=50", "train.passes=1", "train.seeds=2", "--out", str(tmp_path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["status"] == "finished" and res["path"] == "autograd" and res["seeds"] == 2  # dropout and shifts on


@pytest.mark.parametrize("argv", [["rezero", "--norms", "rezero,unknown"], ["rezero", "--depths", "0"],
                                  ["rezero", "--depths", "300"], ["train", "modern", "model.name=deep",
                                                                  "model.norm=unknown"],
                                  ["train", "modern", "model.name=deep", "model.depth=0"],
                                  ["train", "modern", "model.norm=batch"],
                                  ["train", "modern", "model.name=deep", "model.act=tanh"]])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv):
    from backproplab.cli import main
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs.db").exists()


def test_dropout_scales_the_kept_head_inputs():
    net = DeepNet("conv", 2, 4, "layer_pre", seed=0, dropout=0.25)
    x = torch.randn(3, 1, 16, 16)
    keep = torch.rand(3, 64 * 4) > 0.25
    h = net.stem(x)
    for b in net.blocks:
        h = b(h)
    torch.testing.assert_close(net(x, keep), net.head(h.flatten(1) * keep / 0.75))
