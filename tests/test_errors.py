"""User errors become one line and exit status 2; every other exception keeps its traceback."""

import jax
import pytest

from easylm_align import checkpoint, codemix, records, sharding, tokenizer
from easylm_align.conversion import ConversionError, easylm_checkpoint
from easylm_align.data import pipeline, processors
from easylm_align.errors import ConfigError, UserError, exit_on_user_error
from easylm_align.evaluation import squad
from easylm_align.tools.sweep.plan import SweepError


def test_a_user_error_is_one_line_and_exit_status_2(capsys):
    with pytest.raises(SystemExit) as info:
        with exit_on_user_error():
            raise checkpoint.CheckpointError("checkpoint path 'x' matches nothing")
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: checkpoint path 'x' matches nothing\n"


def test_a_jax_value_error_is_not_taken_for_a_user_error(capsys):
    with pytest.raises(ValueError, match="must be >= the product of mesh_shape") as info:
        with exit_on_user_error():
            jax.make_mesh((3 * jax.device_count(),), ("x",))  # JAX's own ValueError: a bug, not bad input
    assert not isinstance(info.value, UserError)
    assert info.traceback and capsys.readouterr().err == ""


@pytest.mark.parametrize("error", [
    ConfigError, checkpoint.CheckpointError, codemix.DictionaryError, pipeline.DataError,
    easylm_checkpoint.EasyLMFormatError, ConversionError, sharding.ShardingError,
    processors.ProcessorError, tokenizer.TokenizerError, squad.SquadFormatError,
    records.DataError, SweepError], ids=lambda e: e.__name__)
def test_every_project_error_is_a_user_error(error):
    assert issubclass(error, UserError) and issubclass(error, ValueError)
