"""backproplab quantize: the torch.nn form of a trained run against the engine's own evaluation,
int8 weights (per channel, 4x smaller), the int8 net against fp32, QAT, and bad input."""
import json

import numpy as np
import pytest
import torch

from backproplab.cli import main
from backproplab.commands.quantize import load_trained
from backproplab.experiments import quantize as qz
from backproplab.models.net1989 import Net1989
from backproplab.store import list_runs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qrun")
    assert main(["train", "modern", "--seeds", "2", "data.n_train=256", "data.n_test=120", "train.passes=2",
                 "--out", str(d), "--quiet"]) == 0
    return d


def test_deployable_is_the_trained_net(run_dir):
    rec, cfg, reps = load_trained(run_dir)
    assert len(reps) == 2
    x = torch.rand(7, 1, 16, 16) * 2 - 1
    for p in reps:
        net = Net1989(0, act="relu", out_act="none")
        net.load_state_dict({k: torch.as_tensor(v) for k, v in p.items()})
        assert torch.allclose(qz.deployable(cfg.model, p)(x), net(x), atol=1e-5)


def test_ptq_int8_per_channel_and_close_to_fp32(run_dir, digits):
    _, cfg, reps = load_trained(run_dir)
    fp32 = qz.deployable(cfg.model, reps[0])
    int8 = qz.ptq(fp32, digits.train_x[:128])
    stored = qz._stored(int8)
    w8 = [t for t in stored.values() if t.dtype == torch.int8]
    assert sorted(tuple(t.shape) for t in w8) == sorted([(12, 1, 5, 5), (12, 12, 5, 5), (30, 192), (10, 30)])
    scales = sorted(t.numel() for k, t in stored.items() if "scale" in k)
    assert scales == [10, 12, 12, 30]                                      # one scale per output channel
    # dequantized weights are the fp32 weights to half a step of their channel's scale
    w32 = fp32.h3.weight.detach()
    s = [t for k, t in stored.items() if "scale" in k and t.numel() == 30][0]
    q = [t for t in w8 if t.shape == (30, 192)][0]
    assert torch.all((q.float() * s[:, None] - w32).abs() <= s[:, None] / 2 + 1e-7)
    b32, b8 = qz.weight_bytes(fp32), qz.weight_bytes(int8)
    assert b32["weights"] == 4 * b8["weights"] == 4 * (300 + 3600 + 5760 + 300)
    x = digits.test_x[:200]
    a, b = fp32(x), int8(x)
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.95
    bf = qz.bf16(fp32)
    assert next(bf.parameters()).dtype == torch.bfloat16 and qz.weight_bytes(bf)["weights"] == b32["weights"] // 2


def test_cli_ptq_and_qat_leave_the_run_alone(run_dir, capsys):
    rec, cfg, _ = load_trained(run_dir)
    ckpt = next((run_dir / "checkpoints").glob("*.pt"))
    before = ckpt.read_bytes()
    assert main(["quantize", str(run_dir), "--smoke", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["fp32_test_error"] == pytest.approx(rec["summary"]["per_seed"][0]["test_error"])  # the engine's own
    assert s["weights_ratio"] == 4.0 and abs(s["int8_test_error"] - s["fp32_test_error"]) <= 5.0
    assert main(["quantize", str(run_dir), "--smoke", "--qat-passes", "1", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["method"] == "qat" and np.isfinite(s["int8_test_error"]) and np.isfinite(s["qat_fp32_test_error"])
    assert s["qat_path"] in ("kernel", "fused") and s["qat_passes"] == 1   # +method=qat keeps the fast path
    assert ckpt.read_bytes() == before
    assert [r["kind"] for r in list_runs(run_dir)] == ["train", "quantize", "quantize"]


@pytest.mark.parametrize("argv,words", [(["quantize", "{tmp}/nothing"], "no run folder"),
                                        (["quantize", "{tmp}"], "no results store"),
                                        (["quantize", "{run}", "--run", "99"], "id 99"),
                                        (["quantize", "{run}", "--qat-passes", "-1"], "--qat-passes")])
def test_bad_input_one_line_exit_2(run_dir, tmp_path, capsys, argv, words):
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]


def test_models_without_an_int8_path_are_refused(tmp_path, capsys):
    assert main(["train", "ssm", "data.n_train=40", "data.n_test=10", "train.passes=1", "--out", str(tmp_path),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(tmp_path)]) == 2
    assert "model.name=ssm" in capsys.readouterr().err


def test_qat_fine_tunes_the_stored_weights_on_the_engine(run_dir, digits):
    """quantize --qat-passes: a population of the run's replicas starts from their stored weights and
    trains with +method=qat (a vanishing rate leaves them; a real one moves them), and PT2E then stores
    the fine-tuned weights fake-quantized."""
    from backproplab.methods.qat import fake_quantize
    _, cfg, reps = load_trained(run_dir)
    x, y = digits.train_x[:64].reshape(-1, 16, 16).numpy(), digits.train_labels[:64].numpy()
    still, path = qz.qat_finetune(cfg, reps, x, y, 1, 1e-12, [0, 1])
    moved, _ = qz.qat_finetune(cfg, reps, x, y, 1, 3e-3, [0, 1])
    assert path in ("kernel", "fused")
    for r in range(2):
        assert max(float(np.abs(still[r][n] - reps[r][n]).max()) for n in reps[r]) < 1e-8
        assert float(np.abs(moved[r]["h3_w"] - reps[r]["h3_w"]).max()) > 1e-4
    stored = qz._stored(qz.ptq(qz.deployable(cfg.model, moved[0]), digits.train_x[:64]))
    q = [t for t in stored.values() if t.dtype == torch.int8 and t.shape == (30, 192)][0]
    s = [t for k, t in stored.items() if "scale" in k and t.numel() == 30][0]
    assert torch.equal(q.float() * s[:, None], fake_quantize(torch.as_tensor(moved[0]["h3_w"])[None])[0])
