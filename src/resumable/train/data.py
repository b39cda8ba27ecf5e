"""Training data: token windows and an order that depends only on (seed, epoch, sample index).

Sources (``train_dataset.path``):

* empty: the embedded corpus, English-like sentences from a small seeded grammar, as UTF-8
  bytes (vocabulary 256). It is generated, never downloaded, and a tiny model learns it
  quickly (its loss falls clearly within 100 steps).
* ``*.bin``: raw token ids of ``train_dataset.dtype`` (uint16 or uint32), memory-mapped.
* ``*.npy``: a uint16 or uint32 array, memory-mapped.
* anything else: a UTF-8 text file, one token per byte.

Sample ``i`` is the window ``tokens[i*S : i*S + S + 1]`` (S = ``seq_length``): inputs are its
first S tokens, targets the last S. Epoch ``e`` visits samples in the order
``permutation(seed, e)``; a global step takes the next ``global_batch_size`` samples of it
and data-parallel rank ``d`` takes the ``d``-th contiguous share. The samples a step sees are
therefore the same for every layout with the same global batch size, and the position is
two plain numbers: the epoch and the samples already taken from it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from resumable import storage
from resumable.errors import ConfigError
from resumable.train.config import DatasetConfig

# Size of the embedded corpus in bytes: about 50 steps per epoch at the default global batch
# of 8 samples of 64 tokens.
CORPUS_BYTES = 26_000
_CORPUS_SEED = 20240601  # the corpus is fixed; the run's seed only changes the order

_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the small bird", "a farmer",
             "the teacher", "our neighbour", "the children", "a sailor"]
_VERBS = ["sees", "likes", "finds", "carries", "paints", "follows", "feeds", "watches", "buys", "hides"]
_OBJECTS = ["a red ball", "the green box", "an apple", "the blue door", "a wooden chair", "the river",
            "some bread", "a yellow kite", "the letter", "two stones"]
_PLACES = ["in the garden", "at the market", "near the house", "by the lake", "under the tree",
           "on the hill", "in the kitchen"]
_TIMES = ["every morning", "at night", "today", "on sunday", "again"]


def embedded_corpus(num_bytes: int = CORPUS_BYTES) -> bytes:
    """The built-in corpus: the same ``num_bytes`` bytes on every machine and every call."""
    rng = random.Random(_CORPUS_SEED)
    parts: list[str] = []
    size = 0
    while size < num_bytes:
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}"
        if rng.random() < 0.5:
            sentence += f" {rng.choice(_TIMES)}"
        sentence = sentence[0].upper() + sentence[1:] + (".\n" if rng.random() < 0.2 else ". ")
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts).encode("ascii")[:num_bytes]


@dataclass(frozen=True)
class TokenDataset:
    """Token ids (1-D) cut into windows of ``seq_length + 1``."""

    tokens: np.ndarray
    seq_length: int
    source: str  # "embedded" or the file path; identifies the data in a checkpoint

    @property
    def num_samples(self) -> int:
        return (len(self.tokens) - 1) // self.seq_length

    def windows(self, indices: np.ndarray) -> torch.Tensor:
        """(len(indices), seq_length + 1) int64 token windows."""
        s = self.seq_length
        return torch.from_numpy(np.stack([np.asarray(self.tokens[i * s: i * s + s + 1], dtype=np.int64)
                                          for i in indices]))


def _read_tokens(path: Path, dtype: str) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".bin":
        itemsize = np.dtype(dtype).itemsize
        if path.stat().st_size % itemsize:
            raise ConfigError(
                f"train_dataset.path: {path} has {path.stat().st_size} bytes, not a whole number of "
                f"{dtype} tokens; set train_dataset.dtype to the type the file was written with"
            )
        return np.memmap(path, dtype=dtype, mode="r")
    if suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if tokens.dtype not in (np.uint16, np.uint32):
            raise ConfigError(f"train_dataset.path: {path} holds {tokens.dtype} tokens; expected uint16 or uint32")
        return tokens.reshape(-1)
    raw = storage.read_bounded(path, "train_dataset.path", 1 << 34)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"train_dataset.path: {path} is neither .bin nor .npy, so it is read as UTF-8 text, "
            f"but byte {err.start} is not valid UTF-8"
        ) from None
    return np.frombuffer(raw, dtype=np.uint8)


def load_dataset(cfg: DatasetConfig, vocab_size: int) -> TokenDataset:
    """Read ``train_dataset`` and check it fits the model; raises ConfigError naming the key."""
    if not cfg.path:
        tokens, source = np.frombuffer(embedded_corpus(), dtype=np.uint8), "embedded"
    else:
        path = Path(cfg.path)
        if not path.is_file():
            raise ConfigError(f"train_dataset.path: data file {path} does not exist (or is not a file)")
        tokens, source = _read_tokens(path, cfg.dtype), str(path.resolve())
    if len(tokens) < cfg.seq_length + 1:
        raise ConfigError(
            f"train_dataset.path: {source} has {len(tokens)} tokens, fewer than one sample of "
            f"train_dataset.seq_length + 1 = {cfg.seq_length + 1}"
        )
    max_id = int(tokens.max())
    if max_id >= vocab_size:
        raise ConfigError(
            f"model.vocab_size ({vocab_size}) is too small for train_dataset.path {source}: it holds "
            f"token id {max_id}; set model.vocab_size to at least {max_id + 1}"
        )
    return TokenDataset(tokens, cfg.seq_length, source)


def epoch_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The sample order of one epoch: a pure function of (seed, epoch, num_samples)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class Batches:
    """The local micro batches of each step for one data-parallel rank.

    ``global_batch_size`` = batch_size x data_parallel x micro_batch_num samples per step;
    this rank's share is ``batch_size x micro_batch_num`` contiguous samples of it.
    """

    def __init__(self, dataset: TokenDataset, seed: int, batch_size: int, micro_batch_num: int,
                 dp: int, dp_rank: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.local_batch = batch_size * micro_batch_num
        self.global_batch_size = self.local_batch * dp
        self.dp_rank = dp_rank
        if dataset.num_samples < self.global_batch_size:
            raise ConfigError(
                f"train_dataset.path: {dataset.source} gives {dataset.num_samples} samples of "
                f"{dataset.seq_length + 1} tokens, fewer than one global batch of {self.global_batch_size} "
                f"(runner_config.batch_size {batch_size} x parallel_config.data_parallel {dp} x "
                f"parallel_config.micro_batch_num {micro_batch_num}); use more data or a smaller batch"
            )
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset.num_samples // self.global_batch_size

    def epoch_done(self, sample_in_epoch: int) -> bool:
        """True when fewer than one global batch is left after ``sample_in_epoch`` samples."""
        return sample_in_epoch + self.global_batch_size > self.dataset.num_samples

    def get(self, epoch: int, sample_in_epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of shape (batch_size x micro_batch_num, seq_length) for this rank."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.seed, epoch, self.dataset.num_samples))
        start = sample_in_epoch + self.dp_rank * self.local_batch
        w = self.dataset.windows(self._order[1][start: start + self.local_batch])
        return w[:, :-1], w[:, 1:]


def _count(counters: Mapping[str, Any], key: str) -> int | None:
    """``counters[key]`` when it is a positive int (0, None or missing: not recorded)."""
    value = counters.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def counted_position(counters: Mapping[str, Any], batches: Batches) -> tuple[int, int, int, str]:
    """Where the data stands after a checkpoint's counters, for one that records no data position.

    A MindFormers checkpoint (converted by ``train.foreign``) records counters only:
    ``consumed_samples`` (newer versions), ``global_step``, ``step_num`` (MindFormers' step
    count since the start, not within the epoch) and ``global_batch_size``. The samples
    consumed are taken from, in order: ``consumed_samples``; ``global_step x
    global_batch_size``; ``step_num`` (else ``global_step``) x this job's global batch size
    when no batch size is recorded. The position is where this trainer stands after
    taking that many samples of *this* data in batches of the saved size (each epoch
    visits ``samples // batch x batch`` of them): epoch ``consumed // per_epoch``, sample
    ``consumed % per_epoch`` in it; the next epoch when less than one of this job's
    batches is left.

    A changed global batch size: MindFormers scales its step count by ``saved_gbs /
    new_gbs`` and skips that many new batches (rounded down to a whole batch); here the
    exact samples consumed are skipped, and ``global_step`` (hence the LR) continues
    unscaled, as on a resume of our own checkpoints.

    Returns:
        ``(consumed_samples, epoch, sample_in_epoch, what)``, ``what`` naming the keys used.

    Example::

        consumed, epoch, sample, what = counted_position({"global_step": 100, "global_batch_size": 8}, batches)
    """
    job_gbs, num_samples = batches.global_batch_size, batches.dataset.num_samples
    saved_gbs = _count(counters, "global_batch_size")
    global_step = _count(counters, "global_step") or 0
    consumed = _count(counters, "consumed_samples")
    if consumed is not None:
        what = f"consumed_samples {consumed}"
        if saved_gbs is not None and consumed == global_step * saved_gbs:  # a conversion may have derived it
            what += f" = global_step {global_step} x global_batch_size {saved_gbs}"
    elif saved_gbs is not None:
        consumed = global_step * saved_gbs
        what = f"global_step {global_step} x global_batch_size {saved_gbs}"
    else:
        key = "step_num" if _count(counters, "step_num") is not None else "global_step"
        steps = _count(counters, key) or 0
        consumed = steps * job_gbs
        what = f"{key} {steps} x this job's global batch size {job_gbs} (no global_batch_size recorded)"
    batch = saved_gbs if saved_gbs is not None and saved_gbs <= num_samples else job_gbs
    per_epoch = num_samples // batch * batch
    epoch, sample = divmod(consumed, per_epoch)
    if batches.epoch_done(sample):
        epoch, sample = epoch + 1, 0
    return consumed, epoch, sample, what


#: What :func:`unset_position` clears: the data position and the counters it may be derived from.
POSITION_KEYS = ("data", "consumed_samples", "global_batch_size", "step_num")


def unset_position(state: dict[str, Any]) -> None:
    """Clear the template's position before a load, so that only what the checkpoint records comes back.

    The loader keeps a template's plain value where the checkpoint has none; a position left
    in the template would pass a checkpoint without one off as epoch 0, sample 0.
    """
    for key in POSITION_KEYS:
        state[key] = None


def fill_position(state: dict[str, Any], batches: Batches) -> str | None:
    """Give a loaded state that records no data position one derived from its counters (:func:`counted_position`).

    Returns:
        The line to log (what was used and from which keys), or None when the checkpoint
        recorded its data position (our own checkpoints).

    Example::

        unset_position(state); load(state, path); line = fill_position(state, trainer.batches)
    """
    if state.get("data") is not None:
        return None
    consumed, epoch, sample, what = counted_position(state, batches)
    state["consumed_samples"] = consumed
    state["data"] = {"source": batches.dataset.source, "num_samples": batches.dataset.num_samples,
                     "seed": batches.seed, "epoch": epoch, "sample_in_epoch": sample}
    return (f"the checkpoint records no data position: continuing after {consumed} samples ({what}), at epoch "
            f"{epoch}, sample {sample} of {batches.dataset.num_samples} of this data")
