import numpy as np
import pytest
import torch

from resumable.errors import ConfigError
from resumable.train.config import DatasetConfig
from resumable.train.data import (Batches, TokenDataset, counted_position, embedded_corpus, epoch_order, fill_position,
                                  load_dataset, unset_position)


def test_the_embedded_corpus_is_fixed_ascii_text():
    corpus = embedded_corpus()
    assert corpus == embedded_corpus()
    text = corpus.decode("ascii")
    assert len(corpus) == 26_000 and text[0].isupper() and text.count(". ") > 300


def test_an_embedded_epoch_is_about_fifty_default_steps():
    dataset = load_dataset(DatasetConfig(seq_length=64), 256)
    steps = Batches(dataset, 0, batch_size=4, micro_batch_num=1, dp=2, dp_rank=0).steps_per_epoch
    assert 40 <= steps <= 60


def test_epoch_order_is_a_seeded_permutation_that_changes_each_epoch():
    a = epoch_order(3, 0, 100)
    assert sorted(a) == list(range(100))
    assert np.array_equal(a, epoch_order(3, 0, 100))
    assert not np.array_equal(a, epoch_order(3, 1, 100))
    assert not np.array_equal(a, epoch_order(4, 0, 100))


def _global_batch(dataset, dp: int, batch_size: int, micro_batch_num: int, epoch: int, sample: int):
    """The global batch as the data-parallel ranks see it, concatenated in rank order."""
    parts = [Batches(dataset, 7, batch_size, micro_batch_num, dp, d).get(epoch, sample) for d in range(dp)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


@pytest.mark.parametrize("dp,batch_size,micro_batch_num", [(2, 4, 1), (4, 2, 1), (2, 2, 2), (8, 1, 1)])
def test_each_step_sees_the_same_samples_whatever_the_data_parallel_degree(dp, batch_size, micro_batch_num):
    dataset = load_dataset(DatasetConfig(seq_length=16), 256)
    for epoch, sample in ((0, 0), (0, 40), (1, 8)):
        ref_x, ref_y = _global_batch(dataset, 1, 8, 1, epoch, sample)
        x, y = _global_batch(dataset, dp, batch_size, micro_batch_num, epoch, sample)
        assert torch.equal(x, ref_x) and torch.equal(y, ref_y)


def test_targets_are_the_inputs_shifted_by_one_token():
    dataset = load_dataset(DatasetConfig(seq_length=16), 256)
    x, y = Batches(dataset, 0, 2, 1, 1, 0).get(0, 0)
    assert x.shape == y.shape == (2, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("suffix,dtype", [(".bin", "uint16"), (".bin", "uint32"), (".npy", "uint16"), (".npy", "uint32")])
def test_token_files_are_read_as_written(tmp_path, suffix, dtype):
    tokens = (np.arange(1000) * 7 % 300).astype(dtype)
    path = tmp_path / f"tokens{suffix}"
    np.save(path, tokens) if suffix == ".npy" else tokens.tofile(path)
    dataset = load_dataset(DatasetConfig(path=str(path), seq_length=10, dtype=dtype), 300)
    assert np.array_equal(np.asarray(dataset.tokens), tokens)
    assert dataset.num_samples == 99
    assert dataset.windows(np.array([3]))[0].tolist() == tokens[30:41].tolist()


def test_a_text_file_is_one_token_per_utf8_byte(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("héllo wörld " * 20, encoding="utf-8")
    dataset = load_dataset(DatasetConfig(path=str(path), seq_length=8), 256)
    assert bytes(np.asarray(dataset.tokens)) == path.read_bytes()


def test_a_missing_data_file_names_the_key_and_the_path(tmp_path):
    missing = tmp_path / "nope.bin"
    with pytest.raises(ConfigError, match=f"train_dataset.path: data file {missing} does not exist"):
        load_dataset(DatasetConfig(path=str(missing)), 256)


def test_a_token_id_beyond_the_vocabulary_is_rejected(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.array([1, 2, 511, 3] * 50, dtype=np.uint16))
    with pytest.raises(ConfigError, match=r"model.vocab_size \(256\) is too small .* token id 511; "
                                          r"set model.vocab_size to at least 512"):
        load_dataset(DatasetConfig(path=str(path), seq_length=8), 256)


def test_a_dataset_smaller_than_one_global_batch_is_rejected(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("x" * 100)
    dataset = load_dataset(DatasetConfig(path=str(path), seq_length=10), 256)  # 9 samples
    with pytest.raises(ConfigError, match=r"gives 9 samples of 11 tokens, fewer than one global batch of 16 "
                                          r"\(runner_config.batch_size 4 x parallel_config.data_parallel 2 x "
                                          r"parallel_config.micro_batch_num 2\)"):
        Batches(dataset, 0, batch_size=4, micro_batch_num=2, dp=2, dp_rank=0)


def test_an_npy_file_of_another_dtype_is_rejected(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.arange(100, dtype=np.int64))
    with pytest.raises(ConfigError, match="holds int64 tokens; expected uint16 or uint32"):
        load_dataset(DatasetConfig(path=str(path)), 256)


def test_a_bin_file_that_is_not_whole_tokens_is_rejected(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(b"\x01" * 101)
    with pytest.raises(ConfigError, match="not a whole number of uint16 tokens; set train_dataset.dtype"):
        load_dataset(DatasetConfig(path=str(path)), 256)


def test_a_text_file_that_is_not_utf8_is_rejected(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"abc\xff" * 50)
    with pytest.raises(ConfigError, match="byte 3 is not valid UTF-8"):
        load_dataset(DatasetConfig(path=str(path)), 256)


def _batches(num_samples: int, global_batch: int) -> Batches:
    """``num_samples`` windows of 4+1 tokens, ``global_batch`` samples per step on one rank."""
    return Batches(TokenDataset(np.zeros(num_samples * 4 + 1, dtype=np.uint16), 4, "t"), 0, global_batch, 1, 1, 0)


@pytest.mark.parametrize("counters,expected", [
    # 50 samples; the saved job took batches of 8: 48 per epoch. 100 x 8 = 800 = 16 epochs + 32.
    ({"global_step": 100, "global_batch_size": 8}, (800, 16, 32, "global_step 100 x global_batch_size 8")),
    ({"global_step": 100, "global_batch_size": 8, "consumed_samples": 805},
     (805, 16, 37, "consumed_samples 805")),
    ({"global_step": 100, "global_batch_size": 8, "consumed_samples": 800},
     (800, 16, 32, "consumed_samples 800 = global_step 100 x global_batch_size 8")),
    # No batch size recorded: step_num steps (MindFormers counts them from the start) of this job's 5.
    ({"global_step": 12, "step_num": 13, "epoch_num": 2}, (65, 1, 15, "step_num 13 x this job's global batch "
                                                            "size 5 (no global_batch_size recorded)")),
    ({"global_step": 12, "global_batch_size": 0, "consumed_samples": 0},
     (60, 1, 10, "global_step 12 x this job's global batch size 5 (no global_batch_size recorded)")),
    # 46 samples into an epoch of 48: fewer than this job's 5 are left, so the next epoch starts.
    ({"global_step": 0, "global_batch_size": 8, "consumed_samples": 94}, (94, 2, 0, "consumed_samples 94")),
])
def test_a_position_is_derived_from_the_counters_of_a_checkpoint_without_one(counters, expected):
    assert counted_position(counters, _batches(50, 5)) == expected


def test_fill_position_leaves_a_recorded_position_and_fills_a_missing_one():
    batches = _batches(50, 5)
    ours = {"data": {"epoch": 3, "sample_in_epoch": 10}, "consumed_samples": 7}
    assert fill_position(ours, batches) is None and ours["consumed_samples"] == 7
    state = {"global_step": 3, "consumed_samples": 1, "global_batch_size": 5, "step_num": 3, "data": {"epoch": 9}}
    unset_position(state)
    assert state == {"global_step": 3, "consumed_samples": None, "global_batch_size": None, "step_num": None,
                     "data": None}
    state.update(global_batch_size=8)  # what a converted checkpoint records
    assert fill_position(state, batches) == ("the checkpoint records no data position: continuing after 24 samples "
                                             "(global_step 3 x global_batch_size 8), at epoch 0, sample 24 of 50 of "
                                             "this data")
    assert state["consumed_samples"] == 24
    assert state["data"] == {"source": "t", "num_samples": 50, "seed": 0, "epoch": 0, "sample_in_epoch": 24}
