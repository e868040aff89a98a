"""qat (quantization-aware training) against its oracles: the fake-quantized weights against torchao's
per-channel observer + torch.fake_quantize_per_channel_affine and against the int8 weights PT2E's
convert stores; one step of the engine against a hand-written straight-through step (two replicas,
the fast path and autograd); `start`; a stopped and resumed run equal bit for bit; bad options."""
import pytest
import torch

from backproplab.cli import main
from backproplab.engine.kernelgrad import kernel_reason
from backproplab.engine.population import Population
from backproplab.engine.train import train
from backproplab.methods.qat import fake_quantize
from backproplab.methods.registry import get_method

from test_methods import (LR0, TOL, X, Y, assert_telling, assert_weights, descend, grads, init, public_run,
                          stop_and_resume, tiny_cfg, xy)


def observer_fake_quant(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The library's per-channel symmetric weight quantization of one tensor (out, ...): torchao's
    PerChannelMinMaxObserver as the x86 quantizer configures it, then torch's fake-quant op."""
    from backproplab.experiments.quantize import _quiet
    _quiet()
    from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    obs = PerChannelMinMaxObserver(dtype=torch.int8, quant_min=qmin, quant_max=qmax,
                                   qscheme=torch.per_channel_symmetric, ch_axis=0, eps=2 ** -12)
    obs(w)
    scale, zp = obs.calculate_qparams()
    return torch.fake_quantize_per_channel_affine(w, scale.float(), zp.to(torch.int32), 0, qmin, qmax)


def q_params(p: dict, bits: int = 8) -> dict:
    """Net1989's weights (*_w) fake-quantized by the library; biases as they are."""
    return {n: (observer_fake_quant(v.detach(), bits) if n.endswith("_w") else v.detach()).requires_grad_()
            for n, v in p.items()}


@pytest.fixture(scope="module")
def tiny():
    from backproplab.data import load_dataset
    return load_dataset("mnist10k", 64, 32)


@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quantize_is_the_observers_per_channel_fake_quant(bits):
    gen = torch.Generator().manual_seed(1)
    for shape in ((12, 1, 5, 5), (12, 8, 5, 5), (30, 192), (10, 30)):
        w = torch.randn(2, *shape, generator=gen) * torch.rand(2, shape[0], *[1] * (len(shape) - 1), generator=gen)
        w[1, 3] = 0.0                                   # a pruned channel: the scale floor, zeros stay zeros
        w[0, 2].view(-1)[0] = -w[0, 2].abs().max()      # a channel's negative extreme: -qmin + 1/2 steps, kept
        got = fake_quantize(w, bits)
        for r in range(2):
            assert torch.equal(got[r], observer_fake_quant(w[r], bits)), (shape, r)
        assert torch.equal(got[1, 3], torch.zeros_like(got[1, 3]))
        amax = w.abs().flatten(2).amax(2).view(2, -1, *[1] * (len(shape) - 1))
        step = (amax / ((2 ** bits - 1) / 2)).clamp_min(2 ** -12)   # the scale, floored as the observer floors it
        assert (got[0] / step[0]).round().unique().numel() > 2 ** (bits - 1)  # many levels used, not a degenerate scale
        err = (got - w).abs()  # within half a step (the clamped top weight: half a step, to float rounding)
        assert float(err.max()) > 0 and bool((err <= step / 2 + 1e-6 * amax).all())


@pytest.mark.parametrize("bits", [8, 3])
def test_the_compiled_loop_is_fake_quantize(bits):
    """forward_weights on a CPU population (numba, one loop over W's channel segments) gives
    fake_quantize's weights bit for bit, quantizes only the *_w weights, and leaves W alone."""
    from backproplab.methods.qat import quantized_names
    eng = Population(tiny_cfg(f"qat:bits={bits}"), [0, 1, 2])
    c = eng.ctx
    c.step, c.total_steps = 0, 4
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        eng.W.copy_(torch.randn(eng.W.shape, generator=gen) * torch.rand(3, 1, generator=gen))
        eng.views["h3_w"][1, 7] = 0.0
    before = eng.W.clone()
    got = c.views_of(dict(eng.switches)["qat"].forward_weights(c))
    assert torch.equal(eng.W, before)
    assert quantized_names(c) == ["h1_w", "h2_w", "h3_w", "out_w"]
    for n in c.param_names:
        want = fake_quantize(c.views[n], bits) if n.endswith("_w") else c.views[n]
        assert torch.equal(got[n], want), n


def test_pt2e_stores_exactly_the_fake_quantized_weights():
    """PTQ of a net with int8 weights per channel (convert_pt2e) keeps what qat trains at."""
    from backproplab.config import preset
    from backproplab.experiments import quantize as qz
    from backproplab.models.net1989 import H2_TABLE
    p = {n: v.detach() for n, v in init(3).items()}
    deployed = qz.deployable(preset("modern").model, {n: v.numpy() for n, v in p.items()})
    stored = qz._stored(qz.ptq(deployed, X[:64]))
    q8 = {tuple(t.shape): t for t in stored.values() if t.dtype == torch.int8}
    scales = {t.numel(): t for k, t in stored.items() if "scale" in k and t.numel() in (10, 30)}
    want = {n: fake_quantize(p[n][None], 8)[0] for n in ("h1_w", "h2_w", "h3_w", "out_w")}
    assert torch.equal(q8[(30, 192)].float() * scales[30][:, None], want["h3_w"])
    assert torch.equal(q8[(10, 30)].float() * scales[10][:, None], want["out_w"])
    h2 = q8[(12, 12, 5, 5)].float()
    conv_scales = [t for k, t in stored.items() if "scale" in k and t.numel() == 12]
    dense = torch.zeros(12, 12, 5, 5)
    dense[torch.arange(12)[:, None], torch.from_numpy(H2_TABLE)] = want["h2_w"]
    assert any(torch.equal(h2 * s.view(-1, 1, 1, 1), dense) for s in conv_scales)
    assert any(torch.equal(q8[(12, 1, 5, 5)].float() * s.view(-1, 1, 1, 1), want["h1_w"]) for s in conv_scales)


def ste_step(seed, x, y, lr=LR0, quantize=True):
    """One SGD step by hand: the gradient at the library-quantized weights applied to the float ones."""
    p = init(seed)
    g = grads(q_params(p) if quantize else p, x, y)
    return descend(p, g, lr)


@pytest.mark.parametrize("path", ["auto", "autograd"])
def test_one_step_is_the_straight_through_step_two_replicas(path):
    eng = Population(tiny_cfg("qat"), [0, 1], path=path)
    if path == "auto":
        assert eng.path == ("kernel" if kernel_reason(eng.cfg) is None else "fused")  # qat keeps the fast path
    eng.train_pass(X[:16].reshape(-1, 16, 16).numpy(), Y[:16].numpy(), None)
    eng.end_pass()
    got = eng.params()
    for r in range(2):
        want = ste_step(r, X[:16], Y[:16])
        assert_weights(got[r], want, rtol=1e-5, atol=1e-7)
        assert_telling(want, ste_step(r, X[:16], Y[:16], quantize=False))
        # the step moved the float weights, which are not on the int8 grid: STE, not training Q(w)
        assert not torch.equal(torch.as_tensor(got[r]["h3_w"]), fake_quantize(torch.as_tensor(got[r]["h3_w"])[None])[0])


def test_start_turns_fake_quantization_on_after_that_fraction_of_the_steps():
    eng = Population(tiny_cfg("qat:start=0.25"), [0])   # T = 2 passes of 2 steps: on from step 1
    eng.train_pass(X[:32].reshape(-1, 16, 16).numpy(), Y[:32].numpy(), None)   # steps 0 and 1
    eng.end_pass()
    p = init(0)
    p = descend(p, grads(p, X[:16], Y[:16]), LR0)                               # step 0: float weights
    want = descend(p, grads(q_params(p), X[16:32], Y[16:32]), LR0)              # step 1: at Q(w)
    assert_weights(eng.params()[0], want, rtol=1e-5, atol=1e-7)
    p = init(0)
    p = descend(p, grads(p, X[:16], Y[:16]), LR0)
    assert_telling(want, descend(p, grads(p, X[16:32], Y[16:32]), LR0))


def sig_qat(tiny):
    """Through train() (the command's path): one step at Q(w), applied to w."""
    x, y = xy(tiny, 16)
    p = init()
    want = descend(p, grads(q_params(p), x, y), LR0)
    assert_weights(public_run(tiny, "qat").params[0], want, **TOL)
    assert_telling(want, descend(p, grads(p, x, y), LR0))


ORACLES_QAT = {"qat": lambda name: test_one_step_is_the_straight_through_step_two_replicas("auto")}


def test_qat_through_train(tiny):
    sig_qat(tiny)


def test_qat_resumes_bit_identical(tiny, tmp_path):
    """Two replicas, 3 passes of 4 steps, fake quantization from step 5 (inside pass 2): stopped after
    pass 1 and resumed, every weight hash and evaluation is the uninterrupted run's."""
    full = stop_and_resume(tiny_cfg("qat:start=0.4", over=["train.passes=3", "train.seeds=2"]), tiny, tmp_path, 1)
    assert full.final[0]["weights_sha256"] != full.final[1]["weights_sha256"]
    assert full.final[0]["weights_sha256"] != train(tiny_cfg(over=["train.passes=3", "train.seeds=2"]),
                                                    data=tiny).final[0]["weights_sha256"]


@pytest.mark.parametrize("spec,says", [("qat:bits=1", "bits"), ("qat:bits=9", "bits"), ("qat:bits=eight", "bits"),
                                       ("qat:start=1", "start"), ("qat:start=-0.1", "start"),
                                       ("qat:scale=0.1", "scale")])
def test_bad_options_are_one_line_errors(spec, says, tmp_path, capsys):
    code = main(["train", "modern_smoke", f"+method={spec}", "--json", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "qat" in lines[0] and says in lines[0], err
    assert not list(tmp_path.iterdir())


def test_qat_card():
    m = get_method("qat")
    assert m.fast and m.hooks == ("forward",) and m.options["bits"].default == 8 and m.options["start"].default == 0.0
    assert "Jacob" in m.paper and "Krishnamoorthi" in m.paper and "2018" in m.paper
    assert m.rank == max(x.rank for x in __import__("backproplab.methods.registry", fromlist=["x"]).list_methods())
    assert m.rank > get_method("adopt").rank  # the last family: no earlier rank (random-stream key) moved
