"""Pruning, N:M masks and low rank: masks against numpy by hand (sorting |w| globally and per
layer, unit norms, groups of four, the cubic ramp), masked SGD through train() rebuilt by hand,
lottery rewinding, resume, bad input. Tiny data: 16-64 digits, batch 16."""
import numpy as np
import pytest
import torch

from backproplab.cli import main
from backproplab.errors import UserError
from backproplab.methods.pruning import Prune, truncate

from test_methods import (LR0, assert_telling, assert_weights, close, descend, grads, init,  # noqa: F401
                          public_run, run_engine, stop_and_resume, tiny, tiny_cfg, xy)  # (tiny: fixture)

WEIGHTS = ("h1_w", "h2_w", "h3_w", "out_w")   # Net1989's prunable tensors; biases stay


def np_of(p):
    return {n: v.detach().numpy().copy() for n, v in p.items()}


def global_mask(p, s):
    """Keep the (1 - s) N largest |w| over all weight tensors at once (numpy, by hand)."""
    allw = np.concatenate([np.abs(p[n]).ravel() for n in WEIGHTS])
    k = round((1 - s) * allw.size)
    thr = np.sort(allw)[::-1][k - 1]
    return {n: (np.abs(p[n]) >= thr) if n in WEIGHTS else np.ones_like(p[n], bool) for n in p}


def layer_mask(p, s):
    out = {}
    for n, v in p.items():
        if n in WEIGHTS:
            k = round((1 - s) * v.size)
            out[n] = np.abs(v) >= np.sort(np.abs(v).ravel())[::-1][k - 1]
        else:
            out[n] = np.ones_like(v, bool)
    return out


def nm_mask(p, n=2, m=4):
    out = {}
    for name, v in p.items():
        flat = v.reshape(len(v), -1) if v.ndim > 1 else None
        if name in WEIGHTS and flat.shape[1] % m == 0:
            keep = np.zeros(flat.shape, bool)
            for r in range(flat.shape[0]):
                for g in range(0, flat.shape[1], m):
                    keep[r, g + np.argsort(-np.abs(flat[r, g:g + m]), kind="stable")[:n]] = True
            out[name] = keep.reshape(v.shape)
        else:
            out[name] = np.ones_like(v, bool)
    return out


def masked_sgd(p, masks, x, y, steps):
    """SGD with the mask on the weights: the gradient of a removed weight is 0, the weight stays 0."""
    mk = {n: torch.as_tensor(m) for n, m in masks.items()}
    p = {n: (v * mk[n]).detach().requires_grad_() for n, v in p.items()}
    for t in range(steps):
        g = grads(p, x[16 * t:16 * t + 16], y[16 * t:16 * t + 16])
        p = descend(p, {n: g[n] * mk[n] for n in p}, LR0)
    return p


# -- signatures (test_methods.SIGNATURES) ------------------------------------------------------------
def sig_prune(tiny):
    x, y = xy(tiny, 48)
    for crit, make in (("global", global_mask), ("layerwise", layer_mask)):
        want = masked_sgd(init(), make(np_of(init()), 0.6), x, y, 3)
        got = public_run(tiny, f"prune:criterion={crit},sparsity=0.6", n=48).params[0]
        assert_weights(got, want)
        assert_telling(want, masked_sgd(init(), make(np_of(init()), 0.2), x, y, 3))


def sig_nm_sparse(tiny):
    x, y = xy(tiny, 48)
    want = masked_sgd(init(), nm_mask(np_of(init())), x, y, 3)
    assert_weights(public_run(tiny, "nm_sparse", n=48).params[0], want)
    assert_telling(want, masked_sgd(init(), {n: np.ones_like(v, bool) for n, v in np_of(init()).items()}, x, y, 3))


def lowrank_by_hand(p, r):
    w = p["h3_w"].detach().numpy().astype(np.float64)
    U, S, Vt = np.linalg.svd(w, full_matrices=False)
    return {**p, "h3_w": torch.as_tensor((U[:, :r] * S[:r]) @ Vt[:r], dtype=torch.float32).requires_grad_()}


def sig_lowrank(tiny):
    # rank 3 at step 0, then after each of the 3 SGD steps the weights go back to rank 3
    x, y = xy(tiny, 48)
    p = lowrank_by_hand(init(), 3)
    for t in range(3):
        p = lowrank_by_hand(descend(p, grads(p, x[16 * t:16 * t + 16], y[16 * t:16 * t + 16]), LR0), 3)
    got = public_run(tiny, "lowrank:h3=3", n=48).params[0]
    assert_weights(got, p, rtol=1e-4, atol=1e-5)  # float32 steps; the truncations both in float64
    assert np.linalg.matrix_rank(got["h3_w"], tol=1e-4) == 3
    assert_telling(p, lowrank_by_hand(init(), 3))


SIGNATURES_PRUNING = {"prune": sig_prune, "nm_sparse": sig_nm_sparse, "lowrank": sig_lowrank}


# -- oracles (test_methods_oracle.ORACLES) ----------------------------------------------------------
def oracle_prune(name):
    # global and layerwise kept sets and the masked trajectory (as sig_prune); random keeps the same
    # count per layer; structured removes whole units by incoming norm; the cubic ramp is Zhu & Gupta's
    eng = run_engine(tiny_cfg("prune:criterion=random,sparsity=0.75"), n=16)
    sw = dict(eng.switches)["prune"]
    for n, v in eng.params()[0].items():
        if n in WEIGHTS:
            assert (v != 0).sum() == round(0.25 * v.size), n
    eng = run_engine(tiny_cfg("prune:criterion=structured,sparsity=0.5"), n=16)
    p0 = np_of(init())
    got = eng.params()[0]
    for n, b in (("h1_w", "h1_b"), ("h2_w", "h2_b"), ("h3_w", "h3_b")):
        U = len(p0[n])
        norms = np.linalg.norm(p0[n].reshape(U, -1), axis=1)
        alive = np.abs(got[n].reshape(U, -1)).sum(1) > 0
        dead = ~alive
        assert dead.any() and alive.any(), n
        assert norms[dead].max() < norms[alive].min(), n         # the weakest units went
        assert np.all(got[b].reshape(U, -1)[dead] == 0), b       # with their biases
    # readers of removed units: H3's columns of a removed H2 map, out's columns of a removed H3 unit
    dead2 = np.abs(got["h2_w"].reshape(12, -1)).sum(1) == 0
    dead3 = np.abs(got["h3_w"]).sum(1) == 0
    assert np.all(got["h3_w"].reshape(30, 12, 16)[:, dead2] == 0) and np.all(got["out_w"][:, dead3] == 0)
    assert np.all(got["out_w"][:, ~dead3] != 0)                   # the last layer keeps its units
    kept = sum(int((got[n] != 0).sum()) for n in WEIGHTS)
    # H1 loses u of 12 maps (25 weights each), H2 u of 12 filters, H3 u of its 30 units and the
    # columns of H2's removed maps, out the columns of H3's removed units; 0.5 kept within one unit's share
    dead1 = np.abs(got["h1_w"].reshape(12, -1)).sum(1) == 0
    r1, r2, r3 = int(dead1.sum()), int(dead2.sum()), int(dead3.sum())
    assert r1 == r2 and 0 < r1 < 12
    assert kept == (12 - r1) * 25 + (12 - r2) * 200 + (30 - r3) * 16 * (12 - r2) + 10 * (30 - r3)
    assert abs(kept / 8760 - 0.5) < 0.05
    sw = Prune({"sparsity": 0.9, "start": 0.1, "end": 0.6, "schedule": "gradual", "criterion": "global",
                "cycles": 3, "rewind": "none", "rewind_pass": 1})
    ev = sw.events(100)
    t0, n_dt = 10, 50
    for t in range(10, 61):
        assert ev[t] == pytest.approx(0.9 + (0.0 - 0.9) * (1 - (t - t0) / n_dt) ** 3)
    assert set(ev) == set(range(10, 61))


def oracle_nm_sparse(name):
    eng = run_engine(tiny_cfg("nm_sparse"), n=16)   # the mask of the initial weights, then one step
    want = nm_mask(np_of(init()))
    got = eng.params()[0]
    for n in WEIGHTS:
        assert np.array_equal(got[n] != 0, want[n]), n
    assert (got["h3_w"] != 0).reshape(30, -1, 4).sum(-1).max() == 2 and np.all(got["h1_w"] != 0)


def oracle_lowrank(name):
    torch.manual_seed(0)
    m = torch.randn(3, 30, 192)
    for r in (1, 5, 29):
        got = truncate(m, r)
        U, S, Vt = np.linalg.svd(m.numpy().astype(np.float64), full_matrices=False)
        want = np.einsum("bik,bk,bkj->bij", U[..., :r], S[..., :r], Vt[..., :r, :])
        close(got, torch.as_tensor(want, dtype=torch.float32), rtol=1e-4, atol=1e-4)
        err = ((m - got) ** 2).sum((1, 2)).double()
        close(err, torch.as_tensor((S[:, r:] ** 2).sum(1)), rtol=1e-3, atol=1e-3)  # Eckart-Young
    eng = run_engine(tiny_cfg("lowrank:conv=2,h3=0"), n=16)
    got = eng.params()[0]
    for n in ("h1_w", "h2_w"):
        assert np.linalg.matrix_rank(got[n].reshape(12, -1), tol=1e-4) == 2, n
    assert np.linalg.matrix_rank(got["h3_w"], tol=1e-4) == 30


ORACLES_PRUNING = {"prune": oracle_prune, "nm_sparse": oracle_nm_sparse, "lowrank": oracle_lowrank}


# -- behaviour ---------------------------------------------------------------------------------------
def test_lottery_rewind_resets_survivors_to_init(tiny):
    """Pruning after the last step with rewind=init: the dense run's weights choose the mask (global
    magnitude), and the survivors are their step-0 values."""
    dense = public_run(tiny, n=48).params[0]
    got = public_run(tiny, "prune:start=1,rewind=init,sparsity=0.8", n=48).params[0]
    keep = global_mask(dense, 0.8)
    p0 = np_of(init())
    for n in got:
        np.testing.assert_array_equal(got[n], np.where(keep[n], p0[n], 0.0).astype(np.float32), err_msg=n)


def test_rewind_to_an_early_pass(tiny):
    """3 passes of one step, pruned after the last (layerwise): the survivors take their values at the
    start of pass 1 (after one step), the mask comes from the final dense weights."""
    dense = public_run(tiny, n=16, passes=3).params[0]
    w1 = public_run(tiny, n=16, passes=1).params[0]
    got = public_run(tiny, "prune:criterion=layerwise,start=1,rewind=pass,rewind_pass=1,sparsity=0.6", n=16,
                     passes=3).params[0]
    keep = layer_mask(dense, 0.6)
    for n in got:
        np.testing.assert_array_equal(got[n], np.where(keep[n], w1[n], 0.0).astype(np.float32), err_msg=n)


def test_iterative_cycles_reach_the_sparsity_in_equal_shares(tiny):
    sw = Prune({"sparsity": 0.875, "start": 0.2, "end": 0.8, "schedule": "iterative", "criterion": "global",
                "cycles": 3, "rewind": "none", "rewind_pass": 1})
    ev = sw.events(10)
    assert sorted(ev) == [2, 5, 8]
    assert [ev[k] for k in (2, 5, 8)] == pytest.approx([0.5, 0.75, 0.875])  # each removes half of what is left
    r = public_run(tiny, "prune:schedule=iterative,sparsity=0.875,start=0.2,end=0.8", n=64, passes=3)
    assert sum(int((r.params[0][n] != 0).sum()) for n in WEIGHTS) == round(0.125 * 8760)


@pytest.mark.parametrize("spec", ["prune:schedule=gradual,sparsity=0.9,start=0.2,end=0.9",
                                  "prune:schedule=iterative,criterion=structured,start=0.3,rewind=pass,"
                                  "rewind_pass=1,sparsity=0.6",
                                  "prune:criterion=random,start=0.5", "nm_sparse:start=0.5",
                                  "prune:schedule=iterative,rewind=init,start=0,end=0.6,cycles=2",
                                  "lowrank:h3=4,conv=3,start=0.5"])
def test_resume_mid_schedule_is_bit_identical(spec, tiny, tmp_path):
    stop_and_resume(tiny_cfg(spec, over=["train.passes=4", "train.seeds=2"]), tiny, tmp_path, 2)


def test_mask_holds_against_momentum_and_weight_decay(tiny):
    # pruned mid-run: momentum's buffer still pushes the removed weights; they stay 0
    r = public_run(tiny, "prune:sparsity=0.7,start=0.5", "momentum", "wd:wd=0.1", n=64, passes=2)
    kept = sum(int((r.params[0][n] != 0).sum()) for n in WEIGHTS)
    assert kept == round(0.3 * 8760)


@pytest.mark.parametrize("spec,words", [
    ("prune:sparsity=1.0", "sparsity=1.0 is outside [0, 1)"), ("prune:sparsity=-0.1", "sparsity=-0.1"),
    ("lowrank:h3=40", "h3=40 is larger than H3"), ("lowrank:conv=13", "conv=13 is larger"),
    ("nm_sparse:n=4,m=4", "n=4 must be smaller than m=4"),
    ("prune:rewind=init,schedule=gradual", "rewind needs"),
])
def test_bad_options_are_one_line_errors(spec, words, capsys, tmp_path):
    code = main(["train", "modern_smoke", f"+method={spec}", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err, err
    with pytest.raises(UserError):
        tiny_cfg(spec)


def test_structured_prunes_the_scaling_family(tiny):
    r = public_run(tiny, "prune:criterion=structured,sparsity=0.5", n=16,
                   over=["model.name=convnet", "model.depth=2"])
    c1 = r.params[0]["c1_w"]
    dead = np.abs(c1.reshape(len(c1), -1)).sum(1) == 0
    assert 0 < dead.sum() < len(c1) and np.all(r.params[0]["c1_b"][dead] == 0)


# -- the commands ------------------------------------------------------------------------------------
def test_prune_command_smoke_json_plot_and_record(tmp_path, capsys):
    import json
    from backproplab.store import list_runs
    code = main(["prune", "--smoke", "--models", "net1989", "--methods", "global,structured", "--fractions", "1,0.3",
                 "--ft-lrs", "0.003", "--seeds", "2", "--out", str(tmp_path), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    s = json.loads(out.strip().splitlines()[-1])
    res = s["results"][0]
    rows = {(r["method"], r["keep"]): r for r in res["rows"]}
    assert set(rows) >= {("dense", 1.0), ("global", 0.3), ("structured", 0.3)}
    assert rows["global", 0.3]["kept_fraction"] == pytest.approx(0.3, abs=1e-3)
    assert abs(rows["structured", 0.3]["kept_fraction"] - 0.3) < 0.05
    assert any(r["method"] == "dense-small" for r in res["rows"]) and res["seeds"] == 2
    assert (tmp_path / "prune" / "curve-net1989.png").stat().st_size > 0
    assert list_runs(tmp_path)[-1]["kind"] == "prune"


@pytest.mark.parametrize("args,words", [
    (["--fractions", "0,0.5"], "--fractions: 0 is outside (0, 1]"),
    (["--fractions", "1.5"], "1.5 is outside"),
    (["--methods", "global,nosuch"], "unknown pruning method 'nosuch'"),
    (["--models", "vit"], "'vit': expected net1989 or convnet:K"),
    (["--models", "convnet:99"], "convnet size must be an integer from 1 to 64"),
    (["--study", "lowrank", "--ranks", "31"], "h3=31 is larger than H3"),
    (["--study", "lowrank", "--conv-ranks", "13"], "conv=13 is larger"),
    (["--study", "nosuch"], "--study 'nosuch'"),
])
def test_prune_command_bad_input(args, words, tmp_path, capsys):
    code = main(["prune", *args, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "prune").exists()


@pytest.mark.parametrize("args,words", [(["--temperatures", "0,4"], "--temperatures"), (["--alpha", "2"], "--alpha 2"),
                                        (["--seeds", "0"], "--seeds must be >= 1")])
def test_distill_command_bad_input(args, words, tmp_path, capsys):
    code = main(["distill", *args, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err, err
