"""backproplab transfer: frozen layers stay the pre-trained ones, the copied net and its fresh
head, task-aware errors by hand, the command at smoke size, bad input."""
import json

import pytest
import torch

from backproplab.cli import main
from backproplab.errors import UserError
from backproplab.experiments import transfer as tr


def test_parse_arms_and_fractions():
    assert tr.parse_arms("none,h1,h1+h2") == [("none", ()), ("h1", ("h1",)), ("h1+h2", ("h1", "h2"))]
    with pytest.raises(UserError, match="h4"):
        tr.parse_arms("h1,h4")
    with pytest.raises(UserError, match="output layer"):
        tr.parse_arms("h1+out")
    assert tr.parse_fractions("0.01,0.1,1") == [0.01, 0.1, 1.0]
    for bad in ("0", "1.5", "a", ""):
        with pytest.raises(UserError, match="fractions"):
            tr.parse_fractions(bad)


def test_frozen_layers_stay_and_the_head_is_new(digits):
    x, lab = digits.train_x[:96], digits.train_labels[:96]
    pre = tr.fit(x, lab, 1, [0, 1])
    init = pre.W.detach().clone()
    eng = tr.fit(x, lab, 2, [0, 1], init=init, frozen=["h1_w", "h1_b", "h2_w", "h2_b"])
    pv = pre.views
    for n in ("h1_w", "h1_b", "h2_w", "h2_b"):
        assert torch.equal(eng.views[n], pv[n])                       # frozen: the pre-trained numbers exactly
    assert not torch.allclose(eng.views["h3_w"], pv["h3_w"])          # trained from the pre-trained start
    # the copy: every layer from the pre-trained net, the head from the new population's own init
    new = tr.FrozenPopulation(tr.recipe(1, 2), [0, 1])
    own_head = new.views["out_w"].clone()
    tr.start_from(new, init)
    assert torch.equal(new.views["h3_w"], pv["h3_w"]) and torch.equal(new.views["out_w"], own_head)
    assert not torch.equal(own_head, pv["out_w"])
    tr.start_from(new, init, new_head=False)                          # continual learning keeps A's head
    assert torch.equal(new.views["out_w"], pv["out_w"])


def test_task_aware_errors_by_hand():
    class Stub:
        def outputs(self, x):  # (R=1, B=3, 10)
            o = torch.zeros(1, 3, 10)
            o[0, 0, 7], o[0, 0, 2] = 5.0, 1.0    # argmax 7 overall, 2 among 0-4
            o[0, 1, 1] = 3.0                     # 1 either way
            o[0, 2, 9], o[0, 2, 4] = 2.0, 1.0    # 9 overall, 4 among 0-4
            return o
    labels = torch.tensor([2, 1, 3])
    assert tr.errors(Stub(), None, labels).tolist() == pytest.approx([100 * 2 / 3])
    assert tr.errors(Stub(), None, labels, list(range(5))).tolist() == pytest.approx([100 / 3])


def test_command_smoke_and_bad_input(tmp_path, capsys):
    assert main(["transfer", "--smoke", "--from", "digits04", "--fractions", "0.5", "--out", str(tmp_path),
                 "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["arm"] for r in s["rows"]] == ["scratch", "none", "h1", "h1+h2"]
    assert all(0 <= r["test_error"] <= 100 for r in s["rows"]) and s["plots"]
    for argv, words in ((["--freeze", "h1+h9"], "'h9'"), (["--from", "cifar"], "cifar"),
                        (["--fractions", "2"], "fractions"), (["--seeds", "1"], "--seeds")):
        assert main(["transfer", *argv, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
