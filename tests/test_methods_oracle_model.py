"""Oracles for the methods that change the model, the data or the number format: the layer
written out with torch.nn.functional / torch.nn modules, the mask formulas with the same
generator draws, index arithmetic for shifts, torch.rot90 and bilinear formulas for
rotations and scalings. Collected with the training-side oracles in test_methods_oracle.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from backproplab.data.augment import shift_images
from backproplab.methods.augment import RotateScale, Shift, pass_generator, rotate_scale_images
from backproplab.models.modnet import ModNet, act_gain, dropout_mask, scaled_ws
from backproplab.models.net1989 import Net1989

from test_methods import X, Y, close, flat, h2_dense, net, run_engine, tiny_cfg


def manual(m, x, h1=None, h3=None, h2=None, norm=lambda s, a: a):
    """Net1989's forward written out, with places to insert what a method does."""
    f = F.relu
    z = f(norm("h1", F.conv2d(F.pad(x, (2, 2, 2, 2), value=-1.0), m.h1_w, stride=2) + m.h1_b))
    z = h1(z) if h1 else z
    z = f(norm("h2", F.conv2d(F.pad(z, (2, 2, 2, 2), value=-1.0), h2_dense(m.h2_w), stride=2) + m.h2_b))
    z = z.flatten(1)
    z = h2(z) if h2 else z
    z = f(norm("h3", h3(z) if h3 else z @ m.h3_w.t() + m.h3_b))
    return z @ m.out_w.t() + m.out_b


def keep_scaled(shape, p, gen):
    # the mask formula written out: one uniform draw per unit from the model's generator, in the
    # order the layer draws them; kept where the draw is >= p, kept units scaled by 1 / (1 - p)
    return (torch.rand(shape, generator=gen) >= p).float() / (1 - p)


def _noisy(**kw):
    m = ModNet(0, act="relu", out_act="none", **kw)
    m.gen = torch.Generator().manual_seed(5)
    return m, torch.Generator().manual_seed(5)


def oracle_dropout(name):
    mask = dropout_mask((400, 192), 0.25, torch.Generator().manual_seed(1))
    assert set(mask.unique().tolist()) == {0.0, float(torch.tensor(1 / 0.75))}
    assert abs(float((mask == 0).float().mean()) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / mask.numel())
    assert torch.equal(mask, keep_scaled((400, 192), 0.25, torch.Generator().manual_seed(1)))
    m, g = _noisy(drop=0.25)
    close(m(X[:16]), manual(m, X[:16], h2=lambda z: z * keep_scaled(z.shape, 0.25, g)))
    m.eval()
    close(m(X[:16]), manual(m, X[:16]), rtol=0, atol=0)


def keep_hashed(shape, p, gen):
    # DropConnect's mask written out (models/noise.py): one 63-bit key from the model's generator,
    # splitmix64 of key + (i + 1) * golden (mod 2^64) gives entries 4i..4i+3, 16 bits each from the
    # low end; kept where the 16 bits are >= round(p * 65536), kept weights scaled by 1 / (1 - p)
    key = int(torch.randint(0, 2 ** 63 - 1, (1,), generator=gen))
    n, full = math.prod(shape), 2 ** 64 - 1
    bits = []
    for i in range((n + 3) // 4):
        z = (key + (i + 1) * 0x9E3779B97F4A7C15) & full
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & full
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & full
        z ^= z >> 31
        bits += [(z >> (16 * j)) & 0xFFFF for j in range(4)]
    keep = torch.tensor(bits[:n]).view(shape) >= round(p * 65536)
    return keep.float() / (1 - p)


def oracle_dropconnect(name):
    m, g = _noisy(dropconnect=0.25)
    masks = keep_hashed((16, 30, 192), 0.25, torch.Generator().manual_seed(5))
    assert abs(float((masks == 0).float().mean()) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / masks.numel())

    def loop(z):  # one masked weight matrix per example
        masks = keep_hashed((len(z), 30, 192), 0.25, g)
        return torch.stack([(m.h3_w * masks[i]) @ z[i] + m.h3_b for i in range(len(z))])
    close(m(X[:16]), manual(m, X[:16], h3=loop))


def oracle_spatial_dropout(name):
    m, g = _noisy(spatial=0.5)
    masks = []

    def h1(z):
        masks.append(keep_scaled((len(z), 12, 1, 1), 0.5, g))
        return z * masks[0]
    close(m(X[:16]), manual(m, X[:16], h1=h1))
    assert 0 < float((masks[0] == 0).float().mean()) < 1


def _block(m, i, z):
    h = F.conv2d(F.relu(F.conv2d(z, getattr(m, f"b{i}a_w"), getattr(m, f"b{i}a_b"), padding=1)),
                 getattr(m, f"b{i}b_w"), getattr(m, f"b{i}b_b"), padding=1)
    return h


def oracle_stochastic_depth(name):
    m, g = _noisy(blocks=2, drop_path=0.5)

    def blocks(z):
        for i in range(2):  # block i drops with p (i + 1) / L
            z = z + _block(m, i, z) * keep_scaled((len(z), 1, 1, 1), 0.5 * (i + 1) / 2, g)
        return z
    close(m(X[:16]), manual(m, X[:16], h1=blocks))


def oracle_resblocks(name):
    m = ModNet(0, act="relu", out_act="none", blocks=2)
    close(m(X[:16]), manual(m, X[:16], h1=lambda z: (lambda z1: z1 + _block(m, 1, z1))(z + _block(m, 0, z))))
    assert sum(p.numel() for p in m.parameters()) == 9760 + 2 * 2616


def oracle_rezero(name):
    m = ModNet(0, act="relu", out_act="none", blocks=1, rezero=True)
    assert torch.equal(m(X[:16]), Net1989(0, act="relu", out_act="none")(X[:16]))
    F.cross_entropy(m(X[:16]), Y[:16]).backward()
    ys = []

    def h1(z):
        y = z + m.b0_alpha.detach() * _block(m, 0, z)
        y.retain_grad()
        ys.append((y, _block(m, 0, z).detach()))
        return y
    F.cross_entropy(manual(m, X[:16], h1=h1), Y[:16]).backward()
    y, branch = ys[0]
    close(m.b0_alpha.grad, (y.grad * branch).sum(), rtol=1e-4, atol=1e-7)
    assert float(m.b0_alpha.grad) != 0


def _norm_oracle(kind, make):
    m = ModNet(0, act="relu", out_act="none", norm=kind)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("_ng", "_nb")):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    mods = {s: make(s, c, getattr(m, f"{s}_ng"), getattr(m, f"{s}_nb")) for s, c in m.sites.items()}
    close(m(X[:16]), manual(m, X[:16], norm=lambda s, a: mods[s](a)), rtol=1e-4, atol=1e-5)
    return m, mods


def oracle_batchnorm(name):
    def make(s, c, w, b):
        bn = (torch.nn.BatchNorm1d if s == "h3" else torch.nn.BatchNorm2d)(c)
        bn.weight.data, bn.bias.data = w.detach(), b.detach()
        return bn
    m, mods = _norm_oracle("batch", make)
    close(m.h1_rm, mods["h1"].running_mean)
    close(m.h3_rv, mods["h3"].running_var)


def oracle_layernorm(name):
    def make(s, c, w, b):
        shape = (-1, 1, 1) if s != "h3" else (-1,)
        return lambda a: F.layer_norm(a, a.shape[1:]) * w.view(shape) + b.view(shape)
    _norm_oracle("layer", make)


def oracle_groupnorm(name):
    def make(s, c, w, b):
        gn = torch.nn.GroupNorm(math.gcd(4, c), c)
        gn.weight.data, gn.bias.data = w.detach(), b.detach()
        return gn
    _norm_oracle("group", make)


def oracle_nonorm(name):
    a = run_engine(tiny_cfg("nonorm"))
    b = run_engine(tiny_cfg())
    close(a.W[0], b.W[0])  # nonorm trains on the autograd path, the plain net on the fused one
    assert torch.equal(ModNet(0, "relu", "none")(X[:16]), Net1989(0, "relu", "none")(X[:16]))


def oracle_nf(name):
    assert abs(act_gain("relu") - math.sqrt(2 / (1 - 1 / math.pi))) < 1e-6
    gen = torch.Generator().manual_seed(0)
    for shape in ((30, 192), (12, 8, 5, 5)):  # H3 and H2's shared kernels: a unit is a slice of axis 0
        w = torch.randn(shape, generator=gen) * 0.3 + 0.1
        v = scaled_ws(w, 1.5).flatten(1)
        fan_in = v.shape[1]
        close(v.mean(1), torch.zeros(len(v)), atol=1e-6, rtol=0)
        close(v.var(1, unbiased=False) * fan_in, torch.full((len(v),), 1.5 ** 2), rtol=1e-4, atol=0)
    m = ModNet(0, act="relu", out_act="none", ws=True)
    out = m(X[:16])
    m.ws = False
    gain = math.sqrt(2 / (1 - 1 / math.pi))  # 1 / std(relu(z)), z ~ N(0, 1)
    with torch.no_grad():
        for k in ("h1_w", "h2_w", "h3_w"):  # gain (w - mean) / (std sqrt(fan_in)) per output unit, biased std
            w = getattr(m, k)
            flat_w = w.flatten(1)
            mean, std = flat_w.mean(1), flat_w.std(1, unbiased=False)
            w.copy_((gain * (flat_w - mean[:, None]) / (std[:, None] * math.sqrt(flat_w.shape[1]))).view_as(w))
    close(out, m(X[:16]))


def oracle_fp32(name):
    assert torch.equal(run_engine(tiny_cfg("fp32")).W[0], run_engine(tiny_cfg()).W[0])


def oracle_bf16(name):
    eng = run_engine(tiny_cfg("bf16"), n=16)
    # channels-last, the engine's layout: on a CPU without native bfloat16 (AVX2) oneDNN's bf16
    # input gradient rounds differently for NCHW (H1's gradient 0.5% apart, both 0.35% from float64)
    m = net().to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(X[:16].contiguous(memory_format=torch.channels_last))
    loss = F.cross_entropy(out.float(), Y[:16])
    g = torch.autograd.grad(loss, list(m.parameters()))
    close(eng.W[0], flat(m) - 0.05 * torch.cat([t.reshape(-1) for t in g]))
    with torch.no_grad():
        ref = F.cross_entropy(m(X[:16]), Y[:16])
    lv = float(loss.detach())
    assert lv != float(ref) and abs(lv / float(ref) - 1) < 0.02


# -- data --------------------------------------------------------------------------------------
class _C:
    pass_idx = 3


def translated(img, dy, dx):  # out[r, c] = img[r - dy, c - dx], -1 off the image
    return F.pad(img, (2, 2, 2, 2), value=-1.0)[..., 2 - dy:18 - dy, 2 - dx:18 - dx]


def oracle_shift(name):
    x = X[:16]

    def shifted(seed, pass_idx, rank=30):
        sw = Shift({"max": 2}, rank=rank, seeds=[seed])
        sw.pass_start(type("C", (), {"pass_idx": pass_idx}))
        return sw.batch(x.unsqueeze(0), None)[0]  # a population of one replica
    out = shifted(7, 3)
    found = []
    for i in range(16):  # each image is exactly one translation within [-2, 2]^2 of its input
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(out[i], translated(x[i], dy, dx))]
        assert len(hits) == 1, (i, hits)
        dy, dx = hits[0]
        for r in range(16):  # the translation pixel by pixel
            for c in range(16):
                inside = 0 <= r - dy < 16 and 0 <= c - dx < 16
                assert float(out[i, 0, r, c]) == (float(x[i, 0, r - dy, c - dx]) if inside else -1.0)
        found.append(hits[0])
    assert len(set(found)) >= 6  # the translations are drawn, not fixed
    assert torch.equal(out, shift_images(x, found))
    # the draws are the (seed, pass, consumer) stream's: reproducible, and another key draws others
    assert torch.equal(shifted(7, 3), out)
    assert not torch.equal(shifted(7, 4), out) and not torch.equal(shifted(8, 3), out)
    assert not torch.equal(shifted(7, 3, rank=31), out)


def test_pass_generator_streams_are_keyed_by_seed_pass_and_tag():
    draw = lambda *key: torch.rand(2000, generator=pass_generator(*key))  # noqa: E731
    ref = draw(3, 1, 100)
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(draw(3, 1, 100), ref)
    for key in ((4, 1, 100), (3, 2, 100), (3, 1, 101), (1, 3, 100), (100, 1, 3), (0, 0, 0)):
        other = draw(*key)
        # a stream of its own, not the same numbers nor the same numbers shifted along: two streams of
        # 2,000 float32 draws share about 0.25 values by chance
        assert len(set(ref.tolist()) & set(other.tolist())) < 10, key
        assert abs(float(torch.corrcoef(torch.stack([ref, other]))[0, 1])) < 0.1, key
        assert abs(float(other.mean()) - 0.5) < 0.03


def oracle_rotate_scale(name):
    x = X[:4]
    close(rotate_scale_images(x, torch.zeros(4), torch.ones(4)), x, rtol=0, atol=1e-5)
    # positive angles turn clockwise on the screen (row 0 at the top): torch.rot90 from columns towards rows
    close(rotate_scale_images(x, torch.full((4,), math.pi / 2), torch.ones(4)), torch.rot90(x, 1, (3, 2)),
          rtol=0, atol=1e-5)
    z = rotate_scale_images(x, torch.zeros(4), torch.full((4,), 2.0))
    # scale 2: output pixel j samples the input at (j - 7.5) / 2 + 7.5 (bilinear, separable)
    j = (torch.arange(16.0) - 7.5) / 2 + 7.5
    lo, fr = j.floor().long(), j - j.floor()
    rows = x[:, :, lo] * (1 - fr).view(-1, 1) + x[:, :, lo + 1] * fr.view(-1, 1)
    expect = rows[:, :, :, lo] * (1 - fr) + rows[:, :, :, lo + 1] * fr
    close(z, expect, rtol=0, atol=1e-5)
    sw = RotateScale({"degrees": 10.0, "scale": 0.1}, rank=31, seeds=[0])
    sw.pass_start(_C)
    assert not torch.equal(sw.batch(x.unsqueeze(0), _C)[0], x)


def oracle_standardize(name):
    eng = run_engine(tiny_cfg("standardize"), n=32)
    sw = dict(eng.switches)["standardize"]
    z = (X[:32] - sw.mean) / sw.std
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-5
    m = eng.models[0]
    m.eval()
    with torch.no_grad():
        close(eng.outputs(X[:8])[0], m(z[:8]), rtol=1e-4, atol=1e-5)  # fused path against the module

def oracle_tta(name):
    # n=1 is the plain evaluation; n=5 the mean softmax over the image and its four one-pixel moves,
    # the moves built by slicing a -1-padded copy
    from backproplab.methods.augment import tta_log_probs
    m = Net1989(0, "relu", "none").eval()
    x = X[:12]
    outputs = lambda t: m(t).unsqueeze(0)  # noqa: E731  a population of one
    with torch.no_grad():
        close(tta_log_probs(outputs, x, 1)[0], torch.log_softmax(m(x), -1))
        pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
        moves = [(0, 0), (-1, 0), (0, -1), (0, 1), (1, 0)]
        prob = sum(torch.softmax(m(pad[:, :, 1 - dy:17 - dy, 1 - dx:17 - dx]), -1) for dy, dx in moves) / 5
        close(tta_log_probs(outputs, x, 5)[0], torch.log(prob))


ORACLES_MODEL = {"dropout": oracle_dropout, "dropconnect": oracle_dropconnect,
                 "spatial_dropout": oracle_spatial_dropout, "stochastic_depth": oracle_stochastic_depth,
                 "shift": oracle_shift, "rotate_scale": oracle_rotate_scale, "standardize": oracle_standardize,
                 "batchnorm": oracle_batchnorm, "layernorm": oracle_layernorm, "groupnorm": oracle_groupnorm,
                 "nonorm": oracle_nonorm, "resblocks": oracle_resblocks, "rezero": oracle_rezero, "nf": oracle_nf,
                 "fp32": oracle_fp32, "bf16": oracle_bf16, "tta": oracle_tta}


@pytest.mark.parametrize("name", sorted(ORACLES_MODEL))
def test_oracle_model(name):
    ORACLES_MODEL[name](name)


def test_hashed_keep_factors():
    """models/noise.py: any shape (also one not a multiple of 4), values 0 or 1/(1-p) (dropout_mask's
    scaling), the rate p within 4 sigma, one draw from the generator a mask (the stream goes on from
    there), the same mask for the same generator state, p = 0 keeps everything."""
    from backproplab.models.noise import hashed_keep
    m = hashed_keep((7, 5, 3), 0.3, torch.Generator().manual_seed(9))
    assert m.shape == (7, 5, 3) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, float(torch.ones(()) / 0.7)}
    assert torch.equal(m, keep_hashed((7, 5, 3), 0.3, torch.Generator().manual_seed(9)))
    big = hashed_keep((200, 5760), 0.3, torch.Generator().manual_seed(1))
    assert abs(float((big == 0).float().mean()) - 0.3) < 4 * math.sqrt(0.3 * 0.7 / big.numel())
    g, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = hashed_keep((4, 8), 0.5, g), hashed_keep((4, 8), 0.5, g)
    assert not torch.equal(a, b)                                   # the next key: another mask
    torch.randint(0, 2 ** 63 - 1, (1,), generator=ref)
    torch.randint(0, 2 ** 63 - 1, (1,), generator=ref)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=ref))  # one draw a mask
    assert (hashed_keep((64, 64), 0.0, g) == 1.0).all()
