"""The trainer's run configuration: every `python -m easylm_align.train` flag as one `ConfigDict`.

The model flags every program shares come from `run_config`; this adds the trainer's own groups
(steps, data, optimizer, objectives, logger, evaluation during training). The trainer defines its
absl flags from `default_config()`, and the sweep parses a train command line into it in-process.
"""

from __future__ import annotations

import copy

from ml_collections import ConfigDict

from easylm_align import logger, objectives, optimizer, resize, run_config
from easylm_align.data import pipeline
from easylm_align.evaluation import during_training

# The trainer's own flags and groups.
DEFAULTS = dict(
    seed=42,
    total_steps=300,
    log_freq=20,
    save_model_freq=0,
    save_milestone_freq=0,
    eval_steps=0,
    dry_run=False,
    dry_run_topology="",  # a TPU slice (tpu_topology.SLICES) the dry run compiles for, on any host
    nonfinite_policy="stop",
    resume_despite_changes="",  # FLAG,... whose change from the checkpoint's value a resume accepts (run_identity)
    objective="clm",
    train_dataset=pipeline.default_config(),
    eval_dataset=pipeline.default_config(),
    optimizer=optimizer.default_config(),
    resize=resize.default_config(),
    objectives=objectives.default_config(),
    logger=logger.default_config(),
    squad_eval=during_training.default_config(),
)


def default_config() -> ConfigDict:
    """The trainer's run configuration (every train flag), for running the trainer from Python."""
    return run_config.default_config(**copy.deepcopy(DEFAULTS))
