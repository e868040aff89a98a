"""The diagonal SSM: its parallel form (FFT convolution) against its recurrence, the kernel
against the impulse response, the permuted reading, counts, and the preset through the CLI."""
import json

import torch

from backproplab.cli import main
from backproplab.config import preset
from backproplab.models import ssm
from backproplab.models.registry import build_model, model_macs


def _random_layer(h=5, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    lam = torch.exp(torch.complex(-torch.rand(h, n, generator=g) * 0.3, r(h, n)))   # |lam| in (0.74, 1)
    return lam, torch.complex(r(h, n), r(h, n)), torch.complex(r(h, n), r(h, n)), r(h)


def test_parallel_form_equals_the_recurrence():
    lam, bg, c, d = _random_layer()
    v = torch.randn(3, 5, 40, dtype=torch.float32)
    a = ssm.recurrent_form(lam, bg, c, d, v)
    b = ssm.parallel_form(lam, bg, c, d, v)
    assert a.shape == b.shape == (3, 5, 40)
    assert torch.allclose(a, b, atol=1e-4 * a.abs().max())
    # the same gradients with respect to every parameter
    lam_p = torch.complex(-torch.rand(5, 4) * 0.3, torch.randn(5, 4)).requires_grad_()
    grads = []
    for form in (ssm.recurrent_form, ssm.parallel_form):
        out = form(torch.exp(lam_p), bg, c, d, v)
        grads.append(torch.autograd.grad((out * torch.sin(out)).sum(), lam_p)[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-3 * grads[0].abs().max())


def test_kernel_is_the_impulse_response():
    lam, bg, c, d = _random_layer(seed=1)
    impulse = torch.zeros(1, 5, 30)
    impulse[..., 0] = 1.0
    resp = ssm.recurrent_form(lam, bg, c, torch.zeros(5), impulse)[0]
    assert torch.allclose(ssm.kernel(lam, bg, c, 30), resp, atol=1e-5 * resp.abs().max())


def test_model_forms_agree_and_permutation_reads_pixels_in_fixed_order():
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    m = ssm.SSMNet(2, dim=6, depth=2, states=3)
    fast = m(x)
    m.recurrent = True
    assert torch.allclose(fast, m(x), atol=1e-4)
    p = ssm.SSMNet(2, dim=6, depth=2, states=3, permuted=True)
    perm = ssm.permutation()
    assert sorted(perm.tolist()) == list(range(256)) and not torch.equal(perm, torch.arange(256))
    assert torch.equal(perm, ssm.permutation())                         # fixed: the same order every time
    shuffled = x.reshape(3, 256)[:, perm].reshape(3, 1, 16, 16)
    m.recurrent = False
    assert torch.allclose(p(x), m(shuffled), atol=1e-5)
    assert not torch.allclose(p(x), m(x), atol=1e-3)


def test_stable_for_any_nu_and_counts():
    m = ssm.SSMNet(0)
    with torch.no_grad():
        m.l0_nu.copy_(torch.linspace(-12, 5, m.l0_nu.numel()).view_as(m.l0_nu))
    lam, bg, _, _ = m.ssm(0)
    assert bool((lam.abs() < 1).all()) and torch.isfinite(bg.real).all()
    cfg = preset("ssm")
    net = build_model(cfg.model, 0)
    n = sum(p.numel() for p in net.parameters())
    h, s = cfg.model.dim, ssm.STATES
    assert n == ssm.ssm_params(h, cfg.model.depth) == 2 * h + 2 * (6 * h * s + h * h + 4 * h) + 10 * h + 10
    assert abs(n - 9760) / 9760 < 0.02                                  # matched to the 1989 net
    assert model_macs(cfg.model) == 256 * h + 2 * 256 * h * (8 * s + 1 + h) + 10 * h


def test_preset_trains_from_the_cli(tmp_path, capsys):
    rc = main(["train", "ssm", "--seeds", "2", "data.n_train=48", "data.n_test=16", "train.passes=1",
               "model.seq=permuted", "--out", str(tmp_path), "--json", "--quiet"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["status"] == "finished" and s["seeds"] == 2


def test_sequence_study_models_are_matched():
    from backproplab.experiments.sequence import configs
    from backproplab.models.registry import model_card
    cfgs = configs(2, 1, smoke=True)
    cards = {k: model_card(c.model) for k, c in cfgs.items()}
    assert {c.model.name for c in cfgs.values()} == {"ssm", "vit", "net1989"}
    assert cfgs["ssm (permuted)"].model.seq == "permuted" and cfgs["ssm (in order)"].model.seq == "inorder"
    assert cfgs["transformer (pixels)"].model.patch == 1                # one token a pixel
    assert all(abs(c["params"] - 9760) / 9760 < 0.15 for c in cards.values())
    assert all(c.train.seeds == 2 and c.data.val > 0 for c in cfgs.values())
