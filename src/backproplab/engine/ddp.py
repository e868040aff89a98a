"""Data-parallel training under torchrun: the population engine with DistributedDataParallel.

`torchrun --nproc_per_node=2 -m backproplab train modern` starts two processes with RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/MASTER_PORT set; engine/train.train() sees them
(from_env) and trains on a DDPPopulation instead of a Population:

- Every rank builds the same pass (same data, shifts and dropout masks: they are keyed by
  (seed, pass) and by position in the pass) and runs the same hooks on the whole batch;
  only the gradient is split. Each global batch of B examples is cut into WORLD_SIZE
  contiguous shards (data/sampler.shard_bounds); rank k computes the batch-mean gradient
  of its shard on whichever path the run has (kernel, fused, autograd).
- The averaging is DistributedDataParallel's: the (R, P) weight buffer is the one
  nn.Parameter of a small module (GradientModule) whose forward takes the rank's gradient
  g_k and returns sum(W * g_k); its backward leaves g_k in W.grad, where DDP's reducer
  all-reduces and averages it across ranks (gloo on the CPU, NCCL on CUDA). Each rank's
  gradient is weighted by its shard's share of the batch (b_k * WORLD_SIZE / B), so the
  average is the mean over the whole batch even when the last batch of a pass does not
  split evenly. Loss terms that do not depend on the batch (penalties) enter each rank's
  gradient with weight b_k / B and sum to one copy.
- After the average every rank holds the same gradient and runs the same optimizer step,
  so the weights stay equal on every rank (DDP broadcasts rank 0's at construction).
  A step therefore equals the single-process step on the combined batch up to float
  rounding of the average (tests/test_ddp.py).
- Rank 0 alone writes checkpoints and the results store; the other ranks are quiet. A
  checkpoint holds the whole population, nothing about ranks, so a run resumes on any
  number of ranks (or in one process). Checkpoints are at pass boundaries: a rank killed
  mid-pass is restarted by `torchrun --max-restarts N` together with the others, they
  resume from the last pass, and the pass is trained again from the same state, so every
  example still counts exactly once per epoch.

Refused under torchrun (one line, exit 2 on every rank): a batch that WORLD_SIZE does not
divide, the per-example engines (fast, eager: a batch of one), BatchNorm (its statistics
would be per shard) and the model-noise methods (drop, dropconnect, spatial, drop_path:
their noise is drawn from one generator per replica in batch order, which sharding would
change).
"""
import os
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..data.sampler import shard_bounds
from ..errors import UserError
from .population import Population

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Set by `python -m backproplab` under torchrun: ranks other than 0 end after training (rank 0
# records the run). A script that calls train() itself under torchrun keeps all its ranks.
EXIT_AFTER_TRAIN = False
STORE_TIMEOUT = 300  # seconds a rank waits for the others at the rendezvous


def under_torchrun(environ=None) -> bool:
    env = os.environ if environ is None else environ
    return all(k in env for k in ENV) and int(env.get("WORLD_SIZE", "1")) >= 1


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def writer(self) -> bool:
        """Rank 0 writes checkpoints, the store and the log."""
        return self.rank == 0

    def finish(self) -> None:
        """After the last pass: every rank waits for the others (rank 0's checkpoint is written);
        under `python -m backproplab` the other ranks then end here."""
        dist.barrier()
        if EXIT_AFTER_TRAIN and self.rank != 0:
            exit_rank(0)


def from_env(cfg, environ=None) -> Dist | None:
    """The torchrun setting of this process, checked against cfg, with the process group
    initialized; None when not under torchrun. Bad settings raise UserError on every rank
    before any collective, so every rank exits 2."""
    env = os.environ if environ is None else environ
    if not under_torchrun(env):
        return None
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    check_config(cfg, world)
    cuda = cfg.train.device == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, store=_store(env, rank, world), rank=rank, world_size=world)
    return Dist(rank, world, local, backend)


def _store(env, rank: int, world: int):
    """The rendezvous store, its keys prefixed by torchrun's restart count. torchrun keeps one store
    across `--max-restarts` restarts; without a prefix a restarted rank can read the address a
    killed rank of the previous attempt left there and fail to connect (measured: the static
    rendezvous of --master-addr failed every time, c10d's some of the time)."""
    agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"   # torchrun's agent hosts the store
    base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=rank == 0 and not agent,
                         timeout=timedelta(seconds=STORE_TIMEOUT))
    return dist.PrefixStore(f"backproplab/attempt{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def check_config(cfg, world: int) -> None:
    t = cfg.train
    if t.engine != "population":
        raise UserError(f"data-parallel training (torchrun, {world} ranks) runs on the population engine; "
                        f"this run has train.engine={t.engine} (one example a step)")
    if t.batch % world:
        raise UserError(f"train.batch={t.batch} does not split over {world} ranks: "
                        f"choose a rank count that divides the batch")


NOISE = {"drop": "dropout", "dropconnect": "dropconnect", "spatial": "spatial_dropout",
         "drop_path_p": "stochastic_depth"}  # ModNet attribute -> the method that sets it


def model_reason(model) -> str | None:
    """Why this built model cannot train data-parallel, or None."""
    bad = [meth for attr, meth in NOISE.items() if getattr(model, attr, 0.0)]
    if getattr(model, "has_batchnorm", lambda: False)():
        bad.insert(0, "batchnorm")
    if bad:
        return (f"{', '.join(bad)} cannot run data-parallel: batch statistics or model noise drawn in "
                f"batch order would differ from one process on the whole batch")
    return None


class GradientModule(nn.Module):
    """The population's (R, P) weights as one parameter (sharing W's storage); forward(g) =
    sum(W * g), whose gradient with respect to W is g: DDP's reducer averages it across ranks."""

    def __init__(self, W: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(W, requires_grad=True)  # same storage as W: DDP's broadcast lands in W

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return (self.w * g).sum()


class DDPPopulation(Population):
    """A Population whose gradients are computed on this rank's shard of each batch and averaged
    by DistributedDataParallel."""

    def __init__(self, cfg, seeds, dctx: Dist, **kw):
        super().__init__(cfg, seeds, **kw)
        why = model_reason(self.models[0])
        if why:
            raise UserError(why)
        self.dctx = dctx
        self.module = GradientModule(self.W)
        dev = [dctx.local_rank] if self.device.type == "cuda" else None
        self.ddp = nn.parallel.DistributedDataParallel(self.module, device_ids=dev)  # no buffers to sync

    def _closure(self, second=False):
        c = self.ctx
        n = c.labels.shape[-1]
        a, b = shard_bounds(n, self.dctx.rank, self.dctx.world)
        if b > a:
            saved = c.x, c.labels, c.keep, c.shifts
            c.x, c.keep = c.x[:, a:b], None if c.keep is None else c.keep[:, a:b]
            c.labels = c.labels[..., a:b]
            c.shifts = None if c.shifts is None else c.shifts[:, a:b]
            try:
                g = super()._closure(second) * ((b - a) * self.dctx.world / n)
            finally:
                c.x, c.labels, c.keep, c.shifts = saved
        else:  # a batch smaller than the rank count: this rank contributes nothing but takes part
            g = torch.zeros_like(self.W)
        self.module.w.grad = None
        self.ddp(g.detach()).backward()
        out = self.module.w.grad.detach().clone()
        self.module.w.grad = None
        return out


def exit_rank(code: int) -> None:
    """End a torchrun rank: flush, leave the process group, os._exit. A normal interpreter exit
    after gloo sometimes aborts (SIGABRT, 'terminate called without an active exception'),
    which makes torchrun report a failure; this way it does not."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            os._exit(int(code))


def run_module(main) -> None:
    """`python -m backproplab` under torchrun: run the CLI, then end the rank as exit_rank does.
    Ranks other than 0 print nothing on stdout (rank 0 prints the run once); errors go to
    stderr on every rank."""
    global EXIT_AFTER_TRAIN
    EXIT_AFTER_TRAIN = True
    if int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = open(os.devnull, "w")
    code = 1
    try:
        code = main()
    except SystemExit as e:  # argparse --help
        code = e.code if isinstance(e.code, int) else 0
    except BaseException:  # noqa: BLE001 - BACKPROPLAB_DEBUG=1 lets main() raise: show it before exiting
        traceback.print_exc()
    exit_rank(code if isinstance(code, int) else 1)
