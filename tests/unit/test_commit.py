"""Commit protocol: atomic writes, the tracker, is_committed, leftovers, retention, replacement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resumable import commit, latest
from resumable.errors import CheckpointError, CorruptCheckpointError
from resumable.retention import Policy
from resumable.save import save


def _fake_committed(directory: Path, n: int, marker: str = "") -> Path:
    folder = directory / commit.iteration_dirname(n)
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text('{"marker": "%s"}' % marker)
    return folder


def test_atomic_write_replaces_content_and_leaves_no_temp_file(tmp_path: Path):
    target = tmp_path / "f.txt"
    commit.atomic_write(target, b"one")
    commit.atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_atomic_write_into_a_missing_folder_fails_and_leaves_nothing(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        commit.atomic_write(tmp_path / "missing" / "f.txt", b"x")
    assert list(tmp_path.iterdir()) == []


def test_tracker_accepts_no_trailing_newline_and_rejects_garbage(tmp_path: Path):
    assert commit.read_tracker(tmp_path) is None
    (tmp_path / commit.TRACKER).write_text("200")
    assert commit.read_tracker(tmp_path) == 200
    commit.write_tracker(tmp_path, 300)
    assert (tmp_path / commit.TRACKER).read_text() == "300\n" and commit.read_tracker(tmp_path) == 300
    (tmp_path / commit.TRACKER).write_text("iteration_3\n")
    with pytest.raises(CorruptCheckpointError) as e:
        commit.read_tracker(tmp_path)
    assert str(e.value) == (f"{tmp_path / commit.TRACKER}: expected one iteration number, found 'iteration_3'; "
                            "write the iteration to load (e.g. 100) or delete the file to use the newest "
                            "committed folder")


def test_is_committed_needs_the_final_name_and_a_readable_metadata_json(tmp_path: Path):
    good = _fake_committed(tmp_path, 1)
    assert commit.is_committed(good)
    temp = tmp_path / commit.temp_dirname(2)
    temp.mkdir()
    (temp / "metadata.json").write_text("{}")
    assert not commit.is_committed(temp)
    half = tmp_path / commit.iteration_dirname(3)
    half.mkdir()
    (half / "metadata.json").write_text('{"trunc')
    assert not commit.is_committed(half)
    ms_single = tmp_path / commit.iteration_dirname(4)  # MindFormers single rank: no metadata.json
    ms_single.mkdir()
    (ms_single / "common.json").write_text('{"global_step": 4}')
    assert not commit.is_committed(ms_single)
    (ms_single / "model-0000000-0000001.safetensors").write_bytes(b"")
    assert commit.is_committed(ms_single)
    ours_damaged = tmp_path / commit.iteration_dirname(5)  # ours always has metadata.json: this lost it
    ours_damaged.mkdir()
    (ours_damaged / "common.json").write_text('{"global_step": 5, "state": {}, "rank_local": [null]}')
    (ours_damaged / "CKP-model-0000000-0000001.safetensors").write_bytes(b"")
    assert not commit.is_committed(ours_damaged)
    assert commit.committed_iterations(tmp_path) == [1, 4]


@pytest.mark.parametrize("keep", [1, 3])
def test_retention_keeps_the_newest_and_never_the_tracker_target_nor_what_is_newer(tmp_path: Path, keep: int):
    for n in range(1, 7):
        _fake_committed(tmp_path, n * 10)
    (tmp_path / commit.temp_dirname(70)).mkdir()  # a save in progress is not counted or touched
    commit.write_tracker(tmp_path, 30)             # a user chose an older iteration: 40-60 stay too
    deleted = commit.apply_retention(tmp_path, Policy(keep), protect={20})
    expected_kept = sorted({20, 30, 40, 50, 60} | set([10, 20, 30, 40, 50, 60][-keep:]))
    assert commit.committed_iterations(tmp_path) == expected_kept
    assert deleted == [n for n in [10, 20, 30, 40, 50, 60] if n not in expected_kept]
    assert (tmp_path / commit.temp_dirname(70)).is_dir()
    assert not any(p.name.startswith(".del-") for p in tmp_path.iterdir())


def test_publishing_over_an_existing_iteration_swaps_it_in_one_step(tmp_path: Path):
    _fake_committed(tmp_path, 5, "old")
    temp = tmp_path / commit.temp_dirname(5)
    temp.mkdir()
    (temp / "metadata.json").write_text('{"marker": "new"}')
    inode_before = temp.stat().st_ino
    previous = commit.publish_folder(temp, tmp_path / commit.iteration_dirname(5))
    final = tmp_path / commit.iteration_dirname(5)
    assert (final / "metadata.json").read_text() == '{"marker": "new"}'
    assert final.stat().st_ino == inode_before  # the new folder itself, renamed: nothing was copied
    # The old copy is kept aside until the tracker names the new one.
    assert previous == tmp_path / (".old-" + commit.iteration_dirname(5))
    assert (previous / "metadata.json").read_text() == '{"marker": "old"}'
    commit.discard_previous(previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == [commit.iteration_dirname(5)]


def test_unpublishing_puts_the_old_copy_back_and_the_new_one_out_of_view(tmp_path: Path):
    _fake_committed(tmp_path, 5, "old")
    temp, final = tmp_path / commit.temp_dirname(5), tmp_path / commit.iteration_dirname(5)
    temp.mkdir()
    (temp / "metadata.json").write_text('{"marker": "new"}')
    previous = commit.publish_folder(temp, final)
    commit.unpublish_folder(final, temp, previous)  # the tracker could not be written
    assert (final / "metadata.json").read_text() == '{"marker": "old"}'
    assert (temp / "metadata.json").read_text() == '{"marker": "new"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [temp.name, final.name]


def test_exchange_is_atomic_both_folders_exist_at_every_instant(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if not commit._renameat2_exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) unsupported on this file system")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_clean_leftovers_removes_temps_and_restores_an_interrupted_replacement(tmp_path: Path):
    _fake_committed(tmp_path, 1)
    (tmp_path / commit.temp_dirname(2)).mkdir()
    (tmp_path / (".del-" + commit.iteration_dirname(0))).mkdir()
    old = tmp_path / (".old-" + commit.iteration_dirname(3))  # crash between the two renames
    old.mkdir()
    (old / "metadata.json").write_text("{}")
    stale = tmp_path / f".{commit.TRACKER}.tmp-123-abcdef01"
    stale.write_text("9")
    removed = commit.clean_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == sorted([".del-iteration_00000000", ".tmp-iteration_00000002",
                                                       stale.name])
    assert commit.committed_iterations(tmp_path) == [1, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iteration_00000001", "iteration_00000003"]


def test_latest_follows_the_tracker_and_names_a_bad_target(tmp_path: Path):
    assert latest(tmp_path) is None
    save({"model": {"w": torch.ones(2)}}, tmp_path, 4)
    save({"model": {"w": torch.ones(2)}}, tmp_path, 8)
    assert latest(tmp_path) == tmp_path / "iteration_00000008"
    (tmp_path / commit.TRACKER).write_text("4")
    assert latest(tmp_path) == tmp_path / "iteration_00000004"
    (tmp_path / commit.TRACKER).write_text("6")
    with pytest.raises(CorruptCheckpointError) as e:
        latest(tmp_path)
    assert str(e.value) == (f"{tmp_path / commit.TRACKER} names iteration 6 but {tmp_path / 'iteration_00000006'} "
                            "is not a committed checkpoint; committed iterations: [4, 8]; edit the tracker to "
                            "one of them")


def test_saving_an_existing_iteration_again_replaces_it_completely(tmp_path: Path):
    save({"model": {"old_only": torch.ones(2)}}, tmp_path, 3)
    folder = save({"model": {"new_only": torch.zeros(2)}}, tmp_path, 3)
    from resumable.formats import v2

    assert sorted(v2.read_metadata(folder).tensors) == ["new_only"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iteration_00000003", commit.TRACKER]


def test_a_symlinked_iteration_folder_is_never_committed_counted_or_deleted_through(tmp_path: Path):
    outside = _fake_committed(tmp_path / "elsewhere", 7)
    directory = tmp_path / "checkpoint"
    _fake_committed(directory, 1)
    _fake_committed(directory, 2)
    (directory / commit.iteration_dirname(7)).symlink_to(outside)
    assert not commit.is_committed(directory / commit.iteration_dirname(7))
    assert commit.committed_iterations(directory) == [1, 2]
    commit.write_tracker(directory, 2)
    assert commit.apply_retention(directory, Policy(1)) == [1]
    assert (outside / "metadata.json").is_file() and (directory / commit.iteration_dirname(7)).is_symlink()


def test_clean_leftovers_unlinks_symlinks_and_files_with_leftover_names_never_following_them(tmp_path: Path):
    outside = _fake_committed(tmp_path / "elsewhere", 3)
    directory = tmp_path / "checkpoint"
    _fake_committed(directory, 1)
    for prefix in (".del-", ".tmp-", ".old-"):
        (directory / (prefix + commit.iteration_dirname(3))).symlink_to(outside)
    (directory / (".tmp-" + commit.iteration_dirname(4))).write_bytes(b"stray")
    (directory / f".{commit.TRACKER}.tmp-1-abcdef01").symlink_to(outside / "metadata.json")
    removed = commit.clean_leftovers(directory)
    assert len(removed) == 5
    assert sorted(p.name for p in directory.iterdir()) == [commit.iteration_dirname(1)]
    assert (outside / "metadata.json").read_text() == '{"marker": ""}'  # the targets are untouched


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_publishing_over_a_stray_file_or_symlink_named_like_the_folder_is_refused_naming_it(tmp_path: Path,
                                                                                              kind: str):
    final = tmp_path / commit.iteration_dirname(4)
    if kind == "file":
        final.write_bytes(b"not a checkpoint")
    else:
        final.symlink_to(_fake_committed(tmp_path / "elsewhere", 4))
    temp = tmp_path / commit.temp_dirname(4)
    temp.mkdir()
    with pytest.raises(CheckpointError) as info:
        commit.publish_folder(temp, final)
    assert str(info.value) == (f"{final} is a {kind}, not a checkpoint folder, and is in the way of this save: "
                               f"move it out of {tmp_path} (a checkpoint folder holds only the iteration_* "
                               "folders its saves write)")
    assert temp.is_dir() and (final.is_symlink() if kind == "symlink" else final.is_file())


def test_iterations_after_counts_every_entry_named_like_an_iteration(tmp_path: Path):
    _fake_committed(tmp_path, 2)
    _fake_committed(tmp_path, 4)
    (tmp_path / commit.iteration_dirname(6)).mkdir()            # damaged: no metadata.json
    (tmp_path / commit.iteration_dirname(8)).write_bytes(b"")   # a stray file
    (tmp_path / commit.temp_dirname(10)).mkdir()                # a temp folder is not an iteration
    assert commit.iterations_after(tmp_path, 2) == [4, 6, 8]
    assert commit.iterations_after(tmp_path / "missing", 0) == []


def test_an_untracked_newest_folder_written_after_the_tracker_is_an_interrupted_commit(tmp_path: Path):
    _fake_committed(tmp_path, 2)
    commit.write_tracker(tmp_path, 2)
    _fake_committed(tmp_path, 4)  # renamed into place, then the job died before the tracker
    assert commit.interrupted_commit(tmp_path) == 4
    commit.write_tracker(tmp_path, 2)  # a tracker written afterwards: someone chose 2 on purpose
    assert commit.interrupted_commit(tmp_path) is None


def test_discarding_newer_iterations_moves_the_tracker_back_first_then_deletes_them(tmp_path: Path):
    for n in (2, 4, 6):
        _fake_committed(tmp_path, n)
    (tmp_path / commit.iteration_dirname(8)).write_bytes(b"")
    commit.write_tracker(tmp_path, 6)
    assert commit.discard_after(tmp_path, 2) == [4, 6, 8]
    assert commit.read_tracker(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [commit.iteration_dirname(2), commit.TRACKER]
    assert commit.discard_after(tmp_path, 0) == [2] and commit.read_tracker(tmp_path) is None


def test_a_save_over_a_stray_file_named_like_its_folder_names_the_file_and_leaves_no_temp(tmp_path: Path):
    from resumable.errors import SaveError

    save({"model": {"w": torch.ones(2)}}, tmp_path, 2)
    stray = tmp_path / commit.iteration_dirname(4)
    stray.write_bytes(b"notes")
    with pytest.raises(SaveError) as info:
        save({"model": {"w": torch.ones(2)}}, tmp_path, 4)
    assert str(info.value) == (
        f"committing {stray} failed on 1 rank(s), nothing was committed: rank 0: CheckpointError: {stray} is a "
        f"file, not a checkpoint folder, and is in the way of this save: move it out of {tmp_path} (a checkpoint "
        "folder holds only the iteration_* folders its saves write)")
    assert sorted(p.name for p in tmp_path.iterdir()) == [commit.iteration_dirname(2), stray.name, commit.TRACKER]
    assert stray.read_bytes() == b"notes" and commit.read_tracker(tmp_path) == 2
