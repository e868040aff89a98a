"""Options and key=value overrides in any order, for every command; `--resume` with nothing to
resume says so; `fetch` into a folder it cannot write is one line, exit 2."""
import json

import pytest

from backproplab.cli import build_parser, main

TINY = ["--preset", "smoke", "--engine", "eager", "data.n_train=120", "data.n_test=50"]


@pytest.mark.parametrize("argv, want", [
    (["repro", "data.n_train=64", "--seeds", "2", "optim.lr=0.01", "--quiet", "train.passes=1"],
     {"seeds": 2, "quiet": True, "overrides": ["data.n_train=64", "optim.lr=0.01", "train.passes=1"]}),
    (["train", "modern", "--seeds", "8", "optim.lr=0.01"],
     {"preset": "modern", "seeds": 8, "items": ["optim.lr=0.01"]}),
    (["train", "--quiet", "modern", "+method=sam", "--seeds", "3", "optim.lr=0.01", "--resume"],
     {"preset": "modern", "seeds": 3, "quiet": True, "resume": True, "items": ["+method=sam", "optim.lr=0.01"]}),
    (["speedrun", "+method=sam", "--seeds", "2", "data.val=1000", "--smoke"],
     {"seeds": 2, "smoke": True, "items": ["+method=sam", "data.val=1000"]}),
    (["scale", "run", "+method=ema", "--smoke", "--jobs", "1", "+method=sam", "--seeds", "0,1"],
     {"smoke": True, "jobs": 1, "seeds": "0,1", "methods": ["+method=ema", "+method=sam"]}),
    (["scale", "fit", "--n-boot", "10", "store/runs.db", "--seed", "3"],
     {"n_boot": 10, "seed": 3, "db": "store/runs.db"}),
])
def test_options_and_overrides_mix_in_any_order(argv, want):
    args = build_parser().parse_args(argv)
    assert {k: getattr(args, k) for k in want} == want


def test_unknown_options_and_extra_positionals_are_still_refused(capsys):
    assert main(["repro", "--bogus", "optim.lr=0.01"]) == 2
    assert main(["fetch", "mnist", "a", "b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)
    assert "unrecognized arguments: --bogus" in err[0] and "unrecognized arguments: b" in err[1]


def test_a_run_with_options_after_overrides_and_resume_of_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["repro", *TINY, "train.passes=1", "--seeds", "2", "optim.lr=0.05", "--json", "--resume", "--out", str(out)]
    assert main(argv) == 0
    cap = capsys.readouterr()
    s = json.loads(cap.out.strip().splitlines()[-1])
    assert (s["seeds"], s["passes"]) == (2, 1)
    err = [line for line in cap.err.splitlines() if line.strip()]
    assert err == [f"no checkpoint in {out}: starting fresh"]
    assert main(argv) == 0  # now there is one: resumed (and already final), not announced as fresh
    assert "starting fresh" not in capsys.readouterr().err


def test_fetch_into_a_folder_it_cannot_write_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["fetch", "mnist", str(blocker / "sub")]) == 2     # under a file: even root cannot
    assert main(["fetch", "mnist", str(blocker)]) == 2              # a file, not a folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") and "internal error" not in e for e in err)
    assert "cannot write into" in err[0] and "not a folder" in err[1]
    assert blocker.read_text() == "x"


def test_train_smoke_is_the_presets_test_size(tmp_path, capsys):
    from backproplab.commands.methods import train_config
    own = train_config("modern", [], smoke=True)             # a preset with its own smoke preset
    assert (own.name, own.data.n_train, own.train.passes) == ("modern_smoke", 500, 2)
    made = train_config("rung7", ["train.seeds=2"], smoke=True)   # one without: made at test size, overrides kept
    full = train_config("rung7", ["train.seeds=2"])
    assert (made.name, made.data.n_train, made.data.n_test, made.train.passes) == ("rung7_smoke", 500, 200, 2)
    assert made.methods == full.methods and made.train.seeds == 2 and made.digest() != full.digest()
    assert main(["train", "rung7", "--smoke", "train.seeds=1", "--quiet", "--json", "--out", str(tmp_path)]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["passes"] == 2 and 0.0 <= rec["test_error"] <= 100.0


def test_repro_smoke_is_the_smoke_preset(tmp_path, capsys):
    from backproplab.config import preset, smoke_preset
    assert smoke_preset("lecun1989").digest() == preset("smoke").digest()
    assert main(["repro", "--smoke", "--quiet", "--json", "--out", str(tmp_path)]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["config_digest"] == preset("smoke").digest() and rec["passes"] == 2
