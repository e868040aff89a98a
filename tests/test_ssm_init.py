"""The SSM's eigenvalue initializations (S4D-Lin and the LRU ring), the learning-rate factor of the A
parameters, the GLU mixing and the final norm, checked against their formulas."""
import math

import pytest
import torch

from backproplab.config import preset
from backproplab.errors import UserError
from backproplab.models import ssm
from backproplab.models.registry import build_model


def _log_lam(m, i):
    lam = m.ssm(i)[0].detach()
    return torch.log(lam.abs()), lam.angle()


def test_s4d_lin_init_is_zoh_of_a_harmonic_ladder():
    m = ssm.SSMNet(0, dim=200, depth=1, states=6, init="s4d")
    logmag, ang = _log_lam(m, 0)
    dt = -2.0 * logmag                                                  # |lam| = exp(-dt / 2)
    assert torch.allclose(dt, dt[:, :1].expand_as(dt), rtol=2e-3)   # float32 log|lam| near 1       # one step per channel
    assert float(dt.min()) >= ssm.DT_MIN * 0.999 and float(dt.max()) <= ssm.DT_MAX * 1.001
    below = float((dt[:, 0] < math.sqrt(ssm.DT_MIN * ssm.DT_MAX)).float().mean())
    assert 0.35 < below < 0.65                                          # log-uniform: half below the geometric middle
    n = torch.arange(1, 6, dtype=torch.float32)
    # phase of state n: pi n dt (angle() is taken mod 2 pi: dt <= 0.1 keeps pi n dt < pi for n <= 5)
    assert torch.allclose(ang[:, 1:], math.pi * n * dt[:, 1:], atol=1e-4)
    assert bool((ang[:, 0].abs() < 1e-3).all())                         # n = 0: a real decay


def test_lru_ring_init_is_in_the_stated_ring():
    r_min, r_max, phase = 0.6, 0.95, 0.7
    m = ssm.SSMNet(1, dim=64, depth=2, states=8, init="lru", r_min=r_min, r_max=r_max, max_phase=phase)
    for i in range(2):
        logmag, ang = _log_lam(m, i)
        mag2 = torch.exp(2 * logmag)
        assert float(mag2.min()) >= r_min ** 2 - 1e-5 and float(mag2.max()) <= r_max ** 2 + 1e-5
        # |lam|^2 uniform in [r_min^2, r_max^2]: its mean is the middle of the ring
        assert abs(float(mag2.mean()) - (r_min ** 2 + r_max ** 2) / 2) < 0.02
        assert float(ang.min()) >= 0.0 and float(ang.max()) <= phase + 1e-5
        bg = m.ssm(i)[1].detach()
        gamma = torch.sqrt(1 - mag2)
        b = torch.complex(getattr(m, f"l{i}_b_re"), getattr(m, f"l{i}_b_im")).detach()
        assert torch.allclose(bg, b * gamma, atol=1e-6)                 # the LRU's input normalization


def test_preset_uses_s4d_lin_and_is_matched():
    net = build_model(preset("ssm").model, 0)
    dt = -2.0 * torch.log(net.ssm(0)[0].detach().abs())
    assert float(dt.min()) >= ssm.DT_MIN * 0.999 and float(dt.max()) <= ssm.DT_MAX * 1.001
    assert torch.allclose(dt, dt[:, :1].expand_as(dt), rtol=2e-3)   # float32 log|lam| near 1


def test_a_lr_scales_the_eigenvalue_parameters_step():
    full, slow = ssm.SSMNet(3, dim=8, depth=1, states=4), ssm.SSMNet(3, dim=8, depth=1, states=4, a_lr=0.1)
    for a, b in zip(full.ssm(0), slow.ssm(0)):
        assert torch.allclose(a, b, atol=1e-6)                          # the same model at init
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    for m in (full, slow):
        m(x).square().sum().backward()
        with torch.no_grad():   # one sign-SGD step of size 0.01 (Adam's step size is the rate) on nu
            m.l0_nu -= 0.01 * torch.sign(m.l0_nu.grad)
    d_full = full.l0_nu * full.a_scale - ssm.SSMNet(3, dim=8, depth=1, states=4).l0_nu
    d_slow = slow.l0_nu * slow.a_scale - ssm.SSMNet(3, dim=8, depth=1, states=4, a_lr=0.1).l0_nu * 0.1
    assert torch.allclose(d_slow, 0.1 * d_full, atol=1e-6)              # nu moves 10 times less


def test_glu_and_final_norm_keep_the_forms_equal():
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    m = ssm.SSMNet(4, dim=6, depth=2, states=3, glu=True, final_norm=True, enc_bias=True)
    assert m.l0_mix_w.shape == (12, 6)
    fast = m(x)
    m.recurrent = True
    assert torch.allclose(fast, m(x), atol=1e-4)
    with torch.no_grad():      # the final norm's gain and bias at 0: every digit gets the head's bias
        m.out_ln_w.zero_()
        m.out_ln_b.zero_()
    assert torch.allclose(m(x), m.head_b.expand(3, 10)) and fast.std(0).min() > 0
    # the block by hand: torch's LayerNorm over the channels, the SSM, GELU, the mixing, then GLU
    # (first half times the sigmoid of the second) added to the input
    m.recurrent = False
    h = torch.randn(2, 6, 256)
    v = torch.nn.functional.layer_norm(h.transpose(1, 2), (6,), m.l0_ln_w, m.l0_ln_b, 1e-5).transpose(1, 2)
    z = m.l0_mix_w @ torch.nn.functional.gelu(ssm.parallel_form(*m.ssm(0), v)) + m.l0_mix_b[:, None]
    assert torch.allclose(m.layer(0, h), h + z[:, :6] * torch.sigmoid(z[:, 6:]), atol=1e-5)


def test_bad_options_are_one_line_errors():
    for kw in ({"init": "hippo"}, {"r_min": 0.99, "r_max": 0.9}, {"a_lr": 0.0}):
        with pytest.raises(UserError):
            ssm.SSMNet(0, dim=4, depth=1, states=2, **kw)
