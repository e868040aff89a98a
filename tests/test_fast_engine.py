"""The fast engine against autograd and torch.optim, and against itself (populations, resume).

Tolerances. The fast engine computes in float32 with fused multiply-adds in its own
summation order and a tanh within ~5 ulp, so one example's gradient differs from
autograd's by ~1e-6 of the tensor's largest entry (asserted: < 1e-5). Over many SGD steps
these differences compound; measured after 1000 steps of the 1989 recipe: <= 3e-6 of each
tensor's largest weight, so a 500-step pass is asserted to 2e-5. Within the engine nothing
is approximate: a population's replica and a resumed run are compared bit for bit.
The 1989 optimizer (sdlm) is checked the same way: its per-example curvature estimate
against methods/sdlm.py's reference, a pass against the eager engine's sdlm, and bit
for bit against itself.
"""
import numpy as np
import pytest
import torch

from backproplab.data import pass_randomness, shift_images
from backproplab.engine.eager import EagerPopulation, example_loss
from backproplab.engine.fast import FastPopulation, example_curvature, example_grads
from backproplab.methods.sdlm import net1989_gn_diag
from backproplab.models.net1989 import PARAM_NAMES, Net1989, init_params


def _params(seed):
    return {k: v.numpy() for k, v in init_params(seed).items()}


def _rel(a, b):
    """max |a-b| / max |b| per tensor, the worst tensor."""
    return max(float(np.abs(a[n] - b[n]).max() / max(np.abs(b[n]).max(), 1e-30)) for n in PARAM_NAMES)


def _identical(a, b):
    return all(np.array_equal(a[n], b[n]) for n in PARAM_NAMES)


@pytest.fixture(scope="module")
def data(digits):
    return digits.train_x.reshape(-1, 16, 16).numpy(), digits.train_labels.numpy()


def _autograd(p, x, label, act, out_act, loss, shift, keep, dropout):
    m = Net1989(0, act=act, out_act=out_act, dropout=dropout)
    with torch.no_grad():
        for n in PARAM_NAMES:
            getattr(m, n).copy_(torch.as_tensor(p[n]))
    xt = torch.as_tensor(x).reshape(1, 1, 16, 16)
    if shift is not None:
        xt = shift_images(xt, np.asarray(shift).reshape(1, 2))
    y = m(xt, None if keep is None else torch.as_tensor(keep).reshape(1, 192))
    example_loss(y, torch.tensor([label]), loss).backward()
    return {n: getattr(m, n).grad.numpy() for n in PARAM_NAMES}


VARIANTS = [  # act, out_act, loss, shift, dropout
    ("tanh", "tanh", "mse", None, 0.0),
    ("relu", "none", "ce", (1, -1), 0.25),
    ("scaled_tanh", "scaled_tanh", "mse", (-1, 0), 0.0),
    ("tanh", "none", "ce", (0, 1), 0.5),
]


@pytest.mark.parametrize("population", [False, True], ids=["solo", "population"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_example_gradients_match_autograd(data, variant, population):
    act, out_act, loss, shift, dropout = variant
    X, L = data
    rng = np.random.default_rng(7)
    for seed, i in ((0, 3), (1, 4000)):
        p = _params(seed)
        keep = (rng.random(192) >= dropout) if dropout else None
        ref = _autograd(p, X[i], int(L[i]), act, out_act, loss, shift, keep, dropout)
        got = example_grads(p, X[i], int(L[i]), act, out_act, loss, shift, keep, dropout, population=population)
        assert _rel(got, ref) < 1e-5


def test_one_pass_matches_eager(data):
    """The 1989 recipe (tanh, tanh out, mse, SGD 0.03), 500 examples from the same init."""
    X, L = data
    n, p = 500, _params(0)
    lr = np.full(n, 0.03, np.float32)
    fast = FastPopulation([p])
    fast.train_pass(X[:n], L[:n], lr)
    eager = EagerPopulation([p])
    eager.train_pass(X[:n], L[:n], lr)
    got, ref = fast.params()[0], eager.params()[0]
    assert _rel(got, ref) < 2e-5
    assert not _identical(got, p)                 # it did train


def test_modern_recipe_matches_eager(data):
    """ReLU, logits + cross-entropy, AdamW with a per-step lr, dropout masks and shifts."""
    X, L = data
    n = 200
    kw = dict(act="relu", out_act="none", loss="ce", optim="adamw", weight_decay=0.01, dropout=0.25)
    shifts, keep = pass_randomness(3, 0, n, 1, 0.25)
    lr = np.linspace(3e-3, 1e-3, n).astype(np.float32)
    fast = FastPopulation([_params(3)], **kw)
    fast.train_pass(X[:n], L[:n], lr, shifts[None], keep[None])
    eager = EagerPopulation([_params(3)], **kw)
    eager.train_pass(X[:n], L[:n], lr, shifts[None], keep[None])
    assert _rel(fast.params()[0], eager.params()[0]) < 2e-5


def test_adamw_steps_match_torch(data):
    """Fed the same gradients, the engine's AdamW steps are torch.optim.AdamW's (few ulp)."""
    X, L = data
    kw = dict(weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)
    fast = FastPopulation([_params(1)], optim="adamw", **kw)
    tens = {n: torch.nn.Parameter(torch.as_tensor(v).clone()) for n, v in _params(1).items()}
    opt = torch.optim.AdamW(list(tens.values()), lr=1.0, **kw)
    lrs = np.array([3e-3, 2e-3, 1e-3, 5e-4], np.float32)
    for i, lr in enumerate(lrs):
        cur = fast.params()[0]
        g = example_grads(cur, X[i], int(L[i]))
        fast.train_pass(X[i:i + 1], L[i:i + 1], lrs[i:i + 1])
        for n in PARAM_NAMES:
            with torch.no_grad():
                tens[n].copy_(torch.as_tensor(cur[n]))
            tens[n].grad = torch.as_tensor(g[n])
        opt.param_groups[0]["lr"] = float(lr)
        opt.step()
        got = fast.params()[0]
        for n in PARAM_NAMES:
            np.testing.assert_allclose(got[n], tens[n].detach().numpy(), rtol=0, atol=5e-8)
    assert int(fast.state()["step"]) == len(lrs)


RECIPES = {  # engine kwargs, shift, dropout, lr scale (sdlm divides the step by mu + h ~ 0.02)
    "1989": (dict(), 0, 0.0, 1.0),
    "modern": (dict(act="relu", out_act="none", loss="ce", optim="adamw", weight_decay=0.01, dropout=0.25), 1, 0.25, 1.0),
    "sdlm": (dict(act="scaled_tanh", out_act="scaled_tanh", optim="sdlm", dropout=0.25), 1, 0.25, 0.05),
}


def _randomness(seeds, n, shift, dropout, pass_idx=0):
    rand = [pass_randomness(s, pass_idx, n, shift, dropout) for s in seeds]
    return (np.stack([r[0] for r in rand]) if shift else None,
            np.stack([r[1] for r in rand]) if dropout else None)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_population_replica_equals_solo(data, recipe):
    X, L = data
    kw, shift, dropout, scale = RECIPES[recipe]
    n, seeds = 150, [0, 1, 2, 3]
    shifts, keep = _randomness(seeds, n, shift, dropout)
    lr = (np.linspace(0.01, 0.001, n) * scale).astype(np.float32)
    pop = FastPopulation([_params(s) for s in seeds], kernel="population", **kw)
    pop.train_pass(X[:n], L[:n], lr, shifts, keep)
    out = pop.params()
    for k, s in enumerate(seeds):
        solo = FastPopulation([_params(s)], **kw)
        solo.train_pass(X[:n], L[:n], lr, None if shifts is None else shifts[k:k + 1],
                        None if keep is None else keep[k:k + 1])
        assert _identical(out[k], solo.params()[0]), f"replica {k}"
    assert not _identical(out[0], out[1])


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("replicas,kernel", [(1, "auto"), (3, "population")])
def test_resume_from_state_is_bit_identical(data, recipe, replicas, kernel):
    X, L = data
    kw, shift, dropout, scale = RECIPES[recipe]
    n, cut, seeds = 120, 50, list(range(replicas))
    shifts, keep = _randomness(seeds, n, shift, dropout)
    lr = (np.linspace(0.01, 0.001, n) * scale).astype(np.float32)
    part = lambda a, s: None if a is None else a[:, s]          # noqa: E731

    whole = FastPopulation([_params(s) for s in seeds], kernel=kernel, **kw)
    whole.train_pass(X[:n], L[:n], lr, shifts, keep)

    first = FastPopulation([_params(s) for s in seeds], kernel=kernel, **kw)
    first.train_pass(X[:cut], L[:cut], lr[:cut], part(shifts, slice(0, cut)), part(keep, slice(0, cut)))
    state = {k: np.array(v, copy=True) for k, v in first.state().items()}
    second = FastPopulation([_params(100 + s) for s in seeds], kernel=kernel, **kw)  # weights overwritten
    second.load_state(state)
    second.train_pass(X[cut:n], L[cut:n], lr[cut:], part(shifts, slice(cut, n)), part(keep, slice(cut, n)))
    for a, b in zip(whole.params(), second.params()):
        assert _identical(a, b)
    assert int(second.state()["step"]) == n
    ref = whole.state()
    assert all(np.array_equal(v, ref[k]) for k, v in second.state().items())   # sdlm's h too


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_sdlm_curvature_matches_reference(data, variant):
    """Each example's Gauss-Newton diagonal estimate against net1989_gn_diag (torch), and the
    solo and population kernels' estimates against each other bit for bit."""
    act, out_act, loss, shift, dropout = variant
    X, L = data
    rng = np.random.default_rng(5)
    for seed, i in ((0, 11), (2, 5000)):
        p = _params(seed)
        keep = (rng.random(192) >= dropout) if dropout else None
        xt = torch.as_tensor(X[i]).reshape(1, 1, 16, 16)
        if shift is not None:
            xt = shift_images(xt, np.asarray(shift).reshape(1, 2))
        ref = net1989_gn_diag({n: torch.as_tensor(v) for n, v in p.items()}, xt, act, out_act, loss,
                              None if keep is None else torch.as_tensor(keep).reshape(1, 192), dropout)
        ref = {n: v.numpy() for n, v in ref.items()}
        solo, pop = (example_curvature(p, X[i], int(L[i]), act, out_act, loss, shift, keep, dropout, population=k)
                     for k in (False, True))
        assert _rel(solo, ref) < 1e-5 and _identical(solo, pop)
        assert all(solo[n].min() >= 0 and solo[n].max() > 0 for n in PARAM_NAMES)


@pytest.mark.parametrize("variant", [("scaled_tanh", "scaled_tanh", "mse", 0, 0.0, 5e-4),
                                     ("relu", "none", "ce", 1, 0.25, 2e-4)], ids=lambda v: "-".join(map(str, v)))
def test_sdlm_pass_matches_eager(data, variant):
    """300 steps of the 1989 optimizer from the same init: weights and the running curvature
    h agree with the eager engine's sdlm path (same state keys) to float tolerance."""
    act, out_act, loss, shift, dropout, lr = variant
    X, L = data
    n = 300
    kw = dict(act=act, out_act=out_act, loss=loss, optim="sdlm", dropout=dropout, mu=0.03, gamma=0.02)
    shifts, keep = _randomness([4], n, shift, dropout)
    lrs = np.full(n, lr, np.float32)
    fast = FastPopulation([_params(4)], **kw)
    fast.train_pass(X[:n], L[:n], lrs, shifts, keep)
    eager = EagerPopulation([_params(4)], **kw)
    eager.train_pass(X[:n], L[:n], lrs, shifts, keep)
    assert _rel(fast.params()[0], eager.params()[0]) < 2e-5
    fs, es = fast.state(), eager.state()
    assert set(fs) - {"step", "replicas"} == set(es)
    h_fast, h_eager = ({n: st[f"0.h.{n}"] for n in PARAM_NAMES} for st in (fs, es))
    assert _rel(h_fast, h_eager) < 2e-5
    assert not _identical(fast.params()[0], _params(4)) and min(h_eager[n].max() for n in PARAM_NAMES) > 0


def test_replicas_are_grouped_by_kernel():
    from backproplab.engine.fast import SOLO_BELOW, _groups
    assert _groups(4) == [("solo", [0]), ("solo", [1]), ("solo", [2]), ("solo", [3])]
    assert _groups(4, "population") == [("pop", [0, 1, 2, 3])]
    g = _groups(16 + SOLO_BELOW)
    assert g == [("pop", list(range(16))), ("pop", list(range(16, 16 + SOLO_BELOW)))]
    assert [k for k, _ in _groups(17)] == ["pop", "solo"]


def test_bad_input_is_refused(data):
    X, L = data
    fp = FastPopulation([_params(0), _params(1)])
    lr = np.full(4, 0.01, np.float32)
    with pytest.raises(ValueError, match="shifts"):
        fp.train_pass(X[:4], L[:4], lr, shifts=np.zeros((1, 4, 2), np.int8))
    with pytest.raises(ValueError, match="keep"):
        fp.train_pass(X[:4], L[:4], lr, keep=np.ones((2, 3, 192), bool))
    with pytest.raises(ValueError, match="labels"):
        fp.train_pass(X[:4], L[:3], lr)
    with pytest.raises(ValueError, match="dropout"):
        FastPopulation([_params(0)], dropout=0.25).train_pass(X[:4], L[:4], lr)
    with pytest.raises(ValueError, match="act"):
        FastPopulation([_params(0)], act="gelu")
    with pytest.raises(ValueError, match="replicas"):
        fp.load_state(FastPopulation([_params(0)]).state())
    with pytest.raises(ValueError, match="mu"):
        FastPopulation([_params(0)], optim="sdlm", mu=0.0)


def test_tanh_approximation_is_within_a_few_ulp():
    from numba import njit

    from backproplab.engine._simd import vload, vstore, vtanh

    @njit
    def run(x, out):
        for i in range(0, len(x), 16):
            vstore(out, i, vtanh(vload(x, i)))

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-12, 12, 200_000), rng.uniform(-1e-3, 1e-3, 16_000),
                        [0.0, -0.0, 9.0, -9.0, 30.0, -30.0, 1e-30, -1e-30] * 2]).astype(np.float32)
    out = np.empty_like(x)
    run(x, out)
    ref = np.tanh(x.astype(np.float64))
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    assert (np.abs(out - ref) / np.maximum(ulp, 1e-45)).max() <= 6.0
    assert np.all(np.abs(out) <= 1.0)
