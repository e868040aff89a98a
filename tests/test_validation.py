"""data.val: a validation split carved from the end of the training set, reported beside
train and test, and refused when it would leave nothing to train on."""
import numpy as np
import pytest

from backproplab.cli import main
from backproplab.config import apply_overrides, preset
from backproplab.data import load_dataset
from backproplab.engine.train import train
from backproplab.errors import UserError
from backproplab.store import list_runs


def test_the_last_examples_become_the_validation_split():
    full = load_dataset("mnist10k", 300, 50)
    d = full.with_validation(100)
    assert len(d.train_x) == 200 and len(d.val_x) == 100 and d.splits() == ("train", "val", "test")
    assert np.array_equal(d.val_labels.numpy(), full.train_labels[200:].numpy())  # the end of the canonical order
    assert np.array_equal(d.train_x.numpy(), full.train_x[:200].numpy())
    assert np.array_equal(d.test_x.numpy(), full.test_x.numpy())               # the test set is untouched
    for bad in (0, 300, 301):
        with pytest.raises(UserError, match="must leave training examples"):
            full.with_validation(bad)


@pytest.mark.parametrize("preset_name", ["smoke", "modern_smoke"])
def test_runs_report_validation_and_train_on_the_rest(preset_name):
    cfg = apply_overrides(preset(preset_name), ["data.n_train=120", "data.n_test=40", "data.val=40",
                                                "train.passes=1"])
    r = train(cfg)
    assert r.n_train == 80
    h = r.history[-1]
    assert len(h["val"]) == 1 and h["val"][0]["misses"] == round(h["val"][0]["error"] * 40 / 100)
    s = r.summary()
    assert {"val_loss", "val_error", "test_error"} <= set(s)
    without = apply_overrides(preset(preset_name), ["data.n_train=80", "data.n_test=40", "train.passes=1"])
    # the same 80 training examples, so the same weights: the split only moves examples out of training
    assert train(without).final[0]["weights_sha256"] == r.final[0]["weights_sha256"]


def test_no_split_keeps_the_config_digest():
    a, b = preset("lecun1989"), apply_overrides(preset("lecun1989"), ["data.val=0"])
    assert a.digest() == b.digest() and "val" not in a.to_dict()["data"]
    assert apply_overrides(preset("lecun1989"), ["data.val=1000"]).digest() != a.digest()


def test_cli_too_large_a_split_is_one_line_exit_2(tmp_path, capsys):
    code = main(["repro", "--preset", "smoke", "data.n_train=50", "data.val=50", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: data.val=50") and "50" in err[0]
    assert not (tmp_path / "runs.db").exists() or list_runs(tmp_path) == []  # nothing trained, nothing stored


def test_eval_train_false_evaluates_the_training_split_after_the_last_pass_only():
    over = ["data.n_train=120", "data.n_test=40", "data.val=40", "train.passes=3"]
    every = train(apply_overrides(preset("modern_smoke"), over))
    r = train(apply_overrides(preset("modern_smoke"), over + ["train.eval_train=false"]))
    assert [sorted(k for k in h if k in ("train", "val", "test")) for h in r.history] == \
        [["test", "val"], ["test", "val"], ["test", "train", "val"]]
    # evaluation only reads: the same weights and the same numbers where both evaluated
    assert r.final == every.final
    assert [h["test"] for h in r.history] == [h["test"] for h in every.history]
    # the default keeps the digest configs had before the switch existed
    assert "eval_train" not in apply_overrides(preset("modern_smoke"), []).to_dict()["train"]
    assert r.summary()["config_digest"] != every.summary()["config_digest"]


def test_effects_evaluates_the_test_split_at_its_cadence():
    from backproplab.experiments.effects import base_config
    cfg = base_config("modern", 2, smoke=False)
    assert (cfg.train.eval_every, cfg.train.eval_train) == (4, False)  # 80 passes: 20 points
    assert base_config("modern", 2, smoke=False, passes=10).train.eval_every == 1
    assert base_config("modern", 2, smoke=False, eval_every=2).train.eval_every == 2


def test_a_run_that_diverges_mid_run_keeps_every_split_in_its_last_record(monkeypatch):
    """With eval_train=false and eval_test=false a pass before the last evaluates only the
    validation split; when that pass's loss is NaN the run stops there, and its last record (its
    final numbers) must still hold the training and test splits (it raised KeyError 'train')."""
    from backproplab.engine.population import Population
    real = Population.evaluate

    def nan_after_pass_1(self, x, labels, loss):
        out = real(self, x, labels, loss)
        if len(x) == 40 and self._passes_seen >= 2:  # the validation split, from the second pass on
            out = [{**o, "loss": float("nan")} for o in out]
        return out
    real_end = Population.end_pass

    def count(self):
        self._passes_seen = getattr(self, "_passes_seen", 0) + 1
        return real_end(self)
    monkeypatch.setattr(Population, "evaluate", nan_after_pass_1)
    monkeypatch.setattr(Population, "end_pass", count)
    over = ["data.n_train=160", "data.n_test=30", "data.val=40", "train.passes=4", "train.eval_train=false",
            "train.eval_test=false"]
    r = train(apply_overrides(preset("modern_smoke"), over))
    assert r.status == "diverged" and len(r.history) == 2
    assert [sorted(k for k in h if k in ("train", "val", "test")) for h in r.history] == \
        [["val"], ["test", "train", "val"]]
    assert all({"train_error", "val_error", "test_error"} <= set(f) for f in r.final)


def test_resuming_a_diverged_run_whose_last_record_lacks_splits_fills_them(tmp_path, monkeypatch):
    """A checkpoint written before the fix above (its diverged last record without the training and
    test splits) is reported again on --resume with every split, evaluated from the stored weights."""
    from backproplab.engine.checkpoint import load_checkpoint, save_checkpoint
    from backproplab.engine.train import checkpoint_path
    over = ["data.n_train=160", "data.n_test=30", "data.val=40", "train.passes=2", "train.eval_train=false",
            "train.eval_test=false"]
    cfg = apply_overrides(preset("modern_smoke"), over)
    done = train(cfg, out=tmp_path)
    ck = checkpoint_path(cfg, tmp_path)
    state = load_checkpoint(ck)
    for sp in ("train", "test"):
        del state["history"][-1][sp]
    state["status"], state["message"] = "diverged", "diverged in pass 2: NaN/Inf loss (seeds [0])"
    save_checkpoint(ck, state)
    again = train(cfg, out=tmp_path, resume=True)
    assert again.status == "diverged" and again.final == done.final  # the same weights, every split back


def test_apply_overrides_leaves_its_input_as_it_was():
    """A preset object reused across calls gets no methods or values from an earlier call, and a
    refused override leaves it untouched too."""
    base = preset("modern_smoke")
    before = base.to_json()
    cfg = apply_overrides(base, ["+method=ema", "optim.lr=0.01"])
    assert cfg is not base and base.to_json() == before
    assert "ema" in [getattr(m, "name", None) or m["name"] for m in cfg.methods] and cfg.optim.lr == 0.01
    with pytest.raises(UserError):
        apply_overrides(base, ["+method=label_smoothing", "optim.nope=1"])
    assert base.to_json() == before
    again = apply_overrides(base, ["train.passes=3"])
    assert [getattr(m, "name", None) or m["name"] for m in again.methods] == \
        [getattr(m, "name", None) or m["name"] for m in base.methods]
