"""AFP: contrastive loss (global negatives on a sharded mesh), poolers, the pair + CLM data, the
code-mixed pair source, the log-likelihood scorer, and generate → train → ICL eval end to end."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from easylm_align import model, objectives, sharding
from easylm_align.data import pairs, pipeline
from easylm_align.codemix import CodeMixer
from easylm_align.evaluation import icl_tasks
from easylm_align.evaluation.loglik import LoglikScorer
from easylm_align.tokenizer import DEMO_TOKENIZER, Tokenizer
from easylm_align.tools import generate_afp_data

TINY = json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "max_position_embeddings": 128})


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(str(DEMO_TOKENIZER))


@pytest.fixture(scope="module")
def tiny():
    """The demo LLaMA shrunk further (vocab 4096 = the demo tokenizer's); NumPy-drawn params of a
    scale that gives visibly different states (and no slow eager init)."""
    llama = model.build_model(model.get_llama_config("demo", TINY))
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: model.init_params(llama, jax.random.PRNGKey(0)))
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(1.0 + 0.1 * rng.standard_normal(x.shape) if x.ndim == 1
                              else rng.standard_normal(x.shape) / np.sqrt(x.shape[0]), jnp.float32), shapes)
    return llama, params


def embed(llama, params, tokens, masks, poolers):
    """`sentence_embeddings` for each pooler, jitted together (one compilation)."""
    fn = jax.jit(lambda p, t, m: [objectives.sentence_embeddings(llama, p, t, m, pooler, jax.random.PRNGKey(0),
                                                                 True) for pooler in poolers])
    return [np.asarray(x) for x in fn(params, tokens, masks)]


def objectives_config(**overrides):
    cfg = objectives.default_config()
    cfg.update(overrides)
    return cfg


def afp_config(path, **group):
    cfg = pipeline.default_config("afp")
    cfg.afp_dataset.update({**dict(path=str(path), batch_size=4, seq_length=64, pair_length=16), **group})
    return cfg


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Contrastive loss


def numpy_infonce(z1, z2, temperature, z3=None, weight=0.0):
    def cos(a, b):
        return (a @ b.T) / (np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[None, :])

    logits = cos(z1, z2) / temperature
    if z3 is not None:
        logits = np.concatenate([logits, cos(z1, z3) / temperature + weight * np.eye(len(z1))], axis=1)
    top = logits.max(axis=1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return np.mean(lse - np.diag(logits)), np.mean(logits.argmax(axis=1) == np.arange(len(z1)))


def test_contrastive_loss_matches_numpy():
    rng = np.random.default_rng(0)
    z1, z2, z3 = (rng.standard_normal((16, 32)) for _ in range(3))
    z2 = z1 + 0.8 * z2  # positives resemble their anchors: accuracy strictly between 0 and 1
    for temperature in (0.05, 1.0):
        loss, acc = objectives.contrastive_loss(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32),
                                                temperature)
        ref_loss, ref_acc = numpy_infonce(z1, z2, temperature)
        assert float(loss) == pytest.approx(ref_loss, abs=1e-5)
        assert float(acc) == ref_acc
    loss, _ = objectives.contrastive_loss(*(jnp.asarray(z, jnp.float32) for z in (z1, z2)), 0.05,
                                          jnp.asarray(z3, jnp.float32), hard_negative_weight=0.7)
    assert float(loss) == pytest.approx(numpy_infonce(z1, z2, 0.05, z3, 0.7)[0], abs=1e-5)


def test_negatives_are_global_on_a_sharded_mesh(tiny):
    mesh = sharding.make_mesh("2,2,2")
    one_device = jax.devices()[:1]
    rng = np.random.default_rng(1)
    z1 = rng.standard_normal((16, 32)).astype(np.float32)
    z2 = 0.5 * z1 + rng.standard_normal((16, 32)).astype(np.float32)
    loss = jax.jit(lambda a, b: objectives.contrastive_loss(a, b, 0.05)[0])
    single = float(loss(*jax.device_put((z1, z2), one_device[0])))
    sharded_inputs = jax.device_put((z1, z2), sharding.batch_sharding(mesh))
    assert len(sharded_inputs[0].sharding.device_set) == 8
    assert float(loss(*sharded_inputs)) == pytest.approx(single, abs=1e-5)
    per_shard = np.mean([float(loss(z1[i:i + 4], z2[i:i + 4])) for i in range(0, 16, 4)])
    assert per_shard < single - 0.5  # what per-device negatives (3 instead of 15) would have given

    # The whole objective, params sharded by the partition rules, batch over (dp, fsdp).
    llama, params = tiny
    batch = {"cl_tokens": rng.integers(3, 4096, (8, 2, 16)).astype(np.int32),
             "cl_masks": (np.arange(16) < rng.integers(2, 17, (8, 2, 1))).astype(np.int32),
             "input_tokens": rng.integers(3, 4096, (8, 32)).astype(np.int32),
             "target_tokens": rng.integers(3, 4096, (8, 32)).astype(np.int32),
             "loss_masks": np.ones((8, 32), np.float32), "segment_ids": np.ones((8, 32), np.int32),
             "positions": np.tile(np.arange(32, dtype=np.int32), (8, 1))}
    cfg = objectives_config()
    afp = jax.jit(lambda p, b: objectives.afp_loss(llama, p, b, jax.random.PRNGKey(0), True, cfg)[1])
    single = afp(jax.device_put(params, one_device[0]), jax.device_put(batch, one_device[0]))
    abstract = jax.eval_shape(lambda: params)
    on_mesh = afp(jax.device_put(params, sharding.param_shardings(abstract, mesh)),
                  sharding.host_batch_to_global(batch, mesh))
    for key in ("loss", "cl_loss", "clm_loss", "cl_accuracy"):
        assert float(on_mesh[key]) == pytest.approx(float(single[key]), abs=1e-5), key
    assert float(single["loss"]) == pytest.approx(float(single["cl_loss"]) + 1.5 * float(single["clm_loss"]),
                                                  rel=1e-6)


def test_reference_ranks_give_a_data_parallel_reference_runs_gradient(tmp_path, tok, tiny):
    """`reference_ranks=2` against DDP written out in the test: rank r's loss is the global InfoNCE
    with gradient through its own rows only (the all-gather with local rows put back) plus 1.5 x the
    token mean of its own CLM rows; the ranks' gradients are averaged."""
    llama, params = tiny
    rows = [dict(sent0=f"sentence {i}", sent1=f"satz {i}", clm_text=f"Q{i}? A: answer " + "more " * i,
                 clm_prompt_len=len(f"Q{i}? A: ")) for i in range(8)]
    data = pipeline.DatasetIterator(afp_config(write_jsonl(tmp_path / "a.jsonl", rows), batch_size=8,
                                               seq_length=16, clm_groups=2), tok)
    batch = jax.tree_util.tree_map(jnp.asarray, next(data))
    cfg = objectives_config(reference_ranks=2)
    ours = jax.jit(jax.grad(lambda p: objectives.afp_loss(llama, p, batch, jax.random.PRNGKey(0), True, cfg)[0]))(params)

    def rank_loss(p, rank):
        local = (jnp.arange(8) // 4 == rank)[:, None, None]
        z = objectives.sentence_embeddings(llama, p, batch["cl_tokens"], batch["cl_masks"], "last-1",
                                           jax.random.PRNGKey(0), True)
        z = jnp.where(local, z, jax.lax.stop_gradient(z))
        cl, _ = objectives.contrastive_loss(z[:, 0], z[:, 1], 0.05)
        hidden = llama.apply({"params": p}, batch["input_tokens"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"], deterministic=True).logits
        nll = -jnp.take_along_axis(jax.nn.log_softmax(hidden.astype(jnp.float32)),
                                   batch["target_tokens"][..., None], -1)[..., 0]
        mask = batch["loss_masks"] * local[:, :, 0]
        return cl + 1.5 * (nll * mask).sum() / mask.sum()
    rank_grad = jax.jit(jax.grad(rank_loss))
    ddp = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *[rank_grad(params, r) for r in range(2)])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-6), ours, ddp)

    # With the CLM off the contrastive gradient is exactly half the global loss's; the loss is the same.
    cl_only = objectives_config(clm_weight=0.0)
    global_grad = jax.jit(jax.grad(lambda p: objectives.afp_loss(llama, p, batch, jax.random.PRNGKey(0), True,
                                                                 cl_only)[0]))
    half = jax.jit(jax.grad(lambda p: objectives.afp_loss(llama, p, batch, jax.random.PRNGKey(0), True,
                                                          objectives_config(clm_weight=0.0, reference_ranks=2))[0]))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, 0.5 * b, rtol=1e-6, atol=1e-9),
                           half(params), global_grad(params))


def test_eos_embedding_row_stays_frozen(tmp_path, tok):
    """--optimizer.freeze_eos_embedding (AFP's padding_idx = EOS): after train steps in which EOS is an
    input (it ends each packed text), its embedding row is bit-identical to the initial one, while
    the row of BOS, another input, moves."""
    from easylm_align import checkpoint, train, train_config
    rows = [dict(sent0=f"s {i}", sent1=f"t {i}", clm_text=f"Q{i}? A: yes", clm_prompt_len=len(f"Q{i}? A: "))
            for i in range(8)]
    cfg = train_config.default_config()
    cfg.update_from_flattened_dict({
        "update_llama_config": TINY, "objective": "afp", "train_dataset.type": "afp", "mesh_dim": "1,1,-1",
        "logger.output_dir": str(tmp_path / "out"), "train_dataset.afp_dataset.path": str(
            write_jsonl(tmp_path / "a.jsonl", rows)),
        "train_dataset.afp_dataset.clm_layout": "rows", "train_dataset.afp_dataset.batch_size": 4,
        "train_dataset.afp_dataset.seq_length": 32, "train_dataset.afp_dataset.pair_length": 8,
        "optimizer.freeze_eos_embedding": True, "optimizer.adamw_optimizer.weight_decay": 0.0})
    t = train.Trainer(cfg)
    params, state = t._build_state(checkpoint.TrainCheckpointer(tmp_path / "ckpt", 0, 0))
    initial = np.asarray(params["embed_tokens"]["embedding"])[[tok.eos_id, tok.bos_id]]
    step = jax.jit(t._train_step)
    for _ in range(3):
        batch = next(t.train_data)
        assert (batch["input_tokens"][batch["segment_ids"] > 0] == tok.eos_id).any()
        params, state, _ = step(params, state, batch)
    eos, bos = np.asarray(params["embed_tokens"]["embedding"])[[tok.eos_id, tok.bos_id]]
    assert eos.tobytes() == initial[0].tobytes()
    assert (bos != initial[1]).all()


# ---------------------------------------------------------------------------------------------
# Poolers


def test_poolers_pick_real_tokens():
    rng = np.random.default_rng(2)
    lengths = np.array([6, 3, 1])
    mask = (np.arange(6) < lengths[:, None]).astype(np.int32)
    states = [rng.standard_normal((3, 6, 4)).astype(np.float32) for _ in range(3)]
    noisy = [np.where(mask[..., None], h, 1e3) for h in states]  # same real tokens, huge padding
    for k in range(3):
        for name, ref in (("last", lambda h, n: h[n - 1]), ("avg", lambda h, n: h[:n].mean(0)),
                          ("max", lambda h, n: h[:n].max(0))):
            out = np.asarray(objectives.pool(noisy, jnp.asarray(mask), f"{name}-{k}"))
            np.testing.assert_allclose(out, [ref(states[k][b], n) for b, n in enumerate(lengths)], rtol=1e-6)
    first_last = objectives.pool(noisy, jnp.asarray(mask), "avg_first_last")
    np.testing.assert_allclose(first_last, objectives.pool([(states[1] + states[2]) / 2], mask, "avg-0"), rtol=1e-6)
    top2 = objectives.pool(noisy, jnp.asarray(mask), "avg_top2")
    np.testing.assert_allclose(top2, objectives.pool([(states[2] + states[1]) / 2], mask, "avg-0"), rtol=1e-6)
    for bad in ("last-3", "mean-1", "cls"):
        with pytest.raises(ValueError, match="pooler"):
            objectives.pool(states, jnp.asarray(mask), bad)


def test_padding_never_reaches_the_pooled_sentence(tiny):
    """Through the model: a right-padded sentence pools as it does alone, for every pooler kind."""
    llama, params = tiny
    ids = np.array([1, 50, 60, 70, 80], np.int32)
    padded = np.zeros((1, 1, 12), np.int32)
    padded[0, 0, :5] = ids
    padded[0, 0, 5:] = 99  # junk, not zeros
    poolers = ("last-1", "avg-1", "max-2", "avg_top2")
    alone = embed(llama, params, ids[None, None], np.ones((1, 1, 5), np.int32), poolers)
    embedded = embed(llama, params, padded, (np.arange(12) < 5)[None, None].astype(np.int32), poolers)
    for pooler, a, b in zip(poolers, alone, embedded):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=pooler)
    assert not np.allclose(alone[0], alone[1])  # the poolers differ, so each one was checked


# ---------------------------------------------------------------------------------------------
# Data: the CLM prompt, batches, resumption, bad input


@pytest.mark.parametrize("vocab", ["demo", "mistral", "llama2"])
def test_clm_loss_mask_covers_exactly_the_output(vocab, request, test_data, tok):
    if vocab == "demo":
        tokenizer = tok
    elif vocab == "mistral":  # LLaMA's format, Apache-2.0: shipped in tests/data
        tokenizer = Tokenizer(str(test_data / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model"))
    else:  # Meta's licence: only in the shared data beside the checkout
        shared = request.getfixturevalue("shared_data")
        tokenizer = Tokenizer(str(shared / "tokenizers" / "llama2" / "tokenizer.model"))
    cfg = pipeline.default_config("afp").text_processor
    processor = pairs.AfpProcessor(cfg, tokenizer, pair_length=16, clm_layout="rows")
    prompt, output = "Write a letter. Answer in English: ", "Dear Sir, thanks."
    example = {"sent0": "a b", "sent1": "c d", "clm_text": prompt + output, "clm_prompt_len": len(prompt)}
    result = processor(example, 0)
    mask = np.asarray(result.loss_mask)
    n_prompt = int((mask == 0).sum())
    assert mask[:n_prompt].sum() == 0 and mask[n_prompt:].all()  # BOS and prompt, then targets only
    assert result.tokens[0] == tokenizer.bos_id and result.tokens[-1] == tokenizer.eos_id
    assert tokenizer.decode(result.tokens[1:n_prompt]) == prompt.strip()
    assert tokenizer.decode(result.tokens[n_prompt:-1]) == output
    assert result.tokens[1:-1] == tokenizer.encode(prompt + output)  # the text is tokenized whole
    assert result.sentences == [[tokenizer.bos_id] + tokenizer.encode(s) for s in ("a b", "c d")]
    assert processor(dict(example, clm_prompt_len=0), 0).loss_mask[1:] == [1.0] * (len(result.tokens) - 1)
    only_eos = processor(dict(example, clm_prompt_len=len(prompt + output)), 0).loss_mask
    assert only_eos == [0.0] * (len(result.tokens) - 1) + [1.0]


def test_batches_pack_this_steps_clm_texts(tmp_path, tok):
    rows = [{"sent0": f"sentence {i}", "sent1": f"satz {i}", "clm_text": f"Q{i}? A: answer number {i}",
             "clm_prompt_len": len(f"Q{i}? A: ")} for i in range(10)]
    path = write_jsonl(tmp_path / "afp.jsonl", rows)
    data = pipeline.DatasetIterator(afp_config(path, clm_layout="rows"), tok)
    assert isinstance(data.batcher, pairs.PairBatcher)
    batch = next(data)
    assert {k: v.shape for k, v in batch.items()} == {
        "cl_tokens": (4, 2, 16), "cl_masks": (4, 2, 16), **{k: (4, 64) for k in (
            "input_tokens", "target_tokens", "loss_masks", "segment_ids", "positions")}}
    for b, row in enumerate(rows[:4]):
        n = batch["cl_masks"][b, 1].sum()
        assert batch["cl_tokens"][b, 1, :n].tolist() == [tok.bos_id] + tok.encode(row["sent1"])
        assert (batch["cl_tokens"][b, 1, n:] == tok.pad_id).all()
    # Four short CLM texts fill part of the first row; the rest is padding (segment 0, no loss).
    targets = batch["target_tokens"][batch["loss_masks"] > 0].tolist()
    expected = [t for r in rows[:4] for t in tok.encode(r["clm_text"][r["clm_prompt_len"]:]) + [tok.eos_id]]
    assert targets == expected
    real = batch["segment_ids"] > 0
    assert real.sum() == sum(len(tok.encode(r["clm_text"])) + 2 for r in rows[:4])  # BOS and EOS
    assert (batch["loss_masks"][~real] == 0).all() and (batch["positions"][~real] == 0).all()

    # Resuming from the saved position gives the same next batches, across the epoch boundary.
    state = json.loads(json.dumps(data.state_dict()))
    expected_next = [next(data) for _ in range(3)]
    resumed = pipeline.DatasetIterator(afp_config(path, clm_layout="rows"), tok)
    resumed.load_state_dict(state)
    for want in expected_next:
        got = next(resumed)
        assert all((got[k] == want[k]).all() for k in want)
    assert resumed.epoch == 1


def reference_clm_blocks(tok, rows, block):
    """AFP's `prepare_features` + `clm_tokens_block`, written from train.py's rule: BOS + tokens
    cut to `block`, prompt = common prefix with the prompt's tokens, texts concatenated and cut
    into blocks (remainder dropped once a block is full), BOS/EOS ids always labels, a fake last
    label in a block without any. Returns (inputs, labels with -100) per block."""
    ids, labels = [], []
    for r in rows:
        text = ([tok.bos_id] + tok.encode(r["clm_text"]))[:block]
        prompt = ([tok.bos_id] + tok.encode(r["clm_text"][:r["clm_prompt_len"]]))[:block]
        same = 0
        if r["clm_prompt_len"]:
            same = min(len(text), len(prompt))
            for j in range(same):
                if text[j] != prompt[j]:
                    same = j
                    break
        ids += text
        labels += [0] * same + [1] * (len(text) - same)
    total = len(ids) if len(ids) < block else len(ids) // block * block
    out = []
    for i in range(0, total, block):
        x = ids[i:i + block]
        y = [t if (l or t in (tok.bos_id, tok.eos_id)) else -100 for t, l in zip(x, labels[i:i + block])]
        if all(v == -100 for v in y[1:]):
            y[-1] = x[-1]
        out.append((x, y))
    return out


def check_blocks(batch, blocks, first_row, rows):
    """Our rows first_row.. hold the blocks; Hugging Face's shift: position t predicts labels[t+1]."""
    for b in range(rows):
        row = first_row + b
        if b >= len(blocks):
            assert batch["loss_masks"][row].sum() == 0 and (batch["segment_ids"][row] == 0).all()
            continue
        x, y = blocks[b]
        n = len(x)
        assert batch["input_tokens"][row, :n].tolist() == x
        assert (batch["segment_ids"][row, :n] == 1).all() and (batch["segment_ids"][row, n:] == 0).all()
        assert batch["positions"][row, :n].tolist() == list(range(n))
        want = [t != -100 for t in y[1:]] + [False] * (batch["loss_masks"].shape[1] - n + 1)
        assert (batch["loss_masks"][row] > 0).tolist() == want
        assert batch["target_tokens"][row, :n - 1][np.array(want[:n - 1])].tolist() == [t for t in y[1:] if t != -100]


def test_clm_blocks_are_afps(tmp_path, tok):
    """The default CLM layout against AFP's block grouping written in the test: later texts' BOS
    are targets, a block whose tokens are all prompt gets a fake target, the remainder is dropped."""
    words = " ".join(f"w{i}" for i in range(40))
    rows = [dict(sent0="a", sent1="b", clm_text=words, clm_prompt_len=len(words)),  # all prompt, cut to 16
            dict(sent0="c", sent1="d", clm_text="Q: one? A: two", clm_prompt_len=len("Q: one? A: ")),
            dict(sent0="e", sent1="f", clm_text="Q: three four? A: five six seven", clm_prompt_len=0),
            dict(sent0="g", sent1="h", clm_text="Q: eight nine? A: ten eleven", clm_prompt_len=len("Q: eight nine? A: "))]
    rows += [dict(r, clm_text=r["clm_text"].upper()) for r in rows]
    data = pipeline.DatasetIterator(afp_config(write_jsonl(tmp_path / "a.jsonl", rows), seq_length=16), tok)
    batch = first = next(data)
    blocks = reference_clm_blocks(tok, rows[:4], 16)
    assert len(blocks) >= 2 and all(v == -100 for v in blocks[0][1][1:-1])  # the first block's target is fake
    assert any(x[t] == tok.bos_id and y[t] != -100 for x, y in blocks for t in range(1, len(x)))  # a BOS target
    assert data.stats["clm_tokens_dropped"] > 0
    check_blocks(batch, blocks, 0, 4)

    # Two groups (a 2-rank AFP run): each half of the step is grouped alone, into its half of the rows.
    groups = pipeline.DatasetIterator(afp_config(write_jsonl(tmp_path / "b.jsonl", rows), seq_length=16,
                                                 clm_groups=2, batch_size=8), tok)
    batch = next(groups)
    for g, part in enumerate((rows[:4], rows[4:])):
        check_blocks(batch, reference_clm_blocks(tok, part, 16), 4 * g, 4)

    # separate_segments: the same blocks, each text its own segment with positions from 0, and no
    # target crosses into the next text (so no BOS is a target).
    cfg = afp_config(write_jsonl(tmp_path / "c.jsonl", rows), seq_length=16)
    cfg.separate_segments = True
    apart = next(pipeline.DatasetIterator(cfg, tok))
    assert (apart["input_tokens"] == first["input_tokens"]).all()
    bos = apart["input_tokens"] == tok.bos_id
    starts = bos & (np.arange(16) > 0)
    assert ((np.diff(apart["segment_ids"], axis=1) == 1) == starts[:, 1:]).all()
    assert (apart["positions"][bos] == 0).all()
    assert not (apart["target_tokens"][apart["loss_masks"] > 0] == tok.bos_id).any()


def test_flagfile_trains_as_afps_step_written_in_torch(tmp_path, tok):
    """configs/afp_en_zh.flags (fp32, 4 steps, lr 1e-3 so that the optimizer's details show) against
    AFP's step written out with transformers' LlamaForCausalLM on the same random model and data:
    pooler last-1 with right padding (pad = EOS, so EOS is padding_idx), InfoNCE at 0.05, AFP's CLM
    blocks, cl + 1.5 clm, clip 1.0, Hugging Face's adamw_hf, the cosine schedule with warmup."""
    import math
    import torch
    import transformers
    from easylm_align import config, train, train_config
    from easylm_align.conversion.from_hf import import_hf
    steps, lr = 4, 1e-3
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.eos_id))
    with torch.no_grad():
        for name, w in hf.named_parameters():
            w.normal_(1.0, 0.1) if name.endswith("norm.weight") else None
    hf.save_pretrained(tmp_path / "hf")
    ckpt, preset, updates = import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    cfg = config.parse_config(train_config.default_config(), [
        "train", f"--flagfile={REPO_ROOT / 'configs' / 'afp_en_zh.flags'}", f"--load_checkpoint=params::{ckpt}",
        f"--load_llama_config={preset}", f"--update_llama_config={json.dumps(updates)}",
        f"--tokenizer.vocab_file={DEMO_TOKENIZER}", f"--train_dataset.afp_dataset.path={pairs.AFP_SAMPLE}",
        "--train_dataset.shuffle_buffer=0", f"--total_steps={steps}", f"--optimizer.adamw_optimizer.lr={lr}",
        "--optimizer.adamw_optimizer.lr_warmup_steps=1", f"--optimizer.adamw_optimizer.lr_decay_steps={steps}",
        "--dtype=fp32", "--log_freq=1", "--save_model_freq=0", "--save_milestone_freq=0", "--mesh_dim=1,1,-1",
        f"--logger.output_dir={tmp_path / 'ours'}", "--logger.tensorboard=False"])
    train.Trainer(cfg).run()
    ours = [m["loss"] for m in map(json.loads, (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines())
            if "loss" in m]

    rows = [json.loads(line) for line in pairs.AFP_SAMPLE.read_text(encoding="utf-8").splitlines()]
    params = list(hf.parameters())
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    theirs = []
    for step in range(steps):
        batch = rows[2 * step:2 * step + 2]
        sents = [[tok.bos_id] + tok.encode(r[k]) for k in ("sent0", "sent1") for r in batch]
        n = max(map(len, sents))
        x = torch.tensor([s + [tok.eos_id] * (n - len(s)) for s in sents])
        mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in sents])
        h = hf.model(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        z = h[torch.arange(4), mask.sum(-1) - 1]
        sim = torch.nn.functional.cosine_similarity(z[:2, None], z[None, 2:], dim=-1) / 0.05
        cl = torch.nn.functional.cross_entropy(sim, torch.arange(2))
        blocks = reference_clm_blocks(tok, batch, 512)
        logits = hf(input_ids=torch.tensor([b[0] for b in blocks])).logits[:, :-1]
        labels = torch.tensor([b[1] for b in blocks])[:, 1:]
        clm = torch.nn.functional.cross_entropy(logits.reshape(-1, 4096), labels.reshape(-1), ignore_index=-100)
        loss = cl + 1.5 * clm
        hf.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t, rate = step + 1, lr * (step if step < 1 else 0.5 * (1 + math.cos(math.pi * (step - 1) / (steps - 1))))
        with torch.no_grad():
            for p, (m, v) in zip(params, moments):  # transformers' AdamW (adamw_hf), no weight decay
                m.mul_(0.9).add_(p.grad, alpha=0.1)
                v.mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
                p.addcdiv_(m, v.sqrt().add_(1e-8), value=-rate * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t))
        theirs.append(loss.item())
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_long_clm_text_is_cut_to_the_step(tmp_path, tok):
    long = {"sent0": "x", "sent1": "y", "clm_text": "word " * 300, "clm_prompt_len": 0}
    data = pipeline.DatasetIterator(afp_config(write_jsonl(tmp_path / "a.jsonl", [long] * 4), clm_layout="rows"), tok)
    batch, dropped = next(data), data.stats["clm_tokens_dropped"]
    assert (batch["segment_ids"] > 0).all() and dropped == 4 * (len(tok.encode(long["clm_text"])) + 2) - 4 * 64 - 1
    assert data.state_dict()["packer"]["tokens"] == []  # nothing carried into the next step


def test_tsv_pairs_and_hard_negatives(tmp_path, tok, tiny):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"hello {i}\tnihao {i}\tbye {i}\n" for i in range(4)))
    batch = next(pipeline.DatasetIterator(afp_config(tsv), tok))
    assert batch["cl_tokens"].shape == (4, 3, 16)
    n = batch["cl_masks"][2, 2].sum()
    assert batch["cl_tokens"][2, 2, :n].tolist() == [tok.bos_id] + tok.encode("bye 2")
    expected = []  # AFP's fallback CLM text "{sent0} = {sent1}", trained on sent1 and the next text's BOS
    for i in range(4):
        ids, n = pairs.split_tokens(tok, f"hello {i} = nihao {i}", len(f"hello {i} = "))
        assert tok.decode(ids[n:]) == f"nihao {i}"
        expected += ids[n:] + [tok.bos_id] * (i < 3)
    assert batch["target_tokens"][batch["loss_masks"] > 0].tolist() == expected

    llama, params = tiny  # the third column enters the loss as hard negatives
    cfg = objectives_config(hard_negative_weight=0.3)
    _, metrics = jax.jit(lambda p, b: objectives.afp_loss(llama, p, b, jax.random.PRNGKey(0), True, cfg))(
        params, batch)
    z = embed(llama, params, batch["cl_tokens"], batch["cl_masks"], ["last-1"])[0].astype(np.float64)
    ref = numpy_infonce(z[:, 0], z[:, 1], 0.05, z[:, 2], 0.3)[0]
    assert float(metrics["cl_loss"]) == pytest.approx(ref, abs=1e-4)


def test_bad_input_names_file_and_line(tmp_path, tok):
    good = {"sent0": "a", "sent1": "b", "clm_text": "p: o", "clm_prompt_len": 3}
    cases = [
        ([good, {"sent0": "a", "clm_text": "x", "clm_prompt_len": 0}], r"bad\.jsonl:2: example has no field 'sent1'"),
        ([dict(good, clm_prompt_len=9)], r"bad\.jsonl:1: clm_prompt_len=9 is longer than clm_text \(4 characters\)"),
        ([good, dict(good, clm_prompt_len="3")], r"bad\.jsonl:2: clm_prompt_len must be a non-negative integer"),
        ([good, dict(good, hard_neg="c")], r"bad\.jsonl:2: example has 'hard_neg' but the data set's first"),
        ([good, {k: v for k, v in good.items() if k != "clm_prompt_len"}], r"bad\.jsonl:2: .*'clm_prompt_len'"),
    ]
    for rows, message in cases:
        data = pipeline.DatasetIterator(afp_config(write_jsonl(tmp_path / "bad.jsonl", rows), batch_size=1), tok)
        with pytest.raises(pipeline.DataError, match=message):
            for _ in range(len(rows)):
                next(data)
    (tmp_path / "bad.tsv").write_text("a\tb\nonly one field\n")
    data = pipeline.DatasetIterator(afp_config(tmp_path / "bad.tsv", batch_size=1), tok)
    with pytest.raises(pipeline.DataError, match=r"bad\.tsv:2: expected 2 or 3 tab-separated fields"):
        next(data), next(data)
    cfg = pipeline.default_config("codemix_pairs")
    with pytest.raises(pipeline.DataError, match="codemix_dict_path"):
        pipeline.DatasetIterator(cfg, tok)
    path = write_jsonl(tmp_path / "good.jsonl", [good] * 4)
    for group, message in ((dict(clm_layout="packed"), r"afp_dataset\.clm_layout='packed': use one of"),
                           (dict(clm_groups=3), r"afp_dataset\.clm_groups=3 must be positive and divide batch_size=4"),
                           (dict(clm_groups=2, clm_layout="rows"), r"clm_groups=2 needs clm_layout='blocks'")):
        with pytest.raises(pipeline.DataError, match=message):
            pipeline.DatasetIterator(afp_config(path, **group), tok)


def test_reference_ranks_must_match_clm_groups(tmp_path):
    from easylm_align import train, train_config
    from easylm_align.errors import ConfigError
    cfg = train_config.default_config()
    cfg.update_from_flattened_dict({"objective": "afp", "train_dataset.type": "afp", "objectives.reference_ranks": 2,
                                    "logger.output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"reference_ranks=2 and --train_dataset\.afp_dataset\.clm_groups=1 must be"):
        train.Trainer(cfg)


# ---------------------------------------------------------------------------------------------
# Code-mixed pairs (an extension)


@pytest.mark.parametrize("kind", ["jsonl", "txt"])
def test_codemix_pairs_second_side_is_the_mixed_first(kind, tmp_path, tok):
    texts = ["The cat drinks water every morning.", "My friend reads a good book.",
             "We walk to the old market today.", "This house is very big and beautiful."]
    path = tmp_path / f"text.{kind}"
    if kind == "jsonl":
        write_jsonl(path, [{"body": t} for t in texts])
    else:
        path.write_text("\n".join(texts) + "\n")
    cfg = pipeline.default_config("codemix_pairs")
    cfg.codemix_pairs_dataset.update(dict(path=str(path), text_field="body", batch_size=4, seq_length=128,
                                          pair_length=64))
    cfg.text_processor.update(dict(codemix_dict_path=str(REPO_ROOT / "dicts" / "en-zh.txt"), codemix_ratio=0.6,
                                   codemix_seed=3))
    batch = next(pipeline.DatasetIterator(cfg, tok))
    mixer = CodeMixer.from_file(cfg.text_processor.codemix_dict_path, 0.6, 3)
    mixed = [mixer.mix(t, index) for index, t in enumerate(texts)]  # epoch 0: index = record number
    assert sum(m != t for m, t in zip(mixed, texts)) >= 3
    for b, (text, mix) in enumerate(zip(texts, mixed)):
        for col, want in ((0, text), (1, mix)):
            n = batch["cl_masks"][b, col].sum()
            assert batch["cl_tokens"][b, col, :n].tolist() == [tok.bos_id] + tok.encode(want)
    # The CLM side trains on all of each mixed text.
    targets = batch["target_tokens"][batch["loss_masks"] > 0].tolist()
    assert targets == [t for mix in mixed for t in tok.encode(mix) + [tok.eos_id]]


# ---------------------------------------------------------------------------------------------
# ICL scoring


def test_loglik_scorer_matches_a_direct_forward(tiny, tok):
    llama, params = tiny
    scorer = LoglikScorer(llama, tok, params, sharding.make_mesh("1,-1,1"), batch_size=8, min_bucket=16)
    context, continuation = "Is it so</s>yes it is</s>The sky is blue, right?", " Yes, it is."
    ids, n_context = scorer.encode(context, continuation)
    eos_at = [i for i, t in enumerate(ids) if t == tok.eos_id]
    assert ids[0] == tok.bos_id and len(eos_at) == 2  # the connector is the EOS id, not spelled out
    assert tok.decode(ids[n_context:]) == continuation.strip()
    logits = jax.jit(lambda p, x: llama.apply({"params": p}, x).logits)(params, jnp.asarray([ids]))[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    direct = float(sum(logp[t - 1, ids[t]] for t in range(n_context, len(ids))))
    pairs = [(context, continuation), ("Short", " one"), (context, " No, it is.")]
    scores = scorer(pairs)
    assert scores[0] == pytest.approx(direct, rel=1e-5)
    assert scores == pytest.approx(scorer(pairs[::-1])[::-1], rel=1e-6)  # order and padding do not matter


# ---------------------------------------------------------------------------------------------
# End to end


def test_generate_train_evaluate(tmp_path, test_data):
    data = tmp_path / "afp.jsonl"
    assert generate_afp_data.main(["-b", str(test_data / "instruct_x"), "-r", "0.3",
                                   "--output-file", str(data)]) == 0
    run = tmp_path / "run"
    # The shipped flagfile (--objective=afp, --train_dataset.type=afp, AFP's hyper-parameters), with
    # the tiny model, the demo tokenizer, the generated data and 8 devices' worth of batch.
    train = [sys.executable, "-m", "easylm_align.train", "--flagfile=configs/afp_en_zh.flags", "--load_checkpoint=",
             "--load_llama_config=demo", f"--tokenizer.vocab_file={DEMO_TOKENIZER}", "--dtype=fp32",
             f"--train_dataset.afp_dataset.path={data}", "--train_dataset.afp_dataset.batch_size=8",
             "--train_dataset.afp_dataset.pair_length=32", "--train_dataset.afp_dataset.seq_length=128",
             "--total_steps=3", "--log_freq=1", f"--logger.output_dir={run}", "--logger.tensorboard=false"]
    done = subprocess.run(train, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["objectives"]["pooler"] == "last-1"
    for r in rows:
        assert r["loss"] == pytest.approx(r["cl_loss"] + 1.5 * r["clm_loss"], rel=1e-5)
        assert 0 <= r["cl_accuracy"] <= 1 and r["clm_loss"] > 0

    report_path = tmp_path / "report.json"
    evaluate = [sys.executable, "-m", "easylm_align.evaluate_icl",
                f"--load_checkpoint=params::{run}/checkpoints/streaming_params_3", "--load_llama_config=demo",
                "--icl.tasks=pawsx", "--icl.prompt_langs=en", "--icl.sample_langs=en,zh", "--icl.shots=0,5",
                f"--icl.data_dir={test_data}", "--icl.limit=8", f"--icl.output={report_path}"]
    done = subprocess.run(evaluate, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pawsx_zh_s5_i0" in done.stdout and "avg_zero" in done.stdout
    report = json.loads(report_path.read_text())
    assert list(report["results"]) == ["pawsx_en_s0_i0", "pawsx_en_s5_i0", "pawsx_zh_s0_i0", "pawsx_zh_s5_i0"]
    for key, r in report["results"].items():
        assert r["n"] == 8 and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
        assert (r["task"], r["prompt_lang"], r["shots"]) == ("pawsx", "en", int(key.split("_s")[1][0]))
    assert set(report["averages"]) == {"acc", "acc_norm"}
    assert report["averages"]["acc"] == pytest.approx(icl_tasks.afp_averages(
        {k: r["acc"] for k, r in report["results"].items()}))
    assert report["config"]["limit"] == 8
