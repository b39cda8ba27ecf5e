import pytest

from resumable.errors import ConfigError
from resumable.shared_paths import check_shared_paths, is_multi_node


def test_single_node_jobs_need_no_shared_path(tmp_path):
    assert not is_multi_node({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"})
    check_shared_paths(tmp_path / "ckpt", {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"})


def test_multi_node_checkpoint_under_a_listed_path_is_accepted(tmp_path):
    env = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "SHARED_PATHS": f"/elsewhere:{tmp_path}"}
    check_shared_paths(tmp_path / "run" / "checkpoint", env)
    check_shared_paths(tmp_path, env)


def test_multi_node_checkpoint_outside_every_listed_path_names_both(tmp_path):
    env = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "SHARED_PATHS": str(tmp_path / "shared")}
    with pytest.raises(ConfigError, match=(
            rf"checkpoint folder {tmp_path / 'sharedx'} is not under a shared path; "
            rf"SHARED_PATHS lists {tmp_path / 'shared'}\.")):
        check_shared_paths(tmp_path / "sharedx", env)  # a name prefix is not a parent folder
