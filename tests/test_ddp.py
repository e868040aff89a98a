"""Data-parallel training under torchrun (engine/ddp.py): 2 ranks against one process.

Each torchrun launch costs a few seconds of start-up, so one launch of the worker below
(WORKER, mode "main") checks several things and writes them to a JSON file; the tests read
it. Launches use --nnodes=1 --master-addr=127.0.0.1 and a free port (a hostname that does
not resolve makes --standalone hang), OMP_NUM_THREADS=1.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from backproplab.commands.methods import train_config
from backproplab.data.sampler import EpochSampler, shard_bounds
from backproplab.engine.checkpoint import load_checkpoint
from backproplab.engine.train import checkpoint_path, train
from backproplab.store import list_runs

from conftest import ROOT

SMALL = ["data.n_train=200", "data.n_test=60"]
RUN3 = SMALL + ["train.passes=3"]           # modern_smoke: shifts 1, dropout 0.25, AdamW, batch 32
PASS1 = SMALL + ["train.passes=1", "train.seeds=2"]

WORKER = r'''
import json, os, signal, sys
import numpy as np, torch
from backproplab.commands.methods import train_config
from backproplab.engine import ddp
from backproplab.engine.population import Population
from backproplab.engine.train import train

mode, out = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
res = {}

def flat(result):
    return [np.concatenate([v.reshape(-1) for v in p.values()]).tolist() for p in result.params]

if mode == "main":
    # one step on a batch the caller chose, every gradient path; 31 examples split 16 / 15
    cases = {"kernel": ([], "auto", 32), "uneven": ([], "auto", 31), "fused": ([], "fused", 32),
             "autograd": (["+method=l2", "+method=label_smoothing"], "autograd", 32)}
    for name, (items, path, b) in cases.items():
        cfg = train_config("modern_smoke", ["train.shift=0", "model.dropout=0", "train.seeds=2"] + items)
        dctx = ddp.from_env(cfg)
        g = torch.Generator().manual_seed(5)
        x, y = torch.randn(b, 1, 16, 16, generator=g), torch.randint(0, 10, (b,), generator=g)
        pop = ddp.DDPPopulation(cfg, [0, 1], dctx, path=path)
        pop.train_batch(x, y, total_steps=10)
        if rank == 0:
            ref = Population(cfg, [0, 1], path=path)
            w0 = ref.W.clone()
            ref.train_batch(x, y, total_steps=10)
            res[name] = {"diff": float((pop.W - ref.W).abs().max()), "moved": float((ref.W - w0).abs().max()),
                         "path": pop.path}
    # a whole pass (shifts and dropout masks sliced per shard)
    res["pass"] = flat(train(train_config("modern_smoke", json.loads(sys.argv[3]))))
    # resume a checkpoint written by one process
    lines = []
    r = train(train_config("modern_smoke", json.loads(sys.argv[4])), out=sys.argv[5], resume=True, log=lines.append)
    res["resumed"] = {"params": flat(r), "history0": r.history[0], "log": lines}
elif mode == "kill":
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    def killer(rec):
        if rank == 1 and restart == 0 and rec["pass"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)   # rank 1 dies in the middle of the run
    lines = []
    r = train(train_config("modern_smoke", json.loads(sys.argv[3])), out=sys.argv[4], resume=True,
              log=lines.append, on_pass=killer)
    res = {"sha": [f["weights_sha256"] for f in r.final], "restart": restart, "log": lines}
if rank == 0:
    with open(out, "w") as f:
        json.dump(res, f)
ddp.exit_rank(0)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, tmp_path, ranks=2, restarts=0, timeout=400):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={ranks}",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", f"--max-restarts={restarts}", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _worker(tmp_path, *args, restarts=0):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"{args[0]}.json"
    p = torchrun([str(script), args[0], str(out), *map(str, args[1:])], tmp_path, restarts=restarts)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


def _flat(result):
    return [np.concatenate([v.reshape(-1) for v in p.values()]) for p in result.params]


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    # a checkpoint of one process after pass 1 of 3, for the 2 ranks to resume
    cfg = train_config("modern_smoke", RUN3)

    def stop(rec):
        if rec["pass"] == 2:
            raise Stop
    with pytest.raises(Stop):
        train(cfg, out=tmp / "one", on_pass=stop)
    solo = load_checkpoint(checkpoint_path(cfg, tmp / "one"))
    assert solo["passes_done"] == 1
    res = _worker(tmp, "main", json.dumps(PASS1), json.dumps(RUN3), tmp / "one")
    return res, solo, tmp


@pytest.mark.parametrize("case", ["kernel", "uneven", "fused", "autograd"])
def test_ddp_one_step_equals_one_process_on_the_whole_batch(main_run, case):
    res = main_run[0][case]
    assert res["moved"] > 1e-4                     # the step did something
    assert res["diff"] < 1e-6, res
    assert res["path"] == ("autograd" if case == "autograd" else "fused" if case == "fused" else "kernel")


def test_ddp_whole_pass_agrees_with_one_process(main_run):
    single = _flat(train(train_config("modern_smoke", PASS1)))
    two = [np.asarray(p) for p in main_run[0]["pass"]]
    for a, b in zip(single, two):
        assert np.abs(a - b).max() < 1e-5 and np.abs(a - b).max() < 1e-3 * np.abs(a).max()


def test_ddp_resumes_a_one_process_checkpoint_on_two_ranks(main_run):
    res, solo, _ = main_run
    r = res["resumed"]
    assert any("resumed from" in line for line in r["log"])
    assert r["history0"]["seconds"] == solo["history"][0]["seconds"]   # pass 1 came from the checkpoint
    single = _flat(train(train_config("modern_smoke", RUN3)))
    for a, b in zip(single, r["params"]):
        assert np.abs(a - np.asarray(b)).max() < 1e-4


def test_ddp_killed_rank_restarted_ends_with_the_uninterrupted_weights(tmp_path):
    # uninterrupted: the command line on 2 ranks; rank 0 records the run once
    p = torchrun(["-m", "backproplab", "train", "modern_smoke", *RUN3, "--out", str(tmp_path / "a"), "--json",
                  "--quiet"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    full = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(list_runs(tmp_path / "a")) == 1
    res = _worker(tmp_path, "kill", json.dumps(RUN3), tmp_path / "b", restarts=1)
    assert res["restart"] == 1 and any("resumed from" in line for line in res["log"])
    assert res["sha"] == [full["weights_sha256"]]


def test_ddp_batch_the_ranks_cannot_split_is_one_line_exit_2(tmp_path):
    p = torchrun(["-m", "backproplab", "train", "modern_smoke", *SMALL, "train.batch=33", "--out",
                  str(tmp_path / "o")], tmp_path)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors and all(e == errors[0] for e in errors)
    assert "train.batch=33 does not split over 2 ranks" in errors[0]
    assert "exitcode  : 2" in p.stderr        # the rank's own exit code, as torchrun reports it
    assert not list((tmp_path / "o").glob("checkpoints/*.pt")) if (tmp_path / "o").exists() else True


@pytest.mark.parametrize("k,world", [(32, 2), (31, 2), (7, 3), (2, 4)])
def test_ddp_shards_tile_the_batch(k, world):
    bounds = [shard_bounds(k, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == k
    assert all(b0[1] == b1[0] for b0, b1 in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_ddp_sampler_shards_see_each_example_once_per_epoch_across_a_restart_on_other_ranks():
    n = 50
    seen = []
    samplers = [EpochSampler(n, seed=3) for _ in range(2)]
    for _ in range(3):                                  # 3 batches of 12 on 2 ranks
        for r, s in enumerate(samplers):
            seen.append(s.take_shard(12, r, 2))
    state = samplers[0].state_dict()
    assert state == samplers[1].state_dict()            # the state has no rank in it
    resumed = [EpochSampler(n, seed=3) for _ in range(3)]
    for s in resumed:
        s.load_state_dict(state)
    for _ in range(2):                                  # the rest of the epoch (and 10 more) on 3 ranks
        for r, s in enumerate(resumed):
            seen.append(s.take_shard(12, r, 3))
    idx = np.concatenate(seen)
    assert len(idx) == 60
    assert sorted(idx[:n]) == list(range(n))            # epoch 0: every example exactly once
    assert np.array_equal(idx[n:], EpochSampler(n, seed=3).permutation(1)[:10])
