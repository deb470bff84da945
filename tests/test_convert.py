"""Hugging Face conversion both ways: logits, greedy decoding, bit-exact round trips, tokenizer, bad input.

Every model is a random demo-sized one made here (ours with Flax, theirs with transformers'
LlamaForCausalLM): nothing is downloaded.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest
import safetensors.numpy
import sentencepiece as spm
import torch
import transformers

from easylm_align import checkpoint, model
from easylm_align.conversion import to_hf
from easylm_align.conversion.from_hf import import_hf
from easylm_align.conversion.to_hf import export
from easylm_align.conversion import ConversionError
from easylm_align.conversion.families import llama_fields_from_hf, suggest_flags
from easylm_align.conversion.hf_mapping import expected_shapes
from easylm_align.tokenizer import ASSETS, Tokenizer

VOCAB = 512
REPO = Path(__file__).resolve().parents[1]


def our_config(**fields):
    return model.get_llama_config("demo", json.dumps({"vocab_size": VOCAB, **fields}))


def random_checkpoint(path: Path, config, seed: int = 0, meta: bool = True):
    """`random_params`, saved as a checkpoint."""
    params = random_params(config, seed)
    checkpoint.save_params(path, params, meta={"llama_config": config.to_dict()} if meta else None)
    return params


def random_params(config, seed: int = 0) -> dict:
    """Random parameters drawn in NumPy (an eager Flax init is much slower). Norm scales are near 1
    but not 1, so a mixed-up norm mapping would change the logits."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("/scale"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.startswith("embed_tokens"):
            value = rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        *parents, leaf = name.split("/")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value.astype(np.float32)
    if config.scan_layers:
        params = model.stack_layers(params, config.num_hidden_layers)
    return params


def forward_fn(config):
    flax_model = model.build_model(config)
    return jax.jit(lambda params, tokens: flax_model.apply({"params": params}, tokens).logits)


def hf_model(seed: int = 0, **fields) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=1024, **fields)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at exactly 1: make them tell input and post-attention norms apart
        for name, weight in hf.named_parameters():
            if name.endswith("norm.weight"):
                weight.normal_(1.0, 0.1)
    return hf


def hf_tensors(directory: Path) -> dict:
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(safetensors.numpy.load_file(shard))
    return tensors


def torch_tensors(hf: transformers.LlamaForCausalLM) -> dict:
    """The state dict as NumPy (bf16 bits kept), without the head when it is tied to the embeddings."""
    out = {}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and hf.config.tie_word_embeddings:
            continue
        out[name] = (tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if tensor.dtype == torch.bfloat16
                     else tensor.numpy())
    return out


def greedy(forward, params, prompt: np.ndarray, new_tokens: int, eos: int, pad: int) -> np.ndarray:
    """Full-forward greedy decoding over a fixed-size buffer (causal: unfilled slots cannot matter),
    finished rows padded after EOS as Hugging Face's generate does."""
    batch, start = prompt.shape
    tokens = np.full((batch, start + new_tokens), pad, np.int32)
    tokens[:, :start] = prompt
    done = np.zeros(batch, bool)
    for t in range(start, start + new_tokens):
        nxt = np.asarray(forward(params, jnp.asarray(tokens))[:, t - 1].argmax(-1))
        tokens[:, t] = np.where(done, pad, nxt)
        done |= nxt == eos
    return tokens


def train_llama_tokenizer(path: Path) -> Path:
    """A 512-piece BPE trained with LLaMA's SentencePiece settings: identity normalization, spaces
    kept, digits split, byte fallback (the settings Hugging Face's LlamaTokenizer reproduces)."""
    texts = [json.loads(line)["text"] for line in (ASSETS / "demo_corpus.jsonl").open(encoding="utf-8")]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(texts), model_writer=buffer, vocab_size=VOCAB, model_type="bpe",
        character_coverage=0.98, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        max_sentence_length=100000, minloglevel=2)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory) -> Path:
    return train_llama_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="module")
def debug_checkpoint(tmp_path_factory):
    """A GQA, untied, unscanned random checkpoint that records its config in the meta."""
    path = tmp_path_factory.mktemp("ckpt") / "streaming_params_10"
    random_checkpoint(path, our_config())
    return path


# ----------------------------------------------------------------------------------------------
# Export: ours → Hugging Face
# ----------------------------------------------------------------------------------------------

EXPORT_VARIANTS = {
    "mha_untied": dict(num_key_value_heads=4),
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "gqa_untied_scanned": dict(num_key_value_heads=2, scan_layers=True),
}


@pytest.mark.parametrize("variant", EXPORT_VARIANTS)
def test_export_logits_and_greedy_match_hf(variant, tmp_path, llama_tokenizer):
    config = our_config(**EXPORT_VARIANTS[variant])
    params = random_checkpoint(tmp_path / "ckpt", config, seed=1)
    forward = forward_fn(config)
    out = export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), str(llama_tokenizer), dtype="fp32",
                 max_shard_size_mb=1)
    assert len(list(out.glob("model-*.safetensors"))) > 1  # 1 MB shards split the ~2 MB model
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["num_key_value_heads"], hf_config["tie_word_embeddings"]) == (
        config.num_key_value_heads, config.tie_word_embeddings)
    assert ("lm_head.weight" in hf_tensors(out)) != config.tie_word_embeddings

    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.random.RandomState(0).randint(3, VOCAB, (2, 16))
    ours = np.asarray(forward(params, jnp.asarray(tokens)))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    prompt = tokens[:, :6]
    with torch.no_grad():
        generated = hf.generate(torch.from_numpy(prompt), do_sample=False, max_new_tokens=10).numpy()
    ours_generated = greedy(forward, params, prompt, 10, eos=config.eos_token_id, pad=0)
    np.testing.assert_array_equal(ours_generated[:, :generated.shape[1]], generated)


@pytest.mark.parametrize("which", ["trained_here", "demo"])
def test_exported_tokenizer_encodes_like_ours(which, tmp_path, llama_tokenizer):
    vocab_file = llama_tokenizer if which == "trained_here" else ASSETS / "demo_tokenizer.model"
    ours = Tokenizer(str(vocab_file))
    random_checkpoint(tmp_path / "ckpt", our_config(vocab_size=ours.vocab_size))
    out = export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), str(vocab_file))
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    # No leading whitespace: Hugging Face's LlamaTokenizer prepends '▁' only when the text does not
    # already start with a space, unlike SentencePiece (its known behaviour, Meta's tokenizer too).
    sentences = ["The three primary colors are red, blue, and yellow.",
                 "भारत की राजधानी नई दिल्ली है।",
                 "हिंदी and English, code-mixed: मुझे chai पसंद है!",
                 "Numbers 12345 and   several   spaces,\ttabs\nand lines.",
                 "Ελληνικά και ไทย, emoji 🙂 and rare ∮ symbols."]
    for text in sentences:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        assert theirs.encode(text) == [ours.bos_id] + ids, text
        assert theirs.decode(ids) == ours.decode(ids) == text


# ----------------------------------------------------------------------------------------------
# Import: Hugging Face → ours (→ Hugging Face)
# ----------------------------------------------------------------------------------------------

IMPORT_VARIANTS = {  # HF config fields, how the weights are saved, torch dtype, --scan_layers
    "gqa_tied_sharded": (dict(num_key_value_heads=2, tie_word_embeddings=True), "sharded", torch.float32, False),
    "mha_untied_bf16_scanned": (dict(num_key_value_heads=4), "single", torch.bfloat16, True),
    "gqa_untied_pytorch_bin": (dict(num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-5), "bin",
                               torch.float32, False),
}


@pytest.mark.parametrize("variant", IMPORT_VARIANTS)
def test_hf_round_trip_is_bit_identical(variant, tmp_path, llama_tokenizer):
    fields, layout, torch_dtype, scan = IMPORT_VARIANTS[variant]
    hf = hf_model(seed=2, **fields).to(torch_dtype)
    source = tmp_path / "source"
    if layout == "bin":
        hf.config.save_pretrained(source)
        torch.save(hf.state_dict(), source / "pytorch_model.bin")
    else:
        hf.save_pretrained(source, max_shard_size="300KB" if layout == "sharded" else "1GB")
    path, preset, updates = import_hf(str(source), str(tmp_path / "ours"), scan_layers=scan)

    # The printed flags rebuild the config, and the trainer's params loader accepts the checkpoint.
    config = model.get_llama_config(preset, json.dumps(updates))
    # GQA (2 kv heads) has the demo preset's layer shapes; MHA matches no preset: EasyLM's debug plus fields.
    assert preset == ("demo" if fields["num_key_value_heads"] == 2 else "debug")
    assert "scan_layers" not in updates  # the stored layout loads into either; the preset's stays
    assert (config.num_key_value_heads, config.tie_word_embeddings, config.rope_theta, config.rms_norm_eps) == (
        fields["num_key_value_heads"], fields.get("tie_word_embeddings", False), fields.get("rope_theta", 10000.0),
        fields.get("rms_norm_eps", 1e-6))
    flax_model = model.build_model(config)
    target = jax.eval_shape(lambda: model.init_params(flax_model, jax.random.PRNGKey(0)))
    params = checkpoint.load_params(f"{path.parent}/ou*", target)  # a glob, as the seed's scripts use
    if torch_dtype == torch.float32:
        tokens = np.random.RandomState(1).randint(3, VOCAB, (2, 16))
        ours = np.asarray(forward_fn(config)(params, jnp.asarray(tokens)))
        with torch.no_grad():
            theirs = hf(torch.from_numpy(tokens)).logits.numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    dtype = "bf16" if torch_dtype == torch.bfloat16 else "fp32"
    out = export(str(path), str(tmp_path / "back"), str(llama_tokenizer), dtype=dtype)  # config from the meta
    original, exported = torch_tensors(hf), hf_tensors(out)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and np.array_equal(exported[name], tensor), name


def test_import_suggests_the_matching_preset():
    llama2_7b = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                     rms_norm_eps=1e-5, rope_scaling=None, bos_token_id=1, eos_token_id=2)
    assert suggest_flags(llama_fields_from_hf(llama2_7b)) == ("llama2_7b", {})
    assert suggest_flags(llama_fields_from_hf(dict(llama2_7b, vocab_size=32001, tie_word_embeddings=True))) == (
        "llama2_7b", {"vocab_size": 32001, "tie_word_embeddings": True})
    assert suggest_flags(llama_fields_from_hf(dict(llama2_7b, max_position_embeddings=2048, rms_norm_eps=1e-6))) == (
        "7b", {})
    # No preset has these layer shapes: 'debug' plus every field that differs from it.
    fields = llama_fields_from_hf(dict(llama2_7b, hidden_size=1024))
    name, updates = suggest_flags(fields)
    resolved = model.get_llama_config(name, json.dumps(updates))
    assert name == "debug" and all(resolved[key] == value for key, value in fields.items())


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def test_export_refuses_shapes_that_do_not_match_the_named_config(tmp_path, llama_tokenizer):
    random_checkpoint(tmp_path / "ckpt", our_config(), meta=False)
    demo_vocab = model.get_llama_config("demo").vocab_size
    with pytest.raises(ConversionError, match=rf"does not match --model_size=demo: .*embed_tokens/embedding is "
                                              rf"\(512, 128\), config wants \({demo_vocab}, 128\).*wk/kernel"):
        export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), str(llama_tokenizer), model_size="demo",
               update_llama_config='{"num_key_value_heads": 4}')
    with pytest.raises(ConversionError, match="records no llama_config"):
        export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), str(llama_tokenizer))
    assert not (tmp_path / "hf").exists()


def test_export_refuses_flags_that_disagree_with_the_meta(tmp_path, debug_checkpoint, llama_tokenizer):
    demo_vocab = model.get_llama_config("demo").vocab_size
    with pytest.raises(ConversionError, match=f"vocab_size: flags say {demo_vocab}, checkpoint meta says 512"):
        export(str(debug_checkpoint), str(tmp_path / "hf"), str(llama_tokenizer), model_size="demo")
    # The same config given both ways is fine.
    export(str(debug_checkpoint), str(tmp_path / "hf"), str(llama_tokenizer), model_size="demo",
           update_llama_config='{"vocab_size": 512}')


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, debug_checkpoint):
    with pytest.raises(ConversionError, match="4096 pieces but the model only vocab_size=512"):
        export(str(debug_checkpoint), str(tmp_path / "hf"), str(ASSETS / "demo_tokenizer.model"))


def test_import_refuses_a_directory_that_is_not_llama(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        import_hf(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ConversionError, match="'gpt2' model; supported model_type values: llama, qwen2, mistral"):
        import_hf(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_scaling": {"type": "dynamic"}}))
    with pytest.raises(ConversionError, match="rope_scaling rope_type='dynamic'"):
        import_hf(str(tmp_path), str(tmp_path / "out"))


def test_outputs_are_never_clobbered_nor_left_half_written(tmp_path, debug_checkpoint, llama_tokenizer, monkeypatch):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConversionError, match="exists and is not empty; pass --overwrite"):
        export(str(debug_checkpoint), str(out), str(llama_tokenizer))
    export(str(debug_checkpoint), str(out), str(llama_tokenizer), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()

    # Export failing midway: nothing named like the output, no staging directory left behind.
    reads = []
    real_read = to_hf._ParamsReader.read

    def failing_read(self, path):
        reads.append(path)
        if len(reads) > 15:  # by then a shard or more is on disk
            raise OSError("disk on fire")
        return real_read(self, path)

    monkeypatch.setattr(to_hf._ParamsReader, "read", failing_read)
    with pytest.raises(OSError, match="disk on fire"):
        export(str(debug_checkpoint), str(tmp_path / "hf2"), str(llama_tokenizer), dtype="fp32", max_shard_size_mb=1)
    monkeypatch.undo()

    # Import failing midway (an untied model whose head is missing from the weights): same.
    source = tmp_path / "source"
    hf = hf_model()
    hf.config.save_pretrained(source)
    state = {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    safetensors.numpy.save_file(state, source / "model.safetensors")
    with pytest.raises(ConversionError, match="no tensor 'lm_head.weight'"):
        import_hf(str(source), str(tmp_path / "ours"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "source"]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_command_lines(tmp_path, debug_checkpoint, llama_tokenizer):
    hf_dir = tmp_path / "hf"
    ok = _run("easylm_align.convert_to_hf", f"--load_checkpoint=params::{debug_checkpoint.parent}/*_10",
              f"--tokenizer_path={llama_tokenizer}", "--model_size=demo", '--update_llama_config={"vocab_size": 512}',
              f"--output_dir={hf_dir}", "--max_shard_size_mb=1")
    assert ok.returncode == 0, ok.stderr
    # The default export is the reference's (COMMIT's convert_easylm_to_hf): each tensor taken in fp32
    # and stored as torch.float16, and a float16 config.
    assert json.loads((hf_dir / "config.json").read_text())["torch_dtype"] == "float16"
    fp32 = hf_tensors(export(str(debug_checkpoint), str(tmp_path / "fp32"), str(llama_tokenizer), dtype="fp32"))
    default = hf_tensors(hf_dir)
    assert sorted(default) == sorted(fp32)
    for name, tensor in fp32.items():
        assert default[name].dtype == np.float16 and np.array_equal(default[name], tensor.astype(np.float16)), name

    back = _run("easylm_align.convert_from_hf", f"--hf_dir={hf_dir}", f"--output={tmp_path / 'ours'}",
                "--scan_layers")
    assert back.returncode == 0, back.stderr
    assert ("--load_checkpoint=params::" in back.stdout and "--load_llama_config=demo" in back.stdout
            and """--update_llama_config='{"vocab_size": 512}'""" in back.stdout)

    for module, args in (("easylm_align.convert_to_hf", [f"--load_checkpoint=params::{debug_checkpoint}",
                                                        f"--tokenizer_path={llama_tokenizer}",
                                                        f"--output_dir={hf_dir}"]),
                         ("easylm_align.convert_from_hf", [f"--hf_dir={tmp_path}", f"--output={tmp_path / 'x'}"])):
        failed = _run(module, *args)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr
        assert failed.stderr.strip().splitlines()[-1].startswith(f"{module.split('.')[-1]}: error: ")


# ----------------------------------------------------------------------------------------------
# EasyLM streaming checkpoints (what COMMIT's runs leave) → ours
# ----------------------------------------------------------------------------------------------

def easylm_key(ours: str) -> tuple[str, ...]:
    """EasyLM's name for one of our parameters: its FlaxLLaMA module tree (`transformer/wte`,
    `transformer/h/{i}/…`, norms' weight called `kernel`, `transformer/ln_f`, `lm_head`)."""
    fixed = {"embed_tokens/embedding": ("transformer", "wte", "embedding"),
             "norm/scale": ("transformer", "ln_f", "kernel"), "lm_head/kernel": ("lm_head", "kernel")}
    if ours in fixed:
        return fixed[ours]
    layer, *rest = ours.split("/")
    return ("transformer", "h", layer.removeprefix("layers_"), *rest[:-1], "kernel")


def to_interleaved(kernel: np.ndarray, head_dim: int) -> np.ndarray:
    """EasyLM's rotary layout from ours: in each head, our column j goes to 2j, j + head_dim/2 to 2j+1."""
    n_in, n_out = kernel.shape
    return kernel.reshape(n_in, n_out // head_dim, 2, head_dim // 2).transpose(0, 1, 3, 2).reshape(n_in, n_out)


def hf_converter_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What EasyLM's convert_easylm_to_hf.py does to q/k (`w.view(n_heads, dim // n_heads // 2, 2, dim)
    .transpose(1, 2).reshape(dim, dim)` on the transposed kernel), in NumPy."""
    out, dim = weight.shape
    return weight.reshape(n_heads, out // n_heads // 2, 2, dim).transpose(0, 2, 1, 3).reshape(out, dim)


def write_easylm_file(path: Path, params: dict, config, prefix: tuple[str, ...], extra=(), dtype=np.float32) -> None:
    """EasyLM's StreamingCheckpointer format: a msgpack stream of (key tuple, to_bytes(array)),
    floats cast to its `float_dtype`."""
    head_dim = config.hidden_size // config.num_attention_heads
    packer = msgpack.Packer()
    flat = {"/".join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    with open(path, "wb") as f:
        for name, value in flat.items():
            if name.endswith(("wq/kernel", "wk/kernel")):
                value = to_interleaved(value, head_dim)
                heads = value.shape[1] // head_dim
                assert np.array_equal(hf_converter_permute(value.T, heads), flat[name].T)  # the reference's inverse
            f.write(packer.pack((prefix + easylm_key(name), flax.serialization.to_bytes(value.astype(dtype)))))
        for key, value in extra:
            f.write(packer.pack((key, flax.serialization.to_bytes(value))))


EASYLM_CONFIG = dict(num_key_value_heads=4)  # EasyLM's LLaMA has no grouped-query attention


def abstract_params(config):
    return jax.eval_shape(lambda: model.init_params(model.build_model(config), jax.random.PRNGKey(0)))


@pytest.mark.parametrize("kind, scan", [("streaming_params", False), ("streaming_train_state", True)])
def test_easylm_streaming_file_loads_with_the_same_logits(kind, scan, tmp_path):
    config = our_config(**EASYLM_CONFIG)
    params = random_params(config, seed=3)
    if kind == "streaming_params":  # train_state.params['params'] itself, in EasyLM's default bf16
        write_easylm_file(tmp_path / f"{kind}_5", params, config, (), dtype=ml_dtypes.bfloat16)
        params = jax.tree_util.tree_map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    else:  # a whole train state: the weights under params/params, beside optimizer state and step
        extra = [(("opt_state", "1", "0", "count"), np.asarray(5)), (("step",), np.asarray(5))]
        write_easylm_file(tmp_path / f"{kind}_5", params, config, ("params", "params"), extra)
    target_config = our_config(**EASYLM_CONFIG, scan_layers=scan)
    loaded = checkpoint.load_params(f"{tmp_path}/*_5", abstract_params(target_config), target_config)  # a glob, as the seed's
    tokens = jnp.asarray(np.random.RandomState(4).randint(3, VOCAB, (2, 16)))
    np.testing.assert_allclose(np.asarray(forward_fn(target_config)(loaded, tokens)),
                               np.asarray(forward_fn(config)(params, tokens)), atol=1e-5, rtol=0)


def test_easylm_streaming_file_exports_to_hf(tmp_path, llama_tokenizer):
    config = our_config(**EASYLM_CONFIG)
    params = random_params(config, seed=5)
    write_easylm_file(tmp_path / "streaming_params_7", params, config, ())
    # EasyLM's file records no config: --model_size (and --update_llama_config) say it, as in COMMIT's export.
    out = export(str(tmp_path / "streaming_params_7"), str(tmp_path / "hf"), str(llama_tokenizer), model_size="demo",
                 update_llama_config=json.dumps({"vocab_size": VOCAB, **EASYLM_CONFIG}), dtype="fp32")
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.random.RandomState(6).randint(3, VOCAB, (2, 16))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward_fn(config)(params, jnp.asarray(tokens))), theirs, atol=1e-4, rtol=0)


def test_easylm_files_that_cannot_be_read_say_why(tmp_path):
    config = our_config(**EASYLM_CONFIG)
    target = abstract_params(config)
    path = tmp_path / "streaming_train_state_5"
    write_easylm_file(path, random_params(config), config, ("params", "params"))
    with pytest.raises(checkpoint.CheckpointError, match="EasyLM streaming file: its optimizer state .* params::PATH"):
        checkpoint.load_train_state(str(path), target, {})
    with pytest.raises(checkpoint.CheckpointError, match="needs the model config"):
        checkpoint.load_params(str(path), target)
    gqa = our_config()  # 2 kv heads: the model's wk has half the file's columns
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"layers_0/attention/wk/kernel: checkpoint \(128, 128\) vs model \(128, 64\)"):
        checkpoint.load_params(str(path), abstract_params(gqa), gqa)
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes((ASSETS / "demo_tokenizer.model").read_bytes())
    with pytest.raises(checkpoint.CheckpointError, match="not an EasyLM streaming checkpoint"):
        checkpoint.load_params(str(junk), target, config)


@pytest.mark.parametrize("stored_scan", [False, True])
def test_params_load_into_the_other_layer_layout_sharded(stored_scan, tmp_path):
    """params:: reads a checkpoint written with the other `scan_layers` layout (the large presets
    scan by default, older checkpoints and imports may not), placed on the target's shardings."""
    from easylm_align import sharding
    stored_config, target_config = our_config(scan_layers=stored_scan), our_config(scan_layers=not stored_scan)
    written = random_checkpoint(tmp_path / "ckpt", stored_config)
    mesh = sharding.make_mesh("1,2,4")
    abstract = jax.eval_shape(lambda r: model.init_params(model.build_model(target_config), r), jax.random.PRNGKey(0))
    target = sharding.with_shardings(abstract, sharding.param_shardings(abstract, mesh))
    loaded = checkpoint.load_params(str(tmp_path / "ckpt"), target)
    relaid = (model.stack_layers if target_config.scan_layers else model.unstack_layers)(
        written, target_config.num_hidden_layers)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(relaid)
    for got, want, spec in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(relaid),
                               jax.tree_util.tree_leaves(target)):
        np.testing.assert_array_equal(np.asarray(got), want)
        assert got.sharding == spec.sharding
    x = np.arange(12, dtype=np.int32).reshape(1, 12) % VOCAB
    np.testing.assert_allclose(forward_fn(target_config)(loaded, x), forward_fn(stored_config)(written, x),
                               rtol=1e-5, atol=1e-5)
