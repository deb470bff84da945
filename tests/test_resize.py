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


def test_extended_model_exports_to_transformers(tmp_path):
    """extend_vocab -> resize_vocab -> convert_to_hf: transformers' logits equal ours and its tokenizer
    encodes as ours, Hindi (new pieces) and English alike."""
    import json
    import subprocess
    import sys

    import torch
    import transformers
    from conftest import REPO_ROOT, TEST_DATA
    from easylm_align.conversion.to_hf import export
    from easylm_align.tokenizer import Tokenizer
    from easylm_align.tools import extend_vocab
    from test_convert import VOCAB, forward_fn, our_config, random_checkpoint, train_llama_tokenizer

    base = train_llama_tokenizer(tmp_path / "base.model")
    hindi = tmp_path / "hi.txt"
    hindi.write_text("\n".join((TEST_DATA / "mono/hi.ud_pud.txt").read_text(encoding="utf-8").splitlines()[:150]))
    extended = tmp_path / "extended.model"
    added, _ = extend_vocab.extend(str(base), str(hindi), VOCAB + 200, str(extended))
    config = our_config(num_key_value_heads=2)
    old_params = random_checkpoint(tmp_path / "old", config, seed=2)
    result = subprocess.run([sys.executable, "-m", "easylm_align.tools.resize_vocab",
                             f"--load_checkpoint=params::{tmp_path / 'old'}", f"--tokenizer={extended}",
                             f"--old_tokenizer={base}", f"--output={tmp_path / 'resized'}",
                             "--pad_vocab_to_multiple=64"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    new_vocab = -(-(VOCAB + added) // 64) * 64
    params = checkpoint.load_params_numpy(str(tmp_path / "resized"))
    assert params["embed_tokens"]["embedding"].shape[0] == new_vocab
    np.testing.assert_array_equal(params["lm_head"]["kernel"][:, :VOCAB], old_params["lm_head"]["kernel"])

    out = export(str(tmp_path / "resized"), str(tmp_path / "hf"), str(extended), dtype="fp32")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == new_vocab
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours_tok, theirs_tok = Tokenizer(str(extended)), transformers.AutoTokenizer.from_pretrained(out)
    texts = ["भारत की राजधानी नई दिल्ली है।", "The three primary colors are red, blue, and yellow."]
    for text in texts:
        assert theirs_tok.encode(text, add_special_tokens=False) == ours_tok.encode(text), text
    ids = np.asarray([[1] + ours_tok.encode(texts[0])[:15]])
    assert ids.max() >= VOCAB  # the Hindi sentence uses new pieces
    resized_config = our_config(num_key_value_heads=2, vocab_size=new_vocab)
    ours = np.asarray(forward_fn(resized_config)(params, jnp.asarray(ids)))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_subword_mean_without_a_known_old_tokenizer_is_one_line(tmp_path):
    params = {"embed_tokens": {"embedding": np.ones((4, 2), np.float32)}}
    checkpoint.save_params(tmp_path / "ckpt", params, meta={})  # records no tokenizer
    target = {"embed_tokens": {"embedding": jax.ShapeDtypeStruct((6, 2), jnp.float32)}}
    assert resize.vocab_growth(str(tmp_path / "ckpt"), target) == (4, 6)
    with pytest.raises(resize.ConfigError, match="--resize.old_tokenizer"):
        resize.load_params(str(tmp_path / "ckpt"), target, None, resize.default_config(), str(DEMO_TOKENIZER))
    config = resize.default_config()
    config.init = "mean"  # needs no tokenizer
    grown = resize.load_params(str(tmp_path / "ckpt"), target, model.get_llama_config("demo"), config,
                               str(DEMO_TOKENIZER))
    np.testing.assert_array_equal(np.asarray(grown["embed_tokens"]["embedding"]), np.ones((6, 2)))
