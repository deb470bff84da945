"""Llama 3.x, Qwen2 and Mistral: one decoder, three configs, checked against `transformers`.

Each family is a random tiny model built here from a `transformers` config (nothing is
downloaded): Llama with Llama 3.1's `llama3` rope scaling and tied embeddings, Qwen2 with its q/k/v
biases, Mistral with a sliding window shorter than the test sequence. The test sequence (24) is
longer than the Llama model's original_max_position_embeddings (16), so the scaled frequencies matter.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from easylm_align import checkpoint, model
from easylm_align.conversion.from_hf import import_hf
from easylm_align.conversion.to_hf import export
from easylm_align.errors import ConfigError
from easylm_align.conversion import ConversionError
from easylm_align.conversion.families import llama_fields_from_hf, suggest_flags
from easylm_align.tokenizer import DEMO_TOKENIZER, Tokenizer, TokenizerError

VOCAB, SEQ, WINDOW, ORIGINAL_POSITIONS = 4096, 24, 8, 16
SHAPES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL_POSITIONS}
FAMILIES = {
    "llama3": lambda: transformers.LlamaConfig(**SHAPES, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                                               tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama_linear": lambda: transformers.LlamaConfig(**SHAPES, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "qwen2": lambda: transformers.Qwen2Config(**SHAPES, rope_theta=1000000.0, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**SHAPES, sliding_window=WINDOW, rope_theta=1000000.0),
}
CLASSES = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "mistral": transformers.MistralForCausalLM}


def hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    hf = CLASSES[config.model_type](config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: make every tensor tell itself apart
        for name, weight in hf.named_parameters():
            if name.endswith("norm.weight"):
                weight.normal_(1.0, 0.1)
            elif name.endswith(".bias"):
                weight.normal_(0.0, 0.1)
    return hf


@pytest.fixture(scope="module", params=list(FAMILIES))
def imported(request, tmp_path_factory):
    """(family, HF model, its directory, our config, our params) after convert_from_hf."""
    tmp = tmp_path_factory.mktemp(request.param)
    hf = hf_model(request.param)
    hf.save_pretrained(tmp / "hf")
    path, preset, updates = import_hf(str(tmp / "hf"), str(tmp / "ours"))
    config = model.get_llama_config(preset, json.dumps(updates))
    target = jax.eval_shape(lambda: model.init_params(model.build_model(config), jax.random.PRNGKey(0)))
    return request.param, hf, tmp, path, config, checkpoint.load_params(str(path), target)


def padded_batch():
    """Two rows, the second left-padded by 5: tokens, 0/1 mask and positions counted from the first real token."""
    tokens = np.random.RandomState(0).randint(3, VOCAB, (2, SEQ))
    mask = np.ones((2, SEQ), np.int32)
    mask[1, :5] = 0
    tokens[1, :5] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions


def our_logits(config, params, tokens, mask, positions, backend="auto"):
    config = model.get_llama_config("debug", json.dumps(dict(config.to_dict(), attention=backend)))
    out = model.build_model(config).apply({"params": params}, jnp.asarray(tokens), positions=jnp.asarray(positions),
                                          segment_ids=jnp.asarray(mask))
    return np.asarray(out.logits)


def hf_logits(hf, tokens, mask, positions):
    with torch.no_grad():
        return hf(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(positions)).logits.numpy()


def test_import_reads_the_family_fields(imported):
    family, hf, _, _, config, _ = imported
    assert config.model_type == hf.config.model_type
    assert config.attention_bias == (family == "qwen2")
    assert config.sliding_window == (WINDOW if family == "mistral" else 0)
    assert config.rope_scaling_type == {"llama3": "llama3", "llama_linear": "linear"}.get(family, "none")
    assert config.tie_word_embeddings == hf.config.tie_word_embeddings


def test_logits_match_transformers_on_a_padded_batch(imported):
    _, hf, _, _, config, params = imported
    tokens, mask, positions = padded_batch()
    real = mask.astype(bool)
    np.testing.assert_allclose(our_logits(config, params, tokens, mask, positions)[real],
                               hf_logits(hf, tokens, mask, positions)[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["einsum", "xla", "chunked", "blockwise"])
def test_sliding_window_in_every_backend_that_has_it(imported, backend):
    family, hf, _, _, config, params = imported
    if family != "mistral":
        pytest.skip("the window is Mistral's")
    tokens, mask, positions = padded_batch()
    real = mask.astype(bool)
    config = model.get_llama_config("debug", json.dumps(dict(config.to_dict(), attention_block_size=8)))
    np.testing.assert_allclose(our_logits(config, params, tokens, mask, positions, backend)[real],
                               hf_logits(hf, tokens, mask, positions)[real], atol=1e-4, rtol=0)


def test_a_backend_without_the_window_refuses_a_longer_sequence(imported):
    family, _, _, _, config, params = imported
    if family != "mistral":
        pytest.skip("the window is Mistral's")
    tokens, mask, positions = padded_batch()
    with pytest.raises(ConfigError, match="sliding window"):
        our_logits(config, params, tokens, mask, positions, "splash")
    # auto never picks a backend that lacks the window, and one at most as long as the window needs none
    options = model.run_options(config, True, jnp.float32, SEQ)
    assert model.attention.resolve("auto", options, "cpu") in ("chunked", "blockwise")
    assert not model.run_options(config, True, jnp.float32, WINDOW).window


def test_greedy_generation_matches_transformers(imported):
    _, hf, _, _, config, params = imported
    prompt = np.random.RandomState(3).randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(prompt), do_sample=False, max_new_tokens=SEQ - 6,
                             eos_token_id=None, pad_token_id=0).numpy()
    forward = jax.jit(lambda p, t: model.build_model(config).apply({"params": p}, t).logits)
    tokens = np.zeros((2, SEQ), np.int32)
    tokens[:, :6] = prompt
    for t in range(6, SEQ):  # full forward over a fixed buffer: causal, so later slots cannot matter
        tokens[:, t] = np.asarray(forward(params, jnp.asarray(tokens))[:, t - 1].argmax(-1))
    np.testing.assert_array_equal(tokens, theirs)


def test_hf_to_ours_to_hf_is_bitwise_and_loads_as_the_right_class(imported):
    _, hf, tmp, path, config, _ = imported
    out = export(str(path), str(tmp / "back"), str(DEMO_TOKENIZER), dtype="fp32", overwrite=True)
    exported = {}
    for shard in sorted(out.glob("*.safetensors")):
        exported.update(safetensors.numpy.load_file(shard))
    original = {name: t.numpy() for name, t in hf.state_dict().items()
                if not (name == "lm_head.weight" and hf.config.tie_word_embeddings)}
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert np.array_equal(exported[name], tensor), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(hf)
    for key in ("rope_parameters", "sliding_window", "tie_word_embeddings"):
        assert getattr(reloaded.config, key, None) == getattr(hf.config, key, None), key
    tokens, mask, positions = padded_batch()
    np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask, positions), hf_logits(hf, tokens, mask, positions))


def test_loss_and_gradients_past_the_original_context_are_finite(imported):
    family, _, _, _, config, params = imported
    if family != "llama3":
        pytest.skip("rope scaling is Llama 3.1's")
    length = 3 * ORIGINAL_POSITIONS
    tokens = jnp.asarray(np.random.RandomState(4).randint(3, VOCAB, (1, length)))
    flax_model = model.build_model(config)

    def loss(p):
        logits = flax_model.apply({"params": p}, tokens).logits[:, :-1]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    value, grads = jax.value_and_grad(loss)(params)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_llama3_frequencies_follow_metas_rule():
    """Meta's `apply_scaling` (llama/model.py of Llama 3.1), written out per frequency here."""
    dim, theta = 128, 500000.0
    rope = model.Rope(theta, "llama3", 8.0, 1.0, 4.0, 8192)
    base = [1.0 / theta ** (i / dim) for i in range(0, dim, 2)]
    expected = []
    for freq in base:
        wavelength = 2 * np.pi / freq
        if wavelength < 8192 / 4.0:
            expected.append(freq)
        elif wavelength > 8192 / 1.0:
            expected.append(freq / 8.0)
        else:
            smooth = (8192 / wavelength - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * freq / 8.0 + smooth * freq)
    np.testing.assert_allclose(model.inverse_frequencies(rope, dim), expected, rtol=1e-5)


@pytest.mark.parametrize("field, value, named", [
    ("model_type", "gemma", "model_type"),
    ("num_local_experts", 8, "num_local_experts"),
    ("use_qk_norm", True, "use_qk_norm"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "yarn"),
    ("attention_bias", True, "attention_bias"),
])
def test_unsupported_checkpoint_fields_are_refused_by_name(tmp_path, field, value, named):
    config = dict(FAMILIES["llama3"]().to_dict(), **{field: value})
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=named):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "out"))


def test_presets_resolve_with_the_large_model_defaults():
    for name in ("llama3_1_8b", "llama3_2_1b", "llama3_2_3b", "llama3_1_70b", "qwen2_5_0_5b", "qwen2_5_1_5b",
                 "qwen2_5_7b", "mistral_7b_v0_3"):
        config = model.get_llama_config(name, platform="cpu")
        assert config.scan_layers and config.remat_policy == "nothing_saveable", name
    hf_like = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
                   rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE, factor=32.0, original_max_position_embeddings=8192))
    assert suggest_flags(llama_fields_from_hf(hf_like)) == ("llama3_2_1b", {})


def test_auto_layer_layout_is_unrolled_only_for_a_tpu():
    # The presets' "auto": on a TPU unrolled blocks (a scanned step keeps a bf16 copy of the weight
    # stack there); scanned elsewhere. A value the user gives is kept on every platform.
    assert [model.get_llama_config("7b", platform=p).scan_layers for p in ("cpu", "gpu", "tpu")] == [True, True, False]
    assert model.get_llama_config("7b", overrides={"scan_layers": True}, platform="tpu").scan_layers is True
    assert model.get_llama_config("debug", '{"scan_layers": "auto"}', platform="tpu").scan_layers is False
    with pytest.raises(ConfigError, match=r'--update_llama_config: scan_layers must be true, false or "auto", '
                                          r"got 'yes'"):
        model.get_llama_config("7b", '{"scan_layers": "yes"}')


@pytest.mark.parametrize("tokenizer", ["tiny_bpe", "llama3"])
def test_seed_commit_command_runs_a_llama3_shaped_model(tokenizer, tmp_path, test_data, request):
    """The seed's COMMIT command (code-mixing on) for 3 steps: Llama 3.2's preset shrunk to 2 narrow
    layers (rope scaling, tied embeddings, scan and remat kept) with a Hugging Face or tiktoken tokenizer.
    With Llama 3's tokenizer it runs as the sweep runs it (train, then `evaluate` on the final
    checkpoint, one value of codemix_ratio), and `evaluate_icl` runs on the same checkpoint."""
    from test_sweep import run_sweep
    from test_train import SEED_COMMIT, SEED_COMMON, run_train

    if tokenizer == "llama3":
        tok, vocab = request.getfixturevalue("shared_data") / "tokenizers/llama3/tokenizer.tiktoken", 128256
    else:
        tok, vocab = test_data / "tokenizers/tiny-bpe", 1000
    out = tmp_path / "out"
    args = (SEED_COMMON + "\n" + SEED_COMMIT).format(steps=3, out=out, tok=tok, warmup=1,
                                                     data=test_data / "instruct_x/en.json").split()
    args = [a.replace("--load_llama_config=debug", "--load_llama_config=llama3_2_1b") for a in args]
    args += ["--update_llama_config=" + json.dumps(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                                        bos_token_id=0 if vocab == 1000 else 128000,
                                                        eos_token_id=1 if vocab == 1000 else 128001)),
             "--log_freq=5000"]
    if tokenizer == "llama3":
        args = [a for a in args if not a.startswith(("--logger.output_dir=", "--train_dataset.text_processor.codemix_ratio="))]
        sweep = run_sweep("--param=train_dataset.text_processor.codemix_ratio", "--values=0.9", f"--sweep_dir={tmp_path}",
                          f"--eval.squad_file={test_data / 'xquad/xquad.hi.json'}", "--eval.lang=hi",
                          "--eval.max_examples=2", "--eval.max_new_tokens=4", "--", *args)
        assert sweep.returncode == 0, (sweep.stdout + sweep.stderr)[-3000:]
        out = tmp_path / "codemix_ratio=0.9"
        assert len(json.loads((out / "eval_xquad_hi.json").read_text())["examples"]) == 2
        assert (tmp_path / "sweep.csv").is_file()
    else:
        result = run_train(args)
        assert result.returncode == 0, result.stderr[-3000:]
    meta = checkpoint.read_meta(out / "checkpoints/streaming_params_3")
    assert meta["llama_config"]["rope_scaling_type"] == "llama3" and meta["llama_config"]["scan_layers"]
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["step"] == 3 and row["codemix/words_replaced"] > 0 and np.isfinite(row["loss"])

    if tokenizer != "llama3":  # the decoder with a tokenizer.json is covered above, in seconds
        return
    model_flags = [f"--load_checkpoint=params::{out}/checkpoints/streaming_params_3", "--load_llama_config=llama3_2_1b",
                   args[-2], f"--tokenizer.vocab_file={tok}"]
    icl = subprocess.run([sys.executable, "-m", "easylm_align.evaluate_icl", *model_flags, "--icl.tasks=pawsx",
                          "--icl.prompt_langs=en", "--icl.sample_langs=zh", "--icl.shots=0", f"--icl.data_dir={test_data}",
                          "--icl.limit=4", f"--icl.output={tmp_path / 'icl.json'}"],
                         capture_output=True, text=True, timeout=600)
    assert icl.returncode == 0, icl.stderr[-3000:]
    assert json.loads((tmp_path / "icl.json").read_text())["results"]["pawsx_zh_s0_i0"]["n"] == 4


def test_kv_cache_decoding_of_left_padded_prompts_matches_transformers(imported):
    """The evaluators' decoder (KV cache, prompts left-padded to a 64-slot bucket, longer than
    Mistral's window) against `generate` on the same prompts padded to their longest."""
    from easylm_align.evaluation.generation import GreedyDecoder
    from easylm_align.tokenizer import Tokenizer

    _, hf, _, _, config, params = imported
    tok = Tokenizer(str(Path(__file__).resolve().parent / "data/tokenizers/tiny-bpe"))
    rng = np.random.RandomState(5)
    prompts = [list(rng.randint(3, VOCAB, 5)), list(rng.randint(3, VOCAB, 11))]
    ours = GreedyDecoder(model.build_model(config), tok, max_new_tokens=12, stop_at_newline=False).generate(
        params, prompts).token_ids
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=tok.eos_id,
                             pad_token_id=0).numpy()[:, longest:]
    for row, generated in enumerate(theirs.tolist()):
        end = generated.index(tok.eos_id) + 1 if tok.eos_id in generated else len(generated)
        assert ours[row] == generated[:end], row


def test_weight_decay_of_qwen2_biases_follows_easylms_rule():
    """EasyLM decays every parameter; Qwen2's q/k/v biases are spared only when the exclusion says so."""
    from easylm_align import optimizer

    params = {"attention": {"wq": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}}
    assert optimizer.decay_mask("")(params)["attention"]["wq"] == {"kernel": True, "bias": True}
    assert optimizer.decay_mask("/bias$")(params)["attention"]["wq"] == {"kernel": True, "bias": False}


def test_import_records_a_tokenizer_json_directorys_tokenizer(tmp_path, test_data):
    """A Llama-3-style directory (tokenizer.json and tokenizer_config.json, no tokenizer.model): the
    imported checkpoint records its identity, so a run given another tokenizer is refused."""
    hf_dir = tmp_path / "hf"
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, bos_token_id=0, eos_token_id=1)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(test_data / "tokenizers/tiny-bpe" / name, hf_dir / name)
    path, _, _ = import_hf(str(hf_dir), str(tmp_path / "ours"))
    recorded = checkpoint.read_meta(path)["tokenizer"]
    assert recorded == Tokenizer(str(hf_dir)).identity()
    Tokenizer(str(hf_dir / "tokenizer.json")).check_recorded(recorded, "checkpoint")  # the same tokenizer
    with pytest.raises(TokenizerError, match="was trained with the tokenizer"):
        Tokenizer(str(DEMO_TOKENIZER)).check_recorded(recorded, "checkpoint")
