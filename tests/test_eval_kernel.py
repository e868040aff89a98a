"""The evaluation kernel (engine/_kernels_eval.py): Net1989's eval-mode outputs for every
activation pair against the torch modules, through KernelGrad.outputs, Population.evaluate
with its eval hooks (standardized inputs, averaged weights, test-time shifts) against the
autograd path's torch evaluation, and the per-example engines' engine/evaluate.py."""
import numpy as np
import pytest
import torch

from backproplab.config import apply_overrides, preset
from backproplab.data import load_dataset, pass_randomness
from backproplab.engine import evaluate as EV
from backproplab.engine import kernelgrad as KG
from backproplab.engine._kernels_common import ACT, OUT
from backproplab.engine.population import Population
from backproplab.models.net1989 import PARAM_NAMES, Net1989

D = load_dataset("mnist10k", 64, 45)
HAVE = KG.outputs_reason("tanh", "tanh") is None
needs_kernel = pytest.mark.skipif(not HAVE, reason="neither AVX2 + FMA nor AVX-512: no kernels on this CPU")
PAIRS = [(a, o) for a in ACT for o in OUT]         # every act / out_act the kernel path takes
assert len(PAIRS) == 12


def close(got, ref, tol=1e-5):
    """max |got - ref| within tol of the outputs' scale (at least 1)."""
    scale = max(1.0, float(ref.abs().max()))
    return float((got - ref).abs().max()) <= tol * scale


def rand_models(R, act, out_act, seed=0):
    """R modules with the 1989 init's weights and random biases (zero biases would hide a dropped one)."""
    g = torch.Generator().manual_seed(seed)
    models = []
    for r in range(R):
        m = Net1989(seed * 10 + r, act=act, out_act=out_act).eval()
        with torch.no_grad():
            for n in ("h1_b", "h2_b", "h3_b", "out_b"):
                getattr(m, n).copy_(torch.randn(getattr(m, n).shape, generator=g) * 0.5)
        models.append(m)
    W = torch.stack([torch.cat([getattr(m, n).detach().reshape(-1) for n in PARAM_NAMES]) for m in models])
    return models, W


def images(n, seed=0):
    """Real digits, then uniform noise in [-1, 1) (pixels the digits' blank border never has)."""
    g = torch.Generator().manual_seed(seed)
    k = min(n, 30)
    x = torch.cat([D.test_x[:k].reshape(-1, 1, 16, 16), torch.rand(n - k, 1, 16, 16, generator=g) * 2 - 1])
    return x.float()


def torch_outputs(models, x):
    with torch.no_grad():
        return torch.stack([m(x) for m in models])


def strided(x):
    """The same images as two non-contiguous views: every other column of a wider array, and a
    transposed copy transposed back."""
    wide = torch.zeros(x.shape[0], 1, 16, 32)
    wide[..., ::2] = x
    a, b = wide[..., ::2], x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not a.is_contiguous() and not b.is_contiguous()
    return a, b


@needs_kernel
@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("act,out_act", PAIRS)
def test_outputs_equal_torch_modules(act, out_act, R):
    models, W = rand_models(R, act, out_act, seed=R)
    kg = KG.KernelGrad(R, act, out_act, "ce", 0.0)
    for n in (37, 16, 1):          # a partial last block, one full block, one image
        x = images(n, seed=n)
        ref = torch_outputs(models, x)
        got = kg.outputs(W, x)
        assert got.shape == (R, n, 10) and got.dtype == torch.float32
        assert close(got, ref), float((got - ref).abs().max())
        for v in strided(x):   # same numbers whatever the strides
            assert torch.equal(kg.outputs(W, v), got)
        assert torch.equal(kg.outputs(W.t().contiguous().t(), x.reshape(n, 16, 16)), got)


@needs_kernel
def test_outputs_see_each_part_of_the_net():
    """Each parameter tensor and the -1 padding move these outputs by far more than the tolerance:
    the comparison with torch would catch a kernel that dropped or misread any of them."""
    models, W = rand_models(2, "tanh", "none", seed=5)
    x = images(20)
    base = KG.net_outputs(W, x, "tanh", "none")
    cols = np.cumsum([0] + [int(np.prod(getattr(models[0], n).shape)) for n in PARAM_NAMES])
    for n, a, b in zip(PARAM_NAMES, cols[:-1], cols[1:]):
        W2 = W.clone()
        W2[:, a:b] += 0.05
        assert (KG.net_outputs(W2, x, "tanh", "none") - base).abs().max() > 1e-3, n
    m = models[0]
    # the padding: a 0 border instead of -1 changes the outputs, and the kernel has -1
    with torch.no_grad():
        h = torch.nn.functional.pad(x, (2, 2, 2, 2), value=0.0)
        h = m.act(torch.nn.functional.conv2d(h, m.h1_w, stride=2) + m.h1_b)
        h = torch.nn.functional.pad(h, (2, 2, 2, 2), value=-1.0)
        h = m.act(torch.nn.functional.conv2d(h, m.h2_dense(), stride=2) + m.h2_b).flatten(1)
        zero_pad = m.act(h @ m.h3_w.t() + m.h3_b) @ m.out_w.t() + m.out_b
    assert (zero_pad - base[0]).abs().max() > 1e-2 and close(base[0], m(x).detach())


@needs_kernel
@pytest.mark.parametrize("act", list(ACT))
def test_nan_propagates_like_torch(act):
    """A diverged replica: NaN where torch has NaN (the training kernels' tanh clamp and ReLU max
    would turn NaN into numbers; the evaluation must report the NaN loss torch reports)."""
    models, W = rand_models(4, act, "none", seed=7)
    with torch.no_grad():
        models[0].h1_w[3, 0, 2, 2] = float("nan")       # a whole H1 plane: every output
        models[1].h3_b[7] = float("nan")                # one H3 unit: every output
        models[2].out_b[4] = float("nan")               # output 4 only
        models[3].h2_w[0, 0, 0, 0] = float("inf")       # inf times the -1 border
    W = torch.stack([torch.cat([getattr(m, n).detach().reshape(-1) for n in PARAM_NAMES]) for m in models])
    x = images(21)
    ref, got = torch_outputs(models, x), KG.net_outputs(W, x, act, "none")
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.isnan(got[2, :, 4]).all()
    assert torch.isnan(got[0]).all() and torch.isnan(got[1]).all() and not torch.isnan(got[2, :, :4]).any()
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin) and close(got[fin], ref[fin])


def pop_cfg(*over):
    return apply_overrides(preset("modern_smoke"), ["data.n_train=64", "data.n_test=45", "train.batch=16",
                                                    "optim.lr=0.01", *over])


def train_passes(eng, cfg, seeds, k=1):
    x, y = D.train_x.reshape(-1, 16, 16).numpy(), D.train_labels.numpy()
    for p in range(k):
        rand = [pass_randomness(s, p, len(x), cfg.train.shift, cfg.model.dropout, eng.dropout_units) for s in seeds]
        eng.train_pass(x, y, None, np.stack([r[0] for r in rand]) if cfg.train.shift else None,
                       np.stack([r[1] for r in rand]) if cfg.model.dropout else None)
        eng.end_pass()


def spy(monkeypatch):
    calls = []
    real = KG.KernelGrad.outputs

    def outputs(self, W, x):
        calls.append(len(x))
        return real(self, W, x)
    monkeypatch.setattr(KG.KernelGrad, "outputs", outputs)
    return calls


@needs_kernel
@pytest.mark.parametrize("over", [
    (),                                                                   # ReLU, logits, cross-entropy
    ("model.act=tanh", "model.out_act=tanh", "train.loss=mse", "model.dropout=0"),
    ("model.act=scaled_tanh", "model.out_act=none", "train.loss=ce"),
])
def test_population_evaluate_equals_torch_path(over, monkeypatch):
    """Population.evaluate on the kernel path (trained one pass there, so biases are not zero) against
    the same state on the autograd path, whose evaluation runs the torch modules."""
    cfg, seeds = pop_cfg(*over), [0, 1, 2]
    ek = Population(cfg, seeds, path="kernel")
    train_passes(ek, cfg, seeds)
    ea = Population(cfg, seeds, path="autograd")
    ea.load_state(ek.state())
    calls = spy(monkeypatch)
    got = ek.evaluate(D.test_x, D.test_labels, cfg.train.loss)
    assert calls == [len(D.test_x)]
    ref = ea.evaluate(D.test_x, D.test_labels, cfg.train.loss)
    assert len(calls) == 1                                   # the autograd path never calls the kernel
    for g, r in zip(got, ref):
        assert g["misses"] == r["misses"] and g["error"] == r["error"]
        assert abs(g["loss"] - r["loss"]) <= 1e-5 * max(1.0, abs(r["loss"]))
    assert close(ek.outputs(D.test_x), ea.outputs(D.test_x))


@needs_kernel
@pytest.mark.parametrize("methods", [("ema",), ("swa:start=0",), ("tta:n=9",), ("tta:n=5", "ema", "standardize")])
def test_eval_hooks_on_the_kernel_path(methods, monkeypatch):
    """Standardized inputs, averaged weights (EMA, SWA) and test-time shifts on the kernel path equal
    the autograd path's torch evaluation of the same state; each hook changes the outputs."""
    cfg, seeds = pop_cfg(*[f"+method={m}" for m in methods]), [0, 1]
    ek = Population(cfg, seeds, path="kernel")
    train_passes(ek, cfg, seeds, 2)   # two: SWA's average is then not the last weights
    ea = Population(cfg, seeds, path="autograd")
    ea.load_state(ek.state())
    calls = spy(monkeypatch)
    got = ek.outputs(D.test_x)
    n_shift = next((int(m.split("=")[1]) for m in methods if m.startswith("tta")), 1)
    assert calls == [len(D.test_x)] * n_shift                # tta: one kernel call per shifted copy
    ref = ea.outputs(D.test_x)
    assert close(got, ref)
    mk, ma = ek.evaluate(D.test_x, D.test_labels, "ce"), ea.evaluate(D.test_x, D.test_labels, "ce")
    assert [m["misses"] for m in mk] == [m["misses"] for m in ma]
    assert np.allclose([m["loss"] for m in mk], [m["loss"] for m in ma], rtol=1e-5, atol=1e-6)
    plain = ek.kernel.outputs(ek.W, D.test_x.reshape(-1, 1, 16, 16))   # no hook at all
    assert (got - plain).abs().max() > 1e-4                 # so the test above sees the hooks


def test_per_example_evaluate_uses_the_kernel(monkeypatch):
    """engine/evaluate.py (the fast and eager engines' evaluation): the kernel's outputs and metrics
    equal the torch convolutions'; on a CPU with neither AVX2 + FMA nor AVX-512 it falls back to torch."""
    models, W = rand_models(3, "tanh", "tanh", seed=3)
    params = [{n: getattr(m, n).detach().numpy() for n in PARAM_NAMES} for m in models]
    x, labels = D.test_x.reshape(-1, 1, 16, 16), D.test_labels.long()
    ref = EV.population_outputs(params, x, "tanh", "tanh", kernel=False)
    assert close(ref, torch_outputs(models, x))
    calls = []
    real = KG.net_outputs
    monkeypatch.setattr(KG, "net_outputs", lambda *a: calls.append(1) or real(*a))
    if HAVE:
        got = EV.population_outputs(params, x, "tanh", "tanh")
        assert calls and close(got, ref)
        assert EV.evaluate(params, x, labels)[1]["misses"] == EV.metrics_from_outputs(ref, labels, "mse")[1]["misses"]
        assert close(EV.predict(preset("smoke").model, params[2], x), ref[2])
    calls.clear()
    monkeypatch.setattr(KG.binding, "get_host_cpu_features", lambda: {"avx": True})   # no AVX2, no AVX-512
    assert KG.outputs_reason("tanh", "tanh") == ("the numba kernels need an x86-64 CPU with AVX2 and FMA "
                                                 "(x86-64-v3) or AVX-512")
    assert torch.equal(EV.population_outputs(params, x, "tanh", "tanh"), ref) and not calls
    with pytest.raises(RuntimeError, match="AVX2 and FMA"):
        EV.population_outputs(params, x, "tanh", "tanh", kernel=True)
    eng = Population(pop_cfg(), [0, 1])            # the automatic choice skips the kernels, evaluation works
    assert eng.path != "kernel" and eng.kernel is None
    assert len(eng.evaluate(D.test_x, D.test_labels, "ce")) == 2


def test_outputs_reason():
    assert KG.outputs_reason("gelu", "none") is not None and KG.outputs_reason("tanh", "softmax") is not None
    if HAVE:
        assert KG.outputs_reason("gelu", "none") == "the numba kernels are Net1989's"
