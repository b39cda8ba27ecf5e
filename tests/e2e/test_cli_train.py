"""``resumable train`` starts as many processes as the layout needs when --nproc is not given."""

from __future__ import annotations

from tests.e2e.jobs import log_records, run_job, train_cmd


def test_train_without_nproc_launches_the_layouts_world_size(tmp_path):
    out = tmp_path / "job"
    done = run_job(train_cmd(out, "parallel_config.model_parallel=2", "runner_config.stop_step=2"))
    assert "resumable train: launching torchrun with 2 processes" in done.stderr
    assert [r["global_step"] for r in log_records(out)] == [1, 2]


def test_a_bad_layout_stops_before_launching_with_the_key_named(tmp_path):
    done = run_job(train_cmd(tmp_path, "parallel_config.model_parallel=0"), expect_ok=False)
    assert done.returncode == 2
    assert done.stderr == ("resumable train: error: invalid config:\n"
                           "  --set parallel_config.model_parallel=0: must be greater than 0, got 0\n")
