"""Architecture search (search/nas.py, `backproplab nas`): evolution's mechanics, the space and its
budget, the synflow proxy against a hand computation, Spearman against scipy, a smoke run, bad input."""
import json

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from backproplab.cli import main
from backproplab.models import convnet as cn
from backproplab.search import nas
from backproplab.search.nas import Arch, Evaluator, RegularizedEvolution, mutate


class ScriptedRng:
    """Draws what the test says (integers, choice) and records choice()'s answers."""

    def __init__(self, choices=(), ints=()):
        self.choices, self.ints, self.drawn = list(choices), list(ints), []

    def choice(self, n, size, replace):
        idx = np.asarray(self.choices.pop(0))
        assert len(idx) == size and not replace and idx.max() < n
        self.drawn.append(idx)
        return idx

    def integers(self, n):
        return self.ints.pop(0) % n


ARCHS = nas.space(10_000)


def test_aging_removes_the_oldest_not_the_worst():
    evo = RegularizedEvolution(ARCHS, np.random.default_rng(0), population=3, sample=2)
    members = ARCHS[:4]
    for a, err in zip(members, [1.0, 9.0, 8.0, 7.0]):   # the first is the best, and the oldest
        evo.tell(a, err)
    assert [m[0] for m in evo.population] == members[1:]
    assert len(evo.history) == 4


def test_tournament_picks_the_best_of_the_sample():
    evo = RegularizedEvolution(ARCHS, ScriptedRng(choices=[[0, 2, 3], [1, 3, 4]]), population=5, sample=3)
    for a, err in zip(ARCHS[:5], [5.0, 1.0, 4.0, 3.0, 2.0]):
        evo.tell(a, err)
    assert evo.tournament() == ARCHS[3]     # best of errors 5, 4, 3 (member 1 at 1.0 was not drawn)
    assert evo.tournament() == ARCHS[1]     # best of 1, 3, 2


def test_tournament_ties_go_to_the_older_member():
    evo = RegularizedEvolution(ARCHS, ScriptedRng(choices=[[1, 2]]), population=3, sample=2)
    for a, err in zip(ARCHS[:3], [0.5, 2.0, 2.0]):
        evo.tell(a, err)
    assert evo.tournament() == ARCHS[1]


def test_mutation_stays_in_the_space_and_under_the_budget():
    budget = 6000
    archs = nas.space(budget)
    inside = set(archs)
    rng = np.random.default_rng(1)
    for a in archs:
        for _ in range(5):
            child = mutate(a, rng, inside)
            assert child in inside and child.params <= budget
            changed = [k for k in nas.DIMENSIONS if getattr(child, k) != getattr(a, k)]
            assert child != a and 1 <= len(changed) <= 2        # one edit (depth 0 also resets the kernel)
            assert len(changed) == 1 or (child.depth == 0 and "depth" in changed)


def test_space_budget_and_canonical_kernel():
    archs = nas.space(10_000)
    assert all(a.params <= 10_000 for a in archs) and len(set(archs)) == len(archs)
    assert all(a.kernel == 3 for a in archs if a.depth == 0)
    missing = [a for d in (0, 1, 2, 3) for w in range(1, 7) for k in (3, 5) for b in cn.BLOCKS
               if (a := Arch(d, w, k, b).canonical()).params <= 10_000 and a not in archs]
    assert not missing
    by_macs = nas.space(200_000, "macs")
    assert all(a.macs <= 200_000 for a in by_macs)


@pytest.mark.parametrize("arch", [Arch(2, 3, 3, "separable"), Arch(1, 2, 3, "plain"), Arch(3, 1, 3, "inverted_residual")])
def test_kernel_3_is_the_registered_family_member(arch):
    ours = arch.build(4)
    ref = cn.ConvNet(4, size=2 * arch.depth + 1, block=arch.block, width=arch.width)
    assert arch.params == cn.conv_params(2 * arch.depth + 1, arch.block, arch.width)
    assert arch.macs == cn.conv_macs(2 * arch.depth + 1, arch.block, arch.width)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), ref.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(ours(x), ref(x))


def test_kernel_5_counts_match_the_module():
    arch = Arch(2, 2, 5, "inverted_residual")
    net = arch.build(0)
    assert sum(p.numel() for p in net.parameters()) == arch.params
    assert net.c3_dw_w.shape[-1] == 5 and net(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    assert arch.params > Arch(2, 2, 3, "inverted_residual").params


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(3, 4, generator=g))
        self.b1 = nn.Parameter(torch.randn(3, generator=g))
        self.w2 = nn.Parameter(torch.randn(2, 3, generator=g))
        self.b2 = nn.Parameter(torch.randn(2, generator=g))

    def forward(self, x):
        return torch.relu(x @ self.w1.t() + self.b1) @ self.w2.t() + self.b2


def test_synflow_against_a_hand_computation():
    net = Tiny()
    W1, b1, W2, b2 = (p.detach().double().abs() for p in (net.w1, net.b1, net.w2, net.b2))
    # with |theta| everything is positive, ReLU is the identity; x = 1, R = sum(W2 h + b2), h = W1 1 + b1
    h = W1.sum(1) + b1
    col = W2.sum(0)                   # dR/dh_j = sum_i W2_ij
    hand = (W2 * h).sum() + b2.sum() + (col[:, None] * W1).sum() + (col * b1).sum()
    assert nas.synflow(net, (1, 4)) == pytest.approx(float(hand), rel=1e-12)
    assert torch.equal(net.w1, Tiny().w1)       # the model itself is untouched (no abs in place)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spearman_against_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, 40).astype(float)       # many ties
    b = a * 0.5 + rng.normal(size=40)
    assert nas.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
    assert nas.spearman(a, -a) == pytest.approx(-1.0)


def test_equal_compute_and_repeats_are_free():
    tab = {a.key: {"arch": a.__dict__, "errors": [float(i), float(i) / 2]} for i, a in enumerate(ARCHS)}
    ev = Evaluator(tab, fidelity=2, compute=6)
    for a in ARCHS[:3]:
        ev(a)
    assert ev.spent == 6 and not ev.can_pay()
    assert ev(ARCHS[0]) == 0.0                      # seen before: free
    with pytest.raises(nas.OutOfCompute):
        ev(ARCHS[5])
    for strat in nas.STRATEGIES:                    # every strategy spends exactly the compute it was given
        ev = Evaluator(tab, 1, 7)
        getattr(nas, f"run_{strat}")(*((ev, ARCHS, np.random.default_rng(0)) if strat != "tpe" else (ev, ARCHS, 0)))
        assert ev.spent == 7 and len(ev.seen) == 7


def test_nas_smoke_command(tmp_path, capsys):
    assert main(["nas", "--smoke", "--json", "--out", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["architectures"] == 8
    assert {(r["strategy"], r["fidelity"]) for r in res["search"]} == {(s, f) for s in nas.STRATEGIES for f in (1, 2)}
    assert all(r["regret_mean"] >= 0 for r in res["search"])
    assert -1 <= res["proxy"]["synflow"] <= 1 and 0 <= res["final"]["test_error"] <= 100
    assert (tmp_path / "nas" / "result.json").exists()


@pytest.mark.parametrize("argv,words", [
    (["--budget", "100"], "no architecture of the space has at most 100 params"),
    (["colour=red"], "unknown dimension 'colour'"),
    (["kernel=4"], "kernel=4 is not in the space"),
    (["--strategies", "annealing"], "unknown search strategy 'annealing'"),
])
def test_nas_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, words):
    assert main(["nas", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0]
    assert not (tmp_path / "nas").exists()          # nothing trained, nothing written
