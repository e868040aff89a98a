"""The resumable exactly-once-per-epoch sampler (seed 002: a loader that lost its place in
the epoch on restart saw some examples twice and others never, and bent the curves).

The order of epoch e is a permutation of range(n) that depends only on (seed, e):
np.random.default_rng([seed, e]).permutation(n). The whole state is (epoch, pos): the
next example handed out is perm(epoch)[pos]. Saving that pair with the model and
restoring it continues the stream exactly where it stopped, so across any number of
kills and restarts every example is seen exactly once in each epoch.

Fractional epochs: a run of `epochs` epochs takes examples_for(epochs, n) examples from
the stream; 0.25 epochs sees a random quarter of the set once, 2.5 epochs sees every
example twice and half of them a third time. Batches may straddle an epoch boundary
(the stream is continuous), which keeps every batch full.

Across ranks (data-parallel training, engine/ddp.py): every rank keeps the same stream and
state; of each batch of k indices rank r of W takes the contiguous shard
shard_bounds(k, r, W), so the ranks together see each batch, and so each epoch, exactly
once. The state has no rank in it: a run saved on W ranks continues on any other number.
"""
import numpy as np

from ..errors import UserError


def examples_for(epochs: float, n: int) -> int:
    """Examples a run of `epochs` epochs over n examples takes (at least one)."""
    if not (epochs > 0 and np.isfinite(epochs)):
        raise UserError(f"epochs must be a positive number, not {epochs!r}")
    return max(1, int(round(epochs * n)))


def shard_bounds(k: int, rank: int, world: int) -> tuple:
    """[a, b): rank `rank`'s contiguous share of k items split over `world` ranks; the shares
    tile range(k) in rank order and differ in size by at most one (the first k % world ranks
    take one more)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of {world}")
    q, extra = divmod(int(k), int(world))
    a = rank * q + min(rank, extra)
    return a, a + q + (rank < extra)


class EpochSampler:
    def __init__(self, n: int, seed: int = 0):
        if n < 1:
            raise UserError("the sampler needs at least one example")
        self.n, self.seed = int(n), int(seed)
        self.epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch `epoch`, (n,) int64; a function of (seed, epoch) only."""
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.n)
            self._perm_epoch = int(epoch)
        return self._perm

    def take(self, k: int) -> np.ndarray:
        """The next k indices of the stream, (k,) int64, crossing epoch boundaries as needed."""
        out = []
        while k > 0:
            m = min(k, self.n - self.pos)
            out.append(self.permutation(self.epoch)[self.pos:self.pos + m])
            self.pos += m
            k -= m
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def take_shard(self, k: int, rank: int, world: int) -> np.ndarray:
        """This rank's shard of the next k indices of the stream (every rank advances by k)."""
        a, b = shard_bounds(k, rank, world)
        return self.take(k)[a:b]

    @property
    def consumed(self) -> int:
        """Examples handed out so far."""
        return self.epoch * self.n + self.pos

    @property
    def epochs_done(self) -> float:
        return self.consumed / self.n

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        n, seed = int(state["n"]), int(state["seed"])
        if (n, seed) != (self.n, self.seed):
            raise UserError(f"sampler state is for n={n}, seed={seed}; this run has n={self.n}, seed={self.seed}")
        epoch, pos = int(state["epoch"]), int(state["pos"])
        if epoch < 0 or not 0 <= pos < n:
            raise UserError(f"sampler state out of range: epoch {epoch}, position {pos} of {n}")
        self.epoch, self.pos = epoch, pos
