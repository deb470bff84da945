"""XQuAD exact match every N train steps, in the metrics like the loss."""

import json

import pytest

from easylm_align import train

from test_train import make_config, read_metrics


def _config(tmp_path, test_data, **overrides):
    settings = dict(total_steps=4, log_freq=3, squad_eval__freq=2,
                    squad_eval__squad_file=str(test_data / "xquad" / "xquad.hi.json"), squad_eval__lang="hi",
                    squad_eval__max_examples=2, squad_eval__max_new_tokens=4, squad_eval__batch_size=2,
                    update_llama_config=json.dumps({"hidden_size": 64, "intermediate_size": 128,
                                                    "num_attention_heads": 4, "num_key_value_heads": 2,
                                                    "vocab_size": 4096, "max_position_embeddings": 128}))
    return make_config(tmp_path / "run", **dict(settings, **overrides))


def test_exact_match_is_logged_every_freq_steps(tmp_path, test_data):
    train.Trainer(_config(tmp_path, test_data)).run()
    rows = {row["step"]: row for row in read_metrics(tmp_path / "run")}
    assert sorted(rows) == [2, 3, 4]  # log_freq=3 and the last step, plus every squad_eval step
    for step in (2, 4):
        assert 0.0 <= rows[step]["eval/xquad_hi/exact_match"] <= 100.0
        assert 0.0 <= rows[step]["eval/xquad_hi/f1"] <= 100.0
    assert "eval/xquad_hi/exact_match" not in rows[3]


@pytest.mark.parametrize("overrides, message", [
    (dict(squad_eval__squad_file=""), "--squad_eval.squad_file is required"),
    (dict(squad_eval__lang=""), "--squad_eval.lang is required"),
    (dict(squad_eval__freq=-1), "--squad_eval.freq=-1"),
])
def test_bad_settings_fail_before_training(tmp_path, test_data, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.Trainer(_config(tmp_path, test_data, **overrides))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
