"""The train loop: learning, accumulation, schedule, exact resume, the seed's command lines, bad input."""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from easylm_align import checkpoint, config, integrity, optimizer, sharding, train, train_config
from easylm_align.data import pipeline

TINY = json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "vocab_size": 4096})


def make_config(out_dir, **overrides):
    """Train config for a tiny model; overrides use dotted names: `optimizer__accumulate_gradient_steps`."""
    cfg = train_config.default_config()
    cfg.update_from_flattened_dict({
        "update_llama_config": TINY, "total_steps": 4, "log_freq": 1, "mesh_dim": "1,-1,1",
        "logger.output_dir": str(out_dir), "logger.tensorboard": False,
        "train_dataset.json_dataset.seq_length": 32, "train_dataset.json_dataset.batch_size": 8,
        **{k.replace("__", "."): v for k, v in overrides.items()}})
    return cfg


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_a_fixed_batch(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 8}) + "\n")
    cfg = make_config(tmp_path / "run", total_steps=30, train_dataset__json_dataset__path=str(data),
                      train_dataset__separate_segments=False,
                      optimizer__adamw_optimizer__lr=3e-3, optimizer__adamw_optimizer__lr_warmup_steps=2,
                      optimizer__adamw_optimizer__lr_decay_steps=30)
    train.Trainer(cfg).run()
    losses = [row["loss"] for row in read_metrics(tmp_path / "run")]
    assert losses[-1] < 0.5 * losses[0], losses


def test_lr_schedule_hits_peak_and_end():
    cfg = optimizer.default_config()
    cfg.adamw_optimizer.update(dict(init_lr=0.0, lr=1e-3, end_lr=1e-5, lr_warmup_steps=10, lr_decay_steps=50))
    schedule = optimizer.lr_schedule(cfg)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert 1e-5 < float(schedule(30)) < 1e-3
    assert float(schedule(50)) == pytest.approx(1e-5)
    assert float(schedule(80)) == pytest.approx(1e-5)
    # The optimizer reports the rate it used, counting weight updates (accumulation included).
    cfg.accumulate_gradient_steps = 2
    tx, current_lr = optimizer.build(cfg)
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    for _ in range(20):
        _, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
    assert float(current_lr(state)) == pytest.approx(1e-3)


def test_weight_decay_decays_every_parameter_unless_excluded():
    """EasyLM decays every parameter (its LLaMA config excludes nothing); an exclusion is a regular
    expression searched in the parameter's path, as EasyLM's `get_weight_decay_mask`."""
    params = {"layers": {"ffn_norm": {"scale": jnp.ones((2, 4))}, "attention": {"wq": {"kernel": jnp.ones((2, 4, 4))}}},
              "norm": {"scale": jnp.ones(4)}}
    assert all(jax.tree_util.tree_leaves(optimizer.decay_mask("")(params)))
    mask = optimizer.decay_mask("norm/scale$")(params)
    assert mask["layers"]["ffn_norm"]["scale"] is False and mask["norm"]["scale"] is False
    assert mask["layers"]["attention"]["wq"]["kernel"] is True
    with pytest.raises(ValueError, match="weight_decay_exclude='norm/\\[': not a regular expression"):
        optimizer.decay_mask("norm/[")
    # In a real update: with lr 1, decay 0.5 and a zero gradient, a decayed weight w becomes w - 0.5 w.
    cfg = optimizer.default_config()
    cfg.adamw_optimizer.update(dict(lr=1.0, init_lr=1.0, end_lr=1.0, lr_warmup_steps=0, lr_decay_steps=1,
                                    weight_decay=0.5, clip_gradient=0.0))
    for exclude, norm_after in (("", 0.5), ("norm/scale$", 1.0)):
        cfg.adamw_optimizer.weight_decay_exclude = exclude
        tx, _ = optimizer.build(cfg)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        updates, _ = tx.update(zeros, tx.init(params), params)
        after = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        assert float(after["norm"]["scale"][0]) == norm_after
        assert float(after["layers"]["attention"]["wq"]["kernel"][0, 0, 0]) == 0.5


def test_accumulating_four_batches_of_two_equals_one_batch_of_eight(tmp_path):
    # EasyLM's per-row mean (the default) makes the mean of the micro-batches' losses the big batch's
    # loss whatever each row's trained-token count: separate segments with BOS leave rows with
    # untrained targets. A large eps keeps Adam's first step linear in the gradient instead of ~lr·sign(g).
    uneven = dict(train_dataset__separate_segments=True)

    def trainer(batch_size, steps):
        cfg = make_config(tmp_path, mesh_dim="1,1,-1", train_dataset__json_dataset__batch_size=batch_size,
                          optimizer__accumulate_gradient_steps=steps, optimizer__adamw_optimizer__lr=1e-2,
                          optimizer__adamw_optimizer__lr_warmup_steps=0, optimizer__adamw_optimizer__eps=1.0,
                          **uneven)
        t = train.Trainer(cfg)
        params, state = t._build_state(checkpoint.TrainCheckpointer(tmp_path / str(steps), 0, 0))
        step = jax.jit(t._train_step, in_shardings=(t.param_sh, t.state_sh, sharding.batch_sharding(t.mesh)))
        return t, params, state, step

    data_cfg = make_config(tmp_path, **uneven)
    big = next(pipeline.DatasetIterator(data_cfg.train_dataset, train.tokenizer.Tokenizer.from_config(data_cfg.tokenizer)))
    assert not big["loss_masks"].all()
    t8, p8, s8, step8 = trainer(8, 1)
    p8, s8, _ = step8(p8, s8, big)
    t2, p2, s2, step2 = trainer(2, 4)
    for i in range(4):
        p2, s2, _ = step2(p2, s2, {k: v[2 * i:2 * i + 2] for k, v in big.items()})
    diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), p8, p2))
    assert max(diffs) < 1e-7
    moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(jnp.abs(a - b).max()), p8, t8._init_state(jax.random.PRNGKey(42))[0]))
    assert max(moved) > 1e-5  # the weights really changed


def test_resume_gives_the_metrics_of_an_uninterrupted_run(tmp_path):
    """Dropout, FCM and code-mixing on: the RNG, the data position and the mixer must all resume."""
    common = dict(update_llama_config=json.dumps({**json.loads(TINY), "resid_pdrop": 0.1, "embd_pdrop": 0.1,
                                                  "attn_pdrop": 0.1, "fcm_max_ratio": 0.2}),
                  save_model_freq=3, train_dataset__text_processor__codemix_dict_path=str(REPO_ROOT / "dicts/hi-en.txt"),
                  train_dataset__text_processor__codemix_ratio=0.5)
    train.Trainer(make_config(tmp_path / "full", total_steps=7, **common)).run()
    train.Trainer(make_config(tmp_path / "cut", total_steps=3, **common)).run()
    assert (tmp_path / "cut/checkpoints/streaming_params_3").is_dir()
    train.Trainer(make_config(tmp_path / "cut", total_steps=7, **common)).run()
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 8))
    for a, b in zip(full, cut):
        for key in ("loss", "accuracy", "gradient_norm", "learning_rate", "codemix/words_replaced"):
            assert a[key] == b[key], (a["step"], key)
    # save_model_freq keeps only the latest; the final step is always saved.
    assert sorted(p.name for p in (tmp_path / "cut/checkpoints").iterdir()) == ["streaming_params_7"]


def test_milestones_are_kept_and_params_load(tmp_path):
    train.Trainer(make_config(tmp_path / "run", total_steps=4, save_model_freq=1, save_milestone_freq=2,
                              eval_steps=2, log_freq=2, eval_dataset__json_dataset__seq_length=32,
                              eval_dataset__json_dataset__batch_size=8)).run()
    kept = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert kept == ["streaming_params_2", "streaming_params_4"]
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [2, 4] and all(math.isfinite(r["eval_loss"]) for r in rows)
    # params:: accepts the seed's glob form and starts a new run from those weights.
    cfg = make_config(tmp_path / "next", total_steps=1,
                      load_checkpoint=f"params::{tmp_path}/run/*/streaming_params_2")
    train.Trainer(cfg).run()
    # trainstate:: continues a run in either layer layout (an unscanned run here): weights and
    # optimizer moments are relaid, so the step is the same, up to the layouts' rounding.
    for scan in (False, True):
        cfg = make_config(tmp_path / f"next_{scan}", total_steps=5, llama__scan_layers=scan,
                          load_checkpoint=f"trainstate::{tmp_path}/run/checkpoints/streaming_params_4")
        train.Trainer(cfg).run()
    same_layout, other_layout = read_metrics(tmp_path / "next_False"), read_metrics(tmp_path / "next_True")
    assert [r["step"] for r in same_layout] == [r["step"] for r in other_layout] == [5]
    for key in ("loss", "gradient_norm"):
        np.testing.assert_allclose(other_layout[0][key], same_layout[0][key], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# The seed's command lines, as users type them (module name aside)
# ------------------------------------------------------------------------------------------------

SEED_COMMON = """--mesh_dim=1,1,-1 --load_llama_config=debug --total_steps={steps} --logger.output_dir={out}
--save_milestone_freq={steps} --tokenizer.vocab_file={tok} --tokenizer.add_bos_token=True
--tokenizer.add_eos_token=True --optimizer.type=adamw --optimizer.accumulate_gradient_steps=1
--optimizer.adamw_optimizer.weight_decay=0.0 --optimizer.adamw_optimizer.lr=2e-5
--optimizer.adamw_optimizer.b1=0.9 --optimizer.adamw_optimizer.b2=0.999
--optimizer.adamw_optimizer.end_lr=1e-7 --optimizer.adamw_optimizer.lr_warmup_steps={warmup}
--optimizer.adamw_optimizer.lr_decay_steps={steps} --optimizer.adamw_optimizer.bf16_momentum=True"""

SEED_ALIGN = """--train_dataset.text_processor.fields=text
--train_dataset.text_processor.codemix_dict_path=dicts/hi-en.txt
--train_dataset.text_processor.codemix_ratio=0.5 --train_dataset.type=huggingface
--train_dataset.huggingface_dataset.path=json --train_dataset.huggingface_dataset.data_files={data}
--train_dataset.huggingface_dataset.seq_length=64 --train_dataset.huggingface_dataset.batch_size=16"""

SEED_COMMIT = """--train_dataset.text_processor.alpaca=True
--train_dataset.text_processor.codemix_dict_path=dicts/en-hi.txt
--train_dataset.text_processor.codemix_ratio=0.9
--train_dataset.text_processor.block_codemix_in_template=True --train_dataset.type=huggingface
--train_dataset.huggingface_dataset.path=json --train_dataset.huggingface_dataset.data_files={data}
--train_dataset.huggingface_dataset.seq_length=64 --train_dataset.huggingface_dataset.batch_size=16"""

SEED_MODEL = ["--update_llama_config={\"resid_pdrop\": 0.05, \"embd_pdrop\": 0.05, \"attn_pdrop\": 0.05, "
              "\"fcm_max_ratio\": 0.1}", "--log_freq=5000"]


def run_train(args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, "-m", "easylm_align.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("stage", ["align", "commit"])
def test_seed_commands_run(tmp_path, test_data, stage):
    # EasyLM's `debug` model with a LLaMA-format tokenizer (32,000 pieces), as users smoke-test the seed.
    tok = test_data / "tokenizers/mistral-7b-v0.1/tokenizer.model"
    if stage == "align":
        data = tmp_path / "wiki.jsonl"
        lines = (test_data / "mono/hi.ud_pud.txt").read_text(encoding="utf-8").splitlines()
        data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines))
    else:
        data = test_data / "instruct_x/en.json"  # Alpaca records (with an extra `id` field)
    out = tmp_path / "out"
    args = (SEED_COMMON + "\n" + (SEED_ALIGN if stage == "align" else SEED_COMMIT)).format(
        steps=3, out=out, tok=tok, warmup=1, data=data).split() + SEED_MODEL
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoints/streaming_params_3/params").is_dir()
    meta = checkpoint.read_meta(out / "checkpoints/streaming_params_3")
    assert meta["llama_config"]["fcm_max_ratio"] == 0.1
    assert meta["flags"]["train_dataset"]["text_processor"]["codemix_ratio"] in (0.5, 0.9)
    row = read_metrics(out)[-1]
    assert row["step"] == 3 and row["codemix/words_replaced"] > 0 and math.isfinite(row["loss"])


def test_unknown_flag_is_named_with_a_suggestion():
    result = run_train(["--optimizer.adamw_optimizer.lrr=1e-3"])
    assert result.returncode == 2
    assert "--optimizer.adamw_optimizer.lrr" in result.stderr
    assert "did you mean --optimizer.adamw_optimizer.lr?" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing saved is lost
# ------------------------------------------------------------------------------------------------

def expect_error(cfg, *fragments, exc=ValueError):
    with pytest.raises(exc) as info:
        train.Trainer(cfg).run()
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_bad_inputs(tmp_path):
    expect_error(make_config(tmp_path, tokenizer__vocab_file=str(tmp_path / "nope.model")),
                 "--tokenizer.vocab_file", "no such file")
    (tmp_path / "junk.model").write_text("not a model")
    expect_error(make_config(tmp_path, tokenizer__vocab_file=str(tmp_path / "junk.model")), "SentencePiece")
    expect_error(make_config(tmp_path, train_dataset__json_dataset__path=str(tmp_path / "*.jsonl")),
                 "--train_dataset.json_dataset.path", "matches no file")
    expect_error(make_config(tmp_path, train_dataset__json_dataset__batch_size=4),
                 "--train_dataset.json_dataset.batch_size=4", "dp*fsdp=8")
    expect_error(make_config(tmp_path, mesh_dim="2,2,3"), "--mesh_dim", "8 devices")
    expect_error(make_config(tmp_path, load_llama_config="7c"), "--load_llama_config", "7b")
    expect_error(make_config(tmp_path, update_llama_config='{"hiden_size": 3}'), "hiden_size", "hidden_size")


def test_bad_json_line_stops_or_is_skipped(tmp_path):
    data = tmp_path / "d.jsonl"
    good = json.dumps({"text": "hello world " * 20})
    data.write_text("\n".join([good, good, "{not json", good] * 10) + "\n")
    expect_error(make_config(tmp_path / "a", train_dataset__json_dataset__path=str(data)),
                 f"{data}:3", "invalid JSON", "on_bad_line=skip")
    train.Trainer(make_config(tmp_path / "b", total_steps=2, train_dataset__json_dataset__path=str(data),
                              train_dataset__json_dataset__on_bad_line="skip")).run()
    assert read_metrics(tmp_path / "b")[-1]["data/skipped_lines"] >= 1


def test_missing_field_names_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a " * 50}) + "\n" + json.dumps({"body": "b"}) + "\n")
    expect_error(make_config(tmp_path, train_dataset__json_dataset__path=str(data)), f"{data}:2", "'text'")


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    train.Trainer(make_config(tmp_path / "run", total_steps=1)).run()
    cfg = make_config(tmp_path / "other", load_checkpoint=f"params::{tmp_path}/run/checkpoints/streaming_params_1",
                      update_llama_config=TINY.replace('"hidden_size": 64', '"hidden_size": 32'))
    expect_error(cfg, "does not match the model config", "shape mismatch")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # Warmup from 0: step 1 changes nothing, steps 2-3 push the weights to overflow.
    cfg = make_config(tmp_path, total_steps=12, save_model_freq=2, optimizer__adamw_optimizer__lr=1e30,
                      optimizer__adamw_optimizer__lr_warmup_steps=4, optimizer__adamw_optimizer__clip_gradient=0.0,
                      optimizer__adamw_optimizer__weight_decay=0.0)
    with pytest.raises(train.TrainingDiverged) as info:
        train.Trainer(cfg).run()
    message = str(info.value)
    assert "non-finite loss" in message and "at step" in message
    saved = sorted((tmp_path / "checkpoints").iterdir())
    assert saved and "last good checkpoint" in message and saved[-1].name in message
    integrity.verify(saved[-1])  # "good" is verified: its checksums are recorded and match
    meta = checkpoint.read_meta(saved[-1])
    assert meta["step"] < int(message.split("at step ")[1].split(";")[0])
    rows = read_metrics(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize("flagfile", sorted((REPO_ROOT / "configs").glob("*.flags")), ids=lambda p: p.name)
def test_config_files_name_only_real_flags(flagfile):
    cfg = config.parse_config(train_config.default_config(), ["train", f"--flagfile={flagfile}"])
    assert cfg.to_dict() != train_config.default_config().to_dict()


def test_dry_run_reports_memory_without_data_or_allocation(tmp_path):
    cfg = make_config(tmp_path / "out", dry_run=True, mesh_dim="1,2,4",
                      train_dataset__json_dataset__path=str(tmp_path / "absent.jsonl"))  # never opened
    report = train.Trainer(cfg).dry_run()
    memory = report["memory_gib_per_device"]
    assert set(memory) == {"arguments", "outputs", "temporaries", "aliased", "total"}
    assert memory["total"] == pytest.approx(memory["arguments"] + memory["outputs"] - memory["aliased"]
                                            + memory["temporaries"], abs=0.01)
    assert memory["arguments"] > 0 and report["compile_seconds"] > 0 and report["devices"] == 8
    assert report["mesh"] == {"dp": 1, "fsdp": 2, "mp": 4}
    assert not (tmp_path / "out").exists()
