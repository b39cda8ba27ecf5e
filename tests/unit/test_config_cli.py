"""``resumable train`` config mistakes, in process: one message naming where the value was set
(the ``--set`` assignment, else the YAML file's line), the key, the value and what it accepts,
exit status 2, nothing launched; ``--print-config``; a run's config record; an OSError in words."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from resumable.cli import main
from resumable.proctree import PARENT_ENV
from resumable.train.__main__ import main as train_main
from resumable.train.config import load_config, record_config

ONE_PROCESS = ["parallel_config.data_parallel=1", "parallel_config.model_parallel=1"]
CALLBACK_KEYS = ("type (required), prefix, directory, save_checkpoint_steps, keep_checkpoint_max, "
                 "keep_checkpoint_every_n_steps and 13 more")


def _train(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["train", *args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("assignment,said", [
    ("runner_config.stop_stp=3", "unknown key; did you mean runner_config.stop_step?"),
    ("runer_config.stop_step=3", "runer_config: unknown key; did you mean runner_config?"),
    ("stop_step=3", "unknown key; did you mean runner_config.stop_step?"),  # a key of another section
    ("resume_training=0100", "expected true or false, or a string, got 0100, which YAML reads as the number 64; "
                             "quote it to pass it as text: --set 'resume_training=\"0100\"'"),
    ("callbacks.0.prefix=no", "expected a string, got no, which YAML reads as the boolean false; quote it to pass "
                              "it as text: --set 'callbacks.0.prefix=\"no\"'"),
    ("runner_config=3", "expected a section (a mapping of the keys epochs, batch_size, stop_step and log_interval), "
                        "got 3; set one of its keys instead: --set runner_config.KEY=VALUE"),
    ("model=[1, 2]", "expected a section (a mapping of the keys vocab_size, hidden_size, intermediate_size, "
                     "num_hidden_layers, num_attention_heads, num_key_value_heads and 9 more), got a list [1, 2]; "
                     "set one of its keys instead: --set model.KEY=VALUE"),
    ("callbacks={type: CheckpointMonitor}", f"expected a list of mappings, each with the keys {CALLBACK_KEYS}, got "
                                            "a mapping {\"type\": \"CheckpointMonitor\"}; make it a list of one: "
                                            "--set 'callbacks=[{type: CheckpointMonitor}]'"),
    ("callbacks=[{prefix: X}]", "callbacks.0.type: required, not given: it takes 'CheckpointMonitor'"),
    ("callbacks=[{type: CheckpointMonitor}, {type: CheckpointMonitor}]", "give at most one CheckpointMonitor, got 2"),
    ("optimizer.betas=[0.9]", "expected a list of 2 values, each a number, got a list [0.9]"),
    ("train_dataset.dtype=int8", "expected 'uint16' or 'uint32', got 'int8'"),
], ids=["typo", "unknown-section", "wrong-section", "octal-number", "boolean", "section-given-a-value",
        "list-for-a-section", "callbacks-mapping", "callback-without-type", "two-callbacks", "short-tuple", "choice"])
def test_a_set_mistake_names_the_assignment_and_what_the_key_takes(capsys, assignment, said):
    assert _train(capsys, "--set", assignment) == (2, "", f"resumable train: error: invalid config:\n"
                                                          f"  --set {assignment}: {said}\n")


def test_a_mistake_in_the_yaml_file_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("runner_config:\n  stop_stp: 3\nresume_training: 0100\nload_checkpoint:\n"
                      "callbacks:\n  - type: CheckpointMonitor\n    prefix: no\n")
    assert _train(capsys, "--config", str(config), "--set", "seed=x") == (2, "", (
        "resumable train: error: invalid config:\n"
        f"  {config} line 4: load_checkpoint: expected a string, got an empty value, which YAML reads as null; "
        "quote it to pass it as text: load_checkpoint: \"\"\n"
        f"  {config} line 3: resume_training: expected true or false, or a string, got 0100, which YAML reads as "
        "the number 64; quote it to pass it as text: resume_training: \"0100\"\n"
        "  --set seed=x: expected an integer, got 'x'\n"
        f"  {config} line 2: runner_config.stop_stp: unknown key; did you mean runner_config.stop_step?\n"
        f"  {config} line 7: callbacks.0.prefix: expected a string, got no, which YAML reads as the boolean false; "
        "quote it to pass it as text: prefix: \"no\"\n"))


@pytest.mark.parametrize("assignment,said", [
    ("seed=[1", "--set seed=[1: the value is not valid YAML (expected ',' or ']', but got '<stream end>'); to pass "
                "it as text, quote it: --set 'seed=\"[1\"'"),
    ("callbacks.0.prefix=X", "--set callbacks.0.prefix: callbacks is not set, so it has no item 0; give the whole "
                             "list, e.g. --set 'callbacks=[{...}]'"),
], ids=["not-yaml", "item-of-an-unset-list"])
def test_a_set_that_cannot_apply_is_refused(tmp_path, capsys, assignment, said):
    config = tmp_path / "c.yaml"
    config.write_text("seed: 1\n")  # no callbacks
    assert _train(capsys, "--config", str(config), "--set", assignment) == (2, "", f"resumable train: error: {said}\n")


@pytest.mark.parametrize("text,said", [
    ("model: [unclosed\nseed: 1\n", "config file {path} is not valid YAML: line 2, column 5: expected ',' or ']', "
                                     "but got ':'"),
    ("- seed: 1\n", "invalid config {path}: the top level must be a mapping of keys (e.g. seed: 0), got a list"),
], ids=["not-yaml", "a-list"])
def test_a_config_file_that_is_not_a_mapping_of_keys_is_refused(tmp_path, capsys, text, said):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert _train(capsys, "--config", str(config)) == (2, "", f"resumable train: error: {said.format(path=config)}\n")


def test_print_config_prints_the_merged_config_which_loads_back_and_launches_nothing(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nrunner_config:\n  epochs: 2\n")
    sets = ["runner_config.stop_step=7", "callbacks=[{type: CheckpointMonitor, prefix: \"no\"}]"]
    status, printed, err = _train(capsys, "--print-config", "--config", str(config),
                                  *(x for kv in sets for x in ("--set", kv)))
    assert (status, err) == (0, "")
    (tmp_path / "printed.yaml").write_text(printed)
    expected = load_config(config, sets)
    assert (expected.runner_config.epochs, expected.runner_config.stop_step, expected.checkpoint.prefix) == (2, 7, "no")
    assert load_config(tmp_path / "printed.yaml") == expected
    assert not (tmp_path / "out").exists()


def test_each_run_records_its_config_and_none_replaces_another(tmp_path):
    cfg = load_config(None, ["runner_config.stop_step=3"])
    first = record_config(cfg, tmp_path, 0)
    record = first.read_bytes()
    second = record_config(cfg, tmp_path, 3)  # a resumed run, maybe in the same second
    assert first != second and first.read_bytes() == record
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])
    assert second.read_text().splitlines()[0].endswith(" UTC at global step 3")
    assert load_config(first) == load_config(second) == cfg


@contextmanager
def _unprivileged() -> Iterator[None]:
    """As root, run as nobody (root may write anywhere); otherwise as is."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(pwd.getpwnam("nobody").pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_output_dir_that_cannot_be_created_is_said_in_words(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(PARENT_ENV, "")  # train_main sets it (to this pid) for its children: unset afterwards
    monkeypatch.delenv(PARENT_ENV)
    def train_into(out: Path) -> tuple[int, str, str]:
        return _train(capsys, "--nproc", "1", *(x for kv in [*ONE_PROCESS, f"output_dir={out}"] for x in ("--set", kv)))

    # First as the user running the tests: this also imports what the job imports before it
    # creates its folders (a user without access to Python's own files could not).
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "out"
    assert train_into(out) == (2, "", f"resumable train: error: {tmp_path / 'file'}: not a folder (it, or a folder "
                                      "above it, is a file): move that file away or use another path\n")
    # Under /tmp (world-searchable), so that only the folder's own mode denies.
    folder = Path(tempfile.mkdtemp(prefix="resumable-readonly-"))
    try:
        folder.chmod(0o555)
        denied = (f"{folder / 'out'}: permission denied: give the user running this access to it (its or its "
                  "folder's permissions or owner), or use another path")
        with _unprivileged():
            result = train_into(folder / "out")
            with pytest.raises(SystemExit) as rank:  # what one rank of a torchrun job says
                train_main([*(x for kv in [*ONE_PROCESS, f"output_dir={folder / 'out'}"] for x in ("--set", kv))])
        assert result == (2, "", f"resumable train: error: {denied}\n")
        assert (rank.value.code, capsys.readouterr().err) == (2, f"error: {denied}\n")
    finally:
        shutil.rmtree(folder)
