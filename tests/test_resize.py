"""Loading a checkpoint into a model with a larger vocabulary (resize.py), checked with NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from easylm_align import checkpoint, model, resize, train
from easylm_align.tokenizer import DEMO_TOKENIZER
from test_train import make_config

NEW_PIECES = ["\u2581नमस्ते", "भारत", "\u2581भारत", "स्ते"]  # appended in this order after the demo's 4096


def _extended_tokenizer(path):
    """The demo tokenizer with NEW_PIECES appended to its model proto (lowest scores, ids 4096...)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(DEMO_TOKENIZER.read_bytes())
    low = min(p.score for p in proto.pieces)
    for k, text in enumerate(NEW_PIECES):
        proto.pieces.add(piece=text, score=low - 1 - k)
    path.write_bytes(proto.SerializeToString())
    return path


def _old_ids(sp, piece):
    """The documented rule, written out here: encode the piece's text ('▁' as a space) with the old
    tokenizer; drop a lone leading '▁' (the dummy prefix) when the piece has no leading '▁'."""
    pieces = sp.EncodeAsPieces(piece.replace("\u2581", " "))
    if pieces[0] == "\u2581" and not piece.startswith("\u2581"):
        pieces = pieces[1:]
    return [sp.PieceToId(p) for p in pieces]


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory):
    old_run = tmp_path_factory.mktemp("old")
    train.Trainer(make_config(old_run, total_steps=1)).run()  # records the demo tokenizer in its flags
    return old_run / "checkpoints/streaming_params_1"


@pytest.mark.parametrize("init", ["subword_mean", "mean", "random"])
def test_new_rows_follow_the_init_and_old_logits_do_not_change(tmp_path, old_checkpoint, init):
    ckpt = old_checkpoint
    new_tok = _extended_tokenizer(tmp_path / "extended.model")
    cfg = make_config(tmp_path / "new", total_steps=1, load_checkpoint=f"params::{ckpt}",
                      tokenizer__vocab_file=str(new_tok), resize__init=init, resize__pad_vocab_to_multiple=64)
    trainer = train.Trainer(cfg)
    assert trainer.llama_config.vocab_size == 4160  # 4100 pieces rounded up to a multiple of 64
    params, _ = trainer._build_state(checkpoint.TrainCheckpointer(tmp_path / "new", 0, 0))
    old = checkpoint.load_params_numpy(str(ckpt))
    emb, head = np.asarray(params["embed_tokens"]["embedding"]), np.asarray(params["lm_head"]["kernel"])
    old_emb, old_head = old["embed_tokens"]["embedding"], old["lm_head"]["kernel"]
    assert emb.shape == (4160, old_emb.shape[1]) and head.shape == (old_head.shape[0], 4160)
    np.testing.assert_array_equal(emb[:4096], old_emb)
    np.testing.assert_array_equal(head[:, :4096], old_head)
    if init == "subword_mean":
        sp = spm.SentencePieceProcessor(model_file=str(DEMO_TOKENIZER))
        for k, piece in enumerate(NEW_PIECES):
            ids = _old_ids(sp, piece)
            assert len(ids) >= 2
            np.testing.assert_allclose(emb[4096 + k], old_emb[ids].mean(0), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(head[:, 4096 + k], old_head[:, ids].mean(1), rtol=1e-6, atol=1e-7)
    if init in ("subword_mean", "mean"):  # padding rows (and all rows for init=mean): the global mean
        first = 4096 + (len(NEW_PIECES) if init == "subword_mean" else 0)
        np.testing.assert_allclose(emb[first:], np.broadcast_to(old_emb.mean(0), emb[first:].shape), rtol=1e-6,
                                   atol=1e-7)
        np.testing.assert_allclose(head[:, first:], np.broadcast_to(old_head.mean(1)[:, None], head[:, first:].shape),
                                   rtol=1e-6, atol=1e-7)
    else:
        std = float(emb[4096:].std())
        assert 0.015 < std < 0.025 and not np.allclose(emb[4096], emb[4097])  # normal(0, 0.02) as at init

    # On old pieces the resized model's logits over the old vocabulary are the original model's.
    ids = jnp.asarray([sp_ids for sp_ids in [[1, 200, 300, 400, 17, 5, 4095, 2]]], jnp.int32)
    old_model = model.build_model(model.get_llama_config("demo", make_config(tmp_path).update_llama_config))
    new_logits = trainer.model.apply({"params": jax.device_get(params)}, ids).logits
    old_logits = old_model.apply({"params": old}, ids).logits
    np.testing.assert_allclose(np.asarray(new_logits)[..., :4096], np.asarray(old_logits), rtol=1e-5, atol=1e-5)


def test_equal_vocabulary_loads_unchanged_and_bad_init_is_one_line(tmp_path):
    params = {"embed_tokens": {"embedding": np.ones((4, 2), np.float32)}}
    with pytest.raises(resize.ConfigError, match="--resize.init='zero'"):
        resize.resize_params(params, 6, [[], []], "zero", 0.02)
    assert resize.padded_vocab_size(4100, 4096, 0) == 4096
    assert resize.padded_vocab_size(4100, 4096, 128) == 4224
