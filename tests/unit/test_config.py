"""The YAML config: every class of bad input names its key; overrides; the embedded default."""

import pytest

from resumable.errors import ConfigError
from resumable.train.config import ignored_keys, load_config, parse_config


def test_the_embedded_default_is_dp2_tp2_with_a_checkpoint_monitor():
    cfg = load_config()
    assert (cfg.parallel_config.data_parallel, cfg.parallel_config.model_parallel) == (2, 2)
    assert cfg.checkpoint is not None and cfg.checkpoint.prefix == "CKP"
    assert str(cfg.checkpoint_dir) == "output/checkpoint"


def test_set_overrides_nested_keys_and_list_items():
    cfg = load_config(None, ["runner_config.stop_step=20", "callbacks.0.keep_checkpoint_max=2",
                             "resume_training=true", "callbacks.0.directory=/tmp/x"])
    assert cfg.runner_config.stop_step == 20 and cfg.checkpoint.keep_checkpoint_max == 2
    assert cfg.resume_training is True and str(cfg.checkpoint_dir) == "/tmp/x"
    assert load_config(None, ["resume_training=CKP_rank_0-1_4.safetensors"]).resume_training == \
        "CKP_rank_0-1_4.safetensors"


def _message(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(None, list(overrides))
    return str(err.value)


def test_an_unknown_key_is_named_with_the_closest_one():
    assert _message("model.hiden_size=32") == ("invalid config:\n  --set model.hiden_size=32: unknown key; did you "
                                               "mean model.hidden_size?")


def test_a_wrong_type_is_named_with_the_value():
    assert _message("runner_config.batch_size=four") == (
        "invalid config:\n  --set runner_config.batch_size=four: expected an integer, got 'four'")


def test_an_impossible_value_is_named():
    assert _message("callbacks.0.keep_checkpoint_max=0") == (
        "invalid config:\n  --set callbacks.0.keep_checkpoint_max=0: must be greater than 0, got 0")


def test_heads_that_do_not_group_are_refused_naming_both_keys():
    assert _message("model.num_attention_heads=6", "model.num_key_value_heads=4") == (
        "invalid config:\n  --set model.num_attention_heads=6, --set model.num_key_value_heads=4: "
        "model.num_attention_heads (6) must be a multiple of model.num_key_value_heads (4)")


def test_an_unknown_callback_type_is_named():
    with pytest.raises(ConfigError) as err:
        parse_config({"callbacks": [{"type": "LossMonitor"}]})
    assert str(err.value) == ("invalid config:\n  <dict>: callbacks.0.type: expected 'CheckpointMonitor', got "
                              "'LossMonitor'")


def test_a_set_past_the_end_of_a_list_is_named():
    with pytest.raises(ConfigError, match=r"--set callbacks\.3\.prefix: '3' is not an index of the 1-item list callbacks"):
        load_config(None, ["callbacks.3.prefix=X"])


def test_a_set_without_a_value_is_refused():
    with pytest.raises(ConfigError, match=r"--set 'seed': expected KEY=VALUE"):
        load_config(None, ["seed"])


def test_a_missing_or_broken_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=rf"config file {tmp_path / 'nope.yaml'} does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"config file {bad} is not valid YAML"):
        load_config(bad)


def test_legacy_only_keys_under_checkpoint_2_are_reported_not_dropped():
    cfg = load_config(None, ["auto_trans_ckpt=true", "transform_process_num=2", "src_strategy_path_or_dir=s"])
    said = ("only applies to use_legacy_format: true; Checkpoint 2.0 loads any layout without conversion (a "
            "MindFormers legacy tree too, with src_strategy_path_or_dir), so it is ignored")
    # src_strategy_path_or_dir is read in both modes (a MindFormers legacy tree's strategy files).
    assert ignored_keys(cfg) == [f"auto_trans_ckpt=True {said}", f"transform_process_num=2 {said}"]
    assert ignored_keys(load_config(None, ["auto_trans_ckpt=true", "use_legacy_format=true"])) == []
