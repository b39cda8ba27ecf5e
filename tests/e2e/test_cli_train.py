"""``resumable train`` starts as many processes as the layout needs when --nproc is not given."""

from __future__ import annotations

from resumable.train.config import load_config
from tests.e2e.jobs import SMALL, log_records, run_job, train_cmd

# The CLI as `python -m resumable.cli`, saying at the end whether it imported torch.
CLI_TELLING_TORCH = ("import sys; from resumable.cli import main; status = main(sys.argv[1:]); "
                     "print('torch imported:', 'torch' in sys.modules, file=sys.stderr); sys.exit(status)")


def test_train_without_nproc_launches_the_layouts_world_size_and_records_its_config(tmp_path):
    out = tmp_path / "job"
    sets = ["parallel_config.model_parallel=2", "runner_config.stop_step=2"]
    cmd = train_cmd(out, *sets)
    assert cmd[1:3] == ["-m", "resumable.cli"]
    done = run_job([cmd[0], "-c", CLI_TELLING_TORCH, *cmd[3:]])
    assert "resumable train: launching torchrun with 2 processes" in done.stderr
    # Launching torchrun costs the CLI no import of torch (about 2 s here): the workers import it.
    assert done.stderr.endswith("torch imported: False\n")
    assert [r["global_step"] for r in log_records(out)] == [1, 2]
    [record] = (out / "log").glob("config-*.yaml")  # the effective config, once (rank 0)
    assert f"  config: {record}\n" in done.stdout
    assert load_config(record) == load_config(None, [*SMALL, f"output_dir={out}", *sets])


def test_a_bad_layout_stops_before_launching_with_the_key_named(tmp_path):
    done = run_job(train_cmd(tmp_path, "parallel_config.model_parallel=0"), expect_ok=False)
    assert done.returncode == 2
    assert done.stderr == ("resumable train: error: invalid config:\n"
                           "  --set parallel_config.model_parallel=0: must be greater than 0, got 0\n")
