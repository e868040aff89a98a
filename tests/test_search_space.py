"""Search spaces: the command-line forms and the file forms give the same space; each form gives
the Optuna distribution it says; trial configs are the preset plus the values."""
import json

import pytest

from backproplab.config import preset
from backproplab.errors import UserError
from backproplab.search.space import load_space_file, parse_space

ITEMS = ["optim.lr=log:1e-4:1e-1", "optim.weight_decay=0:0.1", "train.batch=int:16:64",
         "model.act=choice:relu,tanh", "train.passes=3", "+method=label_smoothing:eps=0:0.3",
         "methods=choice:ema,sam,none"]


def test_search_space_forms_and_distributions():
    optuna = pytest.importorskip("optuna")
    from optuna.distributions import CategoricalDistribution as C, FloatDistribution as F, IntDistribution as I
    base = preset("modern")
    space = parse_space(ITEMS, base)
    dists = {d.name: d.distribution() for d in space.dims}
    assert dists == {"optim.lr": F(1e-4, 1e-1, log=True), "optim.weight_decay": F(0.0, 0.1),
                     "train.batch": I(16, 64), "model.act": C(["relu", "tanh"]),
                     "+label_smoothing.eps": F(0.0, 0.3), "methods": C(["ema", "sam", "none"])}
    assert space.fixed == ["train.passes=3"]
    cfg = space.config(base, {"optim.lr": 0.01, "optim.weight_decay": 0.05, "train.batch": 20, "model.act": "tanh",
                              "+label_smoothing.eps": 0.2, "methods": "sam"})
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.batch, cfg.model.act, cfg.train.passes) == \
        (0.01, 0.05, 20, "tanh", 3)
    assert {m.name: m.options for m in cfg.methods}["label_smoothing"]["eps"] == 0.2
    assert "sam" in {m.name for m in cfg.methods}
    none = space.config(base, {"optim.lr": 0.01, "optim.weight_decay": 0.0, "train.batch": 16, "model.act": "relu",
                               "+label_smoothing.eps": 0.0, "methods": "none"})
    assert {m.name for m in none.methods} == {"label_smoothing"}
    # an int key given as LOW:HIGH samples integers; a log range on an int key samples log-integers
    s2 = parse_space(["train.batch=16:64", "train.passes=log:2:20"], base)
    assert [d.distribution() for d in s2.dims] == [I(16, 64), I(2, 20, log=True)]
    assert optuna is not None


@pytest.mark.parametrize("suffix", [".json", ".toml", ".yaml"])
def test_search_space_file_equals_command_line(tmp_path, suffix):
    pytest.importorskip("optuna")
    mapping = {"optim.lr": "log:1e-4:1e-1", "optim.weight_decay": "0:0.1", "train.batch": "int:16:64",
               "model.act": ["relu", "tanh"], "train.passes": 3, "+method": ["label_smoothing:eps=0:0.3"],
               "methods": ["ema", "sam", "none"]}
    f = tmp_path / f"space{suffix}"
    if suffix == ".json":
        f.write_text(json.dumps(mapping))
    elif suffix == ".toml":
        f.write_text("\n".join(f'"{k}" = {json.dumps(v)}' for k, v in mapping.items()))
    else:
        import yaml
        f.write_text(yaml.safe_dump(mapping))
    base = preset("modern")
    assert parse_space(load_space_file(f), base).canonical() == parse_space(ITEMS, base).canonical()


def test_search_space_grid_values():
    pytest.importorskip("optuna")
    space = parse_space(["optim.lr=log:1e-3:1e-1", "train.batch=int:16:18", "model.act=choice:relu,tanh"],
                        preset("modern"))
    lr, batch, act = space.dims
    assert lr.grid(3) == pytest.approx([1e-3, 1e-2, 1e-1])
    assert batch.grid(5) == [16, 17, 18] and act.grid(3) == ["relu", "tanh"]


def test_search_space_file_errors(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="cannot parse"):
        load_space_file(bad)
    with pytest.raises(UserError, match="expected a .json"):
        load_space_file(tmp_path / "s.ini")
    (tmp_path / "e.json").write_text("{}")
    with pytest.raises(UserError, match="non-empty mapping"):
        load_space_file(tmp_path / "e.json")
