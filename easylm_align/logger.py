"""Training metrics: a JSON line per logged step (`metrics.jsonl`), TensorBoard events, optionally
Weights & Biases, throughput and estimated model-FLOPs utilisation (MFU).

Weights & Biases uses EasyLM's logger flags: `--logger.online=True` turns it on (wandb is imported
only then), `--logger.project`, `--logger.entity` and `--logger.notes` are passed to `wandb.init`,
a non-empty `--logger.prefix` makes the project `PREFIX--PROJECT` as in EasyLM, and
`--logger.experiment_id` is the W&B run id. Without one, the run's id is drawn once and kept in
`output_dir/wandb_run_id`, so a resumed run continues the same W&B run. W&B gets the same rows
as metrics.jsonl, and the run configuration; its files go to `output_dir/wandb`. wandb's own
environment applies (`WANDB_MODE=offline` keeps everything local; `wandb sync` uploads it later).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import jax
from ml_collections import ConfigDict

from easylm_align.errors import ConfigError, UserError

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix (vendors' figures).
PEAK_FLOPS = {
    "TPU v2": 45e12, "TPU v3": 123e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v6": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12, "NVIDIA A800": 312e12,
}


METRICS_FILE = "metrics.jsonl"


class LogWriteError(UserError):
    """The run's metrics cannot be written (a full file system, a quota, permissions)."""


@contextlib.contextmanager
def naming_failed_writes(path: Path) -> Iterator[None]:
    """An OSError while writing the run's logs becomes one line naming the file and what to do."""
    try:
        yield
    except OSError as e:
        where = e.filename or path
        raise LogWriteError(f"cannot write {where} ({e.strerror or e}); free space there or choose another "
                            "--logger.output_dir, then rerun the same command") from None


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The rows a run writing to `output_dir` has logged (one per logged step), oldest first."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def default_config() -> ConfigDict:
    return ConfigDict(dict(
        output_dir="", tensorboard=True, peak_flops_per_device=0.0,
        # Weights & Biases, with EasyLM's names (see the module docstring)
        online=False, project="easylm_align", prefix="", experiment_id="", entity="", notes=""))


def _start_wandb(config: ConfigDict, output_dir: Path, run_config: Optional[dict]) -> Any:
    try:
        import wandb
    except ImportError:
        raise ConfigError("--logger.online=True logs to Weights & Biases, but the wandb package is not "
                          "installed: pip install wandb (or leave --logger.online off)") from None
    run_id = config.experiment_id or _kept_run_id(output_dir)
    project = f"{config.prefix}--{config.project}" if config.prefix else config.project
    return wandb.init(project=project, entity=config.entity or None, notes=config.notes or None, id=run_id,
                      resume="allow", dir=str(output_dir), config=run_config or {})


def _kept_run_id(output_dir: Path) -> str:
    path = output_dir / "wandb_run_id"
    if not path.exists():
        path.write_text(uuid.uuid4().hex)
    return path.read_text().strip()


def peak_flops_per_device(override: float = 0.0) -> Optional[float]:
    if override > 0:
        return override
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


class MetricsLogger:
    def __init__(self, config: ConfigDict, output_dir: Path, flops_per_token: float, resume_step: int = 0,
                 run_config: Optional[dict] = None):
        """`run_config` (the run's flags) is recorded with the Weights & Biases run."""
        self.is_main = jax.process_index() == 0
        self.path = output_dir / METRICS_FILE
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_per_device(config.peak_flops_per_device)
        self.num_devices = jax.device_count()
        self._last_time, self._tokens = time.perf_counter(), 0
        self.writer = self.wandb_run = None
        if not self.is_main:
            return
        with naming_failed_writes(self.path):
            output_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_after(resume_step)
            if config.tensorboard:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(str(output_dir / "tensorboard"))
            if config.online:
                self.wandb_run = _start_wandb(config, output_dir, run_config)

    def _truncate_after(self, step: int) -> None:
        """A run killed after its last checkpoint logged steps that the resumed run will log again."""
        if self.path.exists():
            kept = [row for row in read_metrics(self.path.parent) if row.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def count_tokens(self, n: int) -> None:
        self._tokens += n

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        tokens_per_s = self._tokens / max(now - self._last_time, 1e-9)
        self._last_time, self._tokens = now, 0
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}, "tokens_per_s": tokens_per_s,
               "mfu": (tokens_per_s * self.flops_per_token / (self.num_devices * self.peak)) if self.peak else None}
        if self.is_main:
            with naming_failed_writes(self.path), open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.writer is not None:
                for k, v in row.items():
                    if k != "step" and v is not None:
                        self.writer.add_scalar(k, v, step)
                self.writer.flush()
            if self.wandb_run is not None:
                self.wandb_run.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)
        return row

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
