"""XQuAD / MLQA exact match on a small slice every N train steps, logged like the loss.

`--squad_eval.freq=N` turns it on; the other `--squad_eval.*` flags are `--eval.*` of
`python -m easylm_align.evaluate` (same prompt, decoding and metric), with a small
`max_examples` by default so that a sweep's curves show EM over training at little cost. The
row logged at step N gains `eval/{task}/exact_match` and `eval/{task}/f1` (e.g. `xquad_hi`).
"""

from __future__ import annotations

from typing import Any, Optional

from jax.sharding import Mesh
from ml_collections import ConfigDict

from easylm_align.errors import ConfigError
from easylm_align.evaluation import qa, squad
from easylm_align.evaluation.generation import GreedyDecoder
from easylm_align.model import LlamaForCausalLM
from easylm_align.tokenizer import Tokenizer


def default_config() -> ConfigDict:
    """`--squad_eval.*`: how often, then the evaluator's own `--eval.*` fields."""
    cfg = qa.default_eval_config()
    cfg.max_examples = 32
    cfg.batch_size = 8
    del cfg["output"]  # the scores go to the training metrics
    return ConfigDict(dict(freq=0, **cfg.to_dict()))


class SquadDuringTraining:
    """Built once by the trainer (the file is read and checked before training starts)."""

    def __init__(self, config: ConfigDict, llama: LlamaForCausalLM, tok: Tokenizer, mesh: Optional[Mesh]):
        self.config, self.llama, self.tok, self.mesh = config, llama, tok, mesh
        self.examples: list[squad.QAExample] = []
        self.decoder: Optional[GreedyDecoder] = None
        if config.freq < 0:
            raise ConfigError(f"--squad_eval.freq={config.freq} must be >= 0 (0 turns it off)")
        if not config.freq:
            return
        if not config.squad_file:
            raise ConfigError("--squad_eval.squad_file is required when --squad_eval.freq > 0")
        try:
            qa.check_eval_config(config)
        except ValueError as e:  # the evaluator names its own flag group
            raise ConfigError(str(e).replace("--eval.", "--squad_eval.")) from None
        self.examples = squad.load_squad(config.squad_file)

    def due(self, step: int) -> bool:
        return self.config.freq > 0 and step % self.config.freq == 0

    def __call__(self, params: Any) -> dict[str, float]:
        if self.decoder is None:  # compiled on first use, reused at every later evaluation
            self.decoder = GreedyDecoder(self.llama, self.tok, self.config.max_new_tokens, self.mesh)
        aggregate = qa.evaluate_squad(params, self.llama, self.tok, self.examples, self.config, self.mesh,
                                            self.decoder)["aggregate"]
        return {f"eval/{aggregate['task']}/{key}": aggregate[key] for key in ("exact_match", "f1")}
