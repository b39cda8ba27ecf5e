"""``resumable train`` starts as many processes as the layout needs when --nproc is not given."""

from __future__ import annotations

from resumable.train.config import load_config
from tests.e2e.jobs import SMALL, log_records, run_job, train_cmd


def test_train_without_nproc_launches_the_layouts_world_size_and_records_its_config(tmp_path):
    out = tmp_path / "job"
    sets = ["parallel_config.model_parallel=2", "runner_config.stop_step=2"]
    done = run_job(train_cmd(out, *sets))
    assert "resumable train: launching torchrun with 2 processes" in done.stderr
    assert [r["global_step"] for r in log_records(out)] == [1, 2]
    [record] = (out / "log").glob("config-*.yaml")  # the effective config, once (rank 0)
    assert f"  config: {record}\n" in done.stdout
    assert load_config(record) == load_config(None, [*SMALL, f"output_dir={out}", *sets])


def test_a_bad_layout_stops_before_launching_with_the_key_named(tmp_path):
    done = run_job(train_cmd(tmp_path, "parallel_config.model_parallel=0"), expect_ok=False)
    assert done.returncode == 2
    assert done.stderr == ("resumable train: error: invalid config:\n"
                           "  --set parallel_config.model_parallel=0: must be greater than 0, got 0\n")
