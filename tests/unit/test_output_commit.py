"""commit.make_dirs, new_output_dir and publish_output_dir on real folders.

Their fsyncs are observed in the system calls by tests/e2e/test_durability.py.
"""

from __future__ import annotations

import errno
import os

import pytest

from resumable import commit


def test_make_dirs_creates_every_missing_parent_and_leaves_existing_folders(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    assert commit.make_dirs(target) == target and target.is_dir()
    (target / "kept").write_text("x")
    assert commit.make_dirs(target) == target and (target / "kept").read_text() == "x"


def test_make_dirs_names_a_file_in_the_way(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(NotADirectoryError) as err:
        commit.make_dirs(tmp_path / "out" / "checkpoint")
    assert err.value.filename == str(tmp_path / "out")
    assert "exists and is not a folder" in str(err.value)


def test_each_output_gets_its_own_hidden_temp_folder_beside_it(tmp_path):
    final = tmp_path / "new" / "merged"
    a, b = commit.new_output_dir(final), commit.new_output_dir(final)
    assert a != b and a.parent == b.parent == final.parent
    assert a.name.startswith(f".merged.tmp-{os.getpid()}-") and a.is_dir() and not any(a.iterdir())


@pytest.mark.parametrize("existing", [False, True])
def test_publish_output_dir_renames_onto_a_missing_or_empty_folder(tmp_path, existing):
    final = tmp_path / "merged"
    if existing:
        final.mkdir()
    temp = commit.new_output_dir(final)
    (temp / "sub").mkdir()
    (temp / "model.safetensors").write_bytes(b"data")
    (temp / "sub" / "x.json").write_text("{}")
    commit.publish_output_dir(temp, final)
    assert not temp.exists()
    assert (final / "model.safetensors").read_bytes() == b"data" and (final / "sub" / "x.json").read_text() == "{}"


def test_publish_output_dir_never_replaces_a_folder_that_holds_something(tmp_path):
    final = tmp_path / "merged"
    final.mkdir()
    (final / "mine.txt").write_text("keep")
    temp = commit.new_output_dir(final)
    (temp / "model.safetensors").write_bytes(b"data")
    with pytest.raises(OSError) as err:
        commit.publish_output_dir(temp, final)
    assert err.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    assert (final / "mine.txt").read_text() == "keep" and (temp / "model.safetensors").is_file()


def test_make_dirs_called_at_once_by_many_processes_creates_the_folder_for_all(tmp_path):
    # Ranks create strategy/ and rank_N/ parents at the same time: one that finds the folder
    # appearing between its checks must take it, not call it "not a folder".
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    targets = [tmp_path / f"run{i}" / "a" / "b" / "c" for i in range(40)]
    with ctx.Pool(8) as pool:
        results = pool.map(_make_all, [targets] * 8)
    assert results == [None] * 8
    assert all(t.is_dir() for t in targets)


def _make_all(targets):
    for t in targets:
        try:
            commit.make_dirs(t)
        except OSError as exc:
            return repr(exc)
    return None
