"""Weights & Biases logging behind EasyLM's logger flags, run in wandb's offline mode (no network)."""

import json

import pytest

from easylm_align import logger
from easylm_align.errors import ConfigError

_BLOCK = 32 * 1024  # a .wandb file is a LevelDB-style log: 32 KiB blocks of framed records


def wandb_records(path):
    """The protobuf Records of an offline run's `run-ID.wandb` file."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""  # 7 header bytes: ':W&B', magic, version
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a record header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first start a record, middle/last continue
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


@pytest.fixture
def offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is in the test extra: pip install -e .[test]")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path / "run"


def test_wandb_gets_the_rows_of_metrics_jsonl_and_the_config(offline):
    import wandb

    cfg = logger.default_config()
    cfg.update(online=True, tensorboard=False, prefix="commit", project="codemix", notes="ratio 0.5")
    run_config = {"total_steps": 3, "optimizer": {"lr": 2e-5}}
    log = logger.MetricsLogger(cfg, offline, flops_per_token=1.0, run_config=run_config)
    for step in (1, 2, 3):
        log.count_tokens(64)
        log.log(step, {"loss": 4.0 / step, "data/epoch": 0})
    run_id = log.wandb_run.id
    log.close()
    wandb.teardown()  # wandb's service process writes the run file; this waits for it

    assert (offline / "wandb_run_id").read_text() == run_id  # kept, so a resumed run continues it
    (path,) = offline.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    records = list(wandb_records(path))
    kinds = [r.WhichOneof("record_type") for r in records]
    (run,) = [r.run for r, kind in zip(records, kinds) if kind == "run"]
    assert run.run_id == run_id and run.project == "commit--codemix" and run.notes == "ratio 0.5"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["total_steps"] == 3 and config["optimizer"] == {"lr": 2e-5}

    history = []
    for record in (r for r, kind in zip(records, kinds) if kind == "history"):
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        history.append({k: v for k, v in row.items() if not k.startswith("_")} | {"step": row["_step"]})
    expected = [{k: v for k, v in row.items() if v is not None} for row in logger.read_metrics(offline)]
    assert history == expected and [r["step"] for r in history] == [1, 2, 3]


def test_experiment_id_names_the_run(offline):
    cfg = logger.default_config()
    cfg.update(online=True, tensorboard=False, experiment_id="sweep-ratio-05")
    log = logger.MetricsLogger(cfg, offline, flops_per_token=1.0)
    log.log(1, {"loss": 1.0})
    log.close()
    assert list(offline.glob("wandb/offline-run-*-sweep-ratio-05/run-sweep-ratio-05.wandb"))
    assert not (offline / "wandb_run_id").exists()


def test_wandb_is_imported_only_when_online(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as if wandb were not installed
    cfg = logger.default_config()
    cfg.tensorboard = False
    log = logger.MetricsLogger(cfg, tmp_path, flops_per_token=1.0)
    log.log(1, {"loss": 1.0})
    log.close()
    assert logger.read_metrics(tmp_path)[0]["loss"] == 1.0
    cfg.online = True
    with pytest.raises(ConfigError, match="pip install wandb"):
        logger.MetricsLogger(cfg, tmp_path, flops_per_token=1.0)
