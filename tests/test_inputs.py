"""Inputs that must fit the run (issue 20, sections 3-4): the tokenizer a checkpoint was trained with,
the model config it records, the dictionary's direction, and every data route validating records
the same way. Each case drives the command line or the data pipeline on real files the test writes."""

import json
import logging
import shutil
import subprocess
import sys

import pytest
import sentencepiece as spm

from conftest import REPO_ROOT
from easylm_align import checkpoint, train, train_config
from easylm_align.data import pipeline
from easylm_align.records import DataError
from easylm_align.tokenizer import DEMO_TOKENIZER, Tokenizer

ALPACA = REPO_ROOT / "easylm_align" / "assets" / "alpaca_sample.json"
CORPUS = REPO_ROOT / "easylm_align" / "assets" / "demo_corpus.jsonl"
TINY_RUN = ["--total_steps=1", "--log_freq=1", "--logger.tensorboard=False",
            "--train_dataset.json_dataset.seq_length=32", "--train_dataset.json_dataset.batch_size=8"]


def run_module(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess, status: int = 2) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert result.returncode == status, result.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def train_tokenizer(path, vocab_size: int) -> str:
    """A SentencePiece model of `vocab_size` pieces trained here on the demo corpus: another tokenizer,
    with LLaMA's special ids, as a user might pick up by mistake."""
    texts = [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    with open(f"{path}.model", "wb") as model:
        spm.SentencePieceTrainer.Train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                       model_type="unigram", unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    return f"{path}.model"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One step of the demo model trained by `train.Trainer` with a copy of the demo tokenizer, and a
    foreign tokenizer of the same size."""
    root = tmp_path_factory.mktemp("trained")
    tok = root / "tokenizer.model"
    shutil.copyfile(DEMO_TOKENIZER, tok)
    cfg = train_config.default_config()
    cfg.update_from_flattened_dict({"total_steps": 1, "log_freq": 1, "logger.output_dir": str(root / "run"),
                                    "logger.tensorboard": False, "tokenizer.vocab_file": str(tok),
                                    "train_dataset.json_dataset.seq_length": 32,
                                    "train_dataset.json_dataset.batch_size": 8,
                                    "update_llama_config": json.dumps({"hidden_size": 64, "intermediate_size": 96})})
    train.Trainer(cfg).run()
    foreign = train_tokenizer(root / "foreign", Tokenizer(str(DEMO_TOKENIZER)).vocab_size)
    return dict(run=root / "run", tok=tok, foreign=foreign, ckpt=checkpoint.step_path(root / "run", 1),
                update=cfg.update_llama_config)


def test_checkpoint_records_the_tokenizer(trained):
    recorded = checkpoint.read_meta(trained["ckpt"])["tokenizer"]
    import hashlib  # the identity is the file's SHA-256, computed here independently
    assert recorded["sha256"] == hashlib.sha256(DEMO_TOKENIZER.read_bytes()).hexdigest()
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_TOKENIZER))
    assert (recorded["vocab_size"], recorded["bos_id"], recorded["eos_id"], recorded["unk_id"]) == (
        sp.GetPieceSize(), sp.bos_id(), sp.eos_id(), sp.unk_id())


def test_resume_with_another_tokenizer_of_the_same_size_is_refused(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    tok = tmp_path / "tokenizer.model"
    shutil.copyfile(trained["foreign"], tok)  # the same path as the run's flag, other contents
    config = json.loads((trained["run"] / "config.json").read_text())
    line = one_error_line(run_module(
        "easylm_align.train", *TINY_RUN, "--total_steps=2", f"--logger.output_dir={run}", f"--tokenizer.vocab_file={tok}",
        f"--update_llama_config={config['update_llama_config']}"))
    demo_sha = checkpoint.read_meta(trained["ckpt"])["tokenizer"]["sha256"]
    foreign_sha = Tokenizer(str(tok)).identity()["sha256"]
    assert "streaming_params_1 was trained with the tokenizer" in line
    assert demo_sha[:12] in line and foreign_sha[:12] in line and "4096 pieces" in line
    assert "--tokenizer.allow_mismatch=True" in line
    assert checkpoint.saved_steps(run) == [1]  # nothing was trained or saved


def test_evaluate_with_another_tokenizer_is_refused_and_reads_the_recorded_config(trained, test_data, tmp_path):
    base = ["easylm_align.evaluate", f"--load_checkpoint=params::{trained['ckpt']}",
            f"--eval.squad_file={test_data / 'xquad' / 'xquad.hi.json'}", "--eval.lang=hi",
            "--eval.max_examples=1", "--eval.max_new_tokens=2"]
    line = one_error_line(run_module(*base, f"--tokenizer.vocab_file={trained['foreign']}"))
    assert "was trained with the tokenizer" in line and "--tokenizer.vocab_file is" in line

    # A smaller tokenizer: generated ids past its pieces could not be decoded; refused before compiling.
    small = train_tokenizer(tmp_path / "small", 1000)
    line = one_error_line(run_module(*base, f"--tokenizer.vocab_file={small}", "--tokenizer.allow_mismatch=True"))
    assert "has 1000 pieces but the model has vocab_size 4096" in line

    # A preset that disagrees with the recorded config is named, field by field.
    line = one_error_line(run_module(*base, f"--tokenizer.vocab_file={DEMO_TOKENIZER}", "--load_llama_config=demo"))
    assert "hidden_size: flags 128, checkpoint 64" in line

    # Without --load_llama_config the recorded config (hidden_size 64) is used, not `demo` (128).
    result = run_module(*base, f"--tokenizer.vocab_file={DEMO_TOKENIZER}", f"--eval.output={tmp_path / 'r.json'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["aggregate"]["num_examples"] == 1


def test_convert_with_another_tokenizer_is_refused_unless_meant(trained, tmp_path):
    args = ["easylm_align.convert_to_hf", f"--load_checkpoint=params::{trained['ckpt']}",
            f"--tokenizer_path={trained['foreign']}", f"--output_dir={tmp_path / 'hf'}", "--dtype=fp32"]
    result = run_module(*args)
    assert result.returncode != 0 and not (tmp_path / "hf").exists()
    assert "was trained with the tokenizer" in result.stderr and "--allow_tokenizer_mismatch=True" in result.stderr
    result = run_module(*args, "--allow_tokenizer_mismatch")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == open(trained["foreign"], "rb").read()


def test_params_load_with_another_tokenizer_is_refused(trained, tmp_path):
    cfg = train_config.default_config()
    cfg.update_from_flattened_dict({"total_steps": 2, "logger.output_dir": str(tmp_path / "next"),
                                    "tokenizer.vocab_file": trained["foreign"], "update_llama_config": trained["update"],
                                    "load_checkpoint": f"params::{trained['ckpt']}",
                                    "train_dataset.json_dataset.seq_length": 32})
    with pytest.raises(ValueError, match="was trained with the tokenizer"):
        train.Trainer(cfg).run()


def test_a_converted_model_records_its_tokenizer_and_refuses_another(tmp_path, trained):
    import transformers

    hf_dir = tmp_path / "hf"
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    shutil.copyfile(DEMO_TOKENIZER, hf_dir / "tokenizer.model")  # the model's own tokenizer
    result = run_module("easylm_align.convert_from_hf", f"--hf_dir={hf_dir}", f"--output={tmp_path / 'ours'}")
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = checkpoint.read_meta(tmp_path / "ours")["tokenizer"]
    assert recorded["sha256"] == Tokenizer(str(DEMO_TOKENIZER)).identity()["sha256"]
    cfg = train_config.default_config()
    cfg.update_from_flattened_dict({"total_steps": 1, "logger.output_dir": str(tmp_path / "run"),
                                    "tokenizer.vocab_file": trained["foreign"], "load_llama_config": "demo",
                                    "update_llama_config": trained["update"], "load_checkpoint": f"params::{tmp_path / 'ours'}",
                                    "train_dataset.json_dataset.seq_length": 32})
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path / 'ours'} was trained with the tokenizer"):
        train.Trainer(cfg).run()


# ------------------------------------------------------------------------------------------------
# The dictionary's direction
# ------------------------------------------------------------------------------------------------

def test_a_reversed_dictionary_stops_the_run_naming_the_right_one(tmp_path):
    # COMMIT's instruction stage on English Alpaca with the Hindi-to-English MUSE file.
    result = run_module("easylm_align.train", *TINY_RUN, f"--logger.output_dir={tmp_path / 'run'}",
                        f"--train_dataset.json_dataset.path={ALPACA}", "--train_dataset.text_processor.alpaca=True",
                        "--train_dataset.text_processor.codemix_dict_path=dicts/hi-en.txt",
                        "--train_dataset.text_processor.codemix_ratio=0.9",
                        "--train_dataset.json_dataset.seq_length=512")  # the first batch holds 1,000 words
    line = one_error_line(result)
    assert "codemix_dict_path=dicts/hi-en.txt: only 0 of the first" in line
    assert "(0.0%)" in line and "dicts/en-hi.txt maps en to hi" in line
    assert checkpoint.saved_steps(tmp_path / "run") == []


def test_the_dictionary_coverage_is_printed(tmp_path, capsys):
    cfg = pipeline.default_config()
    cfg.json_dataset.update(path=str(ALPACA), seq_length=64, batch_size=8)
    cfg.text_processor.update(alpaca=True, codemix_dict_path="dicts/en-hi.txt", codemix_ratio=0.5)
    data = pipeline.DatasetIterator(cfg, Tokenizer(str(DEMO_TOKENIZER)))
    for _ in range(40):
        next(data)
    line, = [x for x in capsys.readouterr().out.splitlines() if x.startswith("codemix: ")]
    found, seen = data.stats["words_in_dict"], data.stats["words_seen"]
    assert line.endswith("are in dicts/en-hi.txt") and seen >= 1000
    assert 0.3 < int(line.split()[1]) / int(line.split()[5]) < found / seen + 0.1


# ------------------------------------------------------------------------------------------------
# Data routes
# ------------------------------------------------------------------------------------------------

BAD_RECORDS = {"missing": {"instruction": "Say hi."}, "number": {"instruction": "Count.", "output": 5},
               "list": {"instruction": "List.", "output": ["a", "b"]}}
GOOD = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


def _route(kind: str, tmp_path, records: list[dict]) -> pipeline.ConfigDict:
    cfg = pipeline.default_config("huggingface" if kind.startswith("hf") else "json")
    cfg.text_processor.alpaca = True
    directory = tmp_path / "data"
    directory.mkdir(exist_ok=True)
    path = directory / ("data.json" if kind == "json_list" else "data.jsonl")
    path.write_text(json.dumps(records) if kind == "json_list" else "".join(json.dumps(r) + "\n" for r in records))
    group = {"json_lines": dict(path=str(path)), "json_list": dict(path=str(path)),
             "hf_json_data_files": dict(path="json", data_files=str(path)), "hf_file": dict(path=str(path)),
             "hf_dir": dict(path=str(directory))}[kind]
    source = cfg.huggingface_dataset if kind.startswith("hf") else cfg.json_dataset
    source.update(seq_length=16, batch_size=1, **group)
    return cfg, path


ROUTES = ["json_lines", "json_list", "hf_json_data_files", "hf_file", "hf_dir"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("bad", sorted(BAD_RECORDS))
def test_a_bad_record_is_refused_with_its_file_and_line_on_every_route(route, bad, tmp_path):
    cfg, path = _route(route, tmp_path, [GOOD, GOOD, BAD_RECORDS[bad]])
    data = pipeline.DatasetIterator(cfg, Tokenizer(str(DEMO_TOKENIZER)))
    line = 4 if route == "json_list" else 3  # the list's third element starts on line 4 ("[" on line 1)
    with pytest.raises(DataError, match=f"^{path}:" + (r"\d+" if route == "json_list" else str(line)) + ": "):
        for _ in range(50):
            next(data)


def test_the_readme_local_route_refuses_a_bad_record_on_the_command_line(tmp_path):
    data = tmp_path / "alpaca.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps(BAD_RECORDS["number"]) + "\n")
    line = one_error_line(run_module(
        "easylm_align.train", *TINY_RUN, f"--logger.output_dir={tmp_path / 'run'}", "--train_dataset.type=huggingface",
        "--train_dataset.huggingface_dataset.path=json", f"--train_dataset.huggingface_dataset.data_files={data}",
        "--train_dataset.huggingface_dataset.seq_length=32", "--train_dataset.huggingface_dataset.batch_size=8",
        "--train_dataset.text_processor.alpaca=True"))
    assert line == (f"error: {data}:2: field 'output' must be a string, got int 5; pass "
                    "--train_dataset.huggingface_dataset.on_bad_line=skip to skip such lines")


@pytest.mark.parametrize("loader", ["json", "text"])
def test_local_files_read_as_the_datasets_library_reads_them(loader, tmp_path):
    """Parity: on valid files, the huggingface route's records are those of `datasets.load_dataset`."""
    import datasets

    if loader == "json":
        path = tmp_path / "alpaca.json"
        shutil.copyfile(ALPACA, path)
    else:
        path = tmp_path / "mono.txt"
        path.write_text("first line\nसंस्कृत दूसरी पंक्ति\n  indented third \nlast\n", encoding="utf-8")
    expected = [dict(r) for r in datasets.load_dataset(loader, data_files=str(path), split="train")]
    for group in (dict(path=loader, data_files=str(path)), dict(path=str(path)), dict(path=str(tmp_path))):
        cfg = pipeline.default_config("huggingface")
        cfg.huggingface_dataset.update(group)
        source = pipeline.SOURCES["huggingface"](cfg.huggingface_dataset, "--train_dataset.huggingface_dataset")
        got = [r.example for r in source.records(0) if r.example is not None]
        assert got == expected


def test_a_text_file_trains_one_record_per_line_on_the_json_source(tmp_path):
    path = tmp_path / "mono.txt"
    lines = [json.loads(x)["text"].replace("\n", " ") for x in CORPUS.read_text().splitlines()[:30]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = pipeline.default_config("json")
    cfg.json_dataset.update(path=str(path), seq_length=64, batch_size=2)
    tok = Tokenizer(str(DEMO_TOKENIZER))
    data = pipeline.DatasetIterator(cfg, tok)
    stream = [t for _ in range(3) for t in next(data)["input_tokens"].reshape(-1).tolist()]
    expected = [t for line in lines for t in [tok.bos_id] + tok.encode(line) + [tok.eos_id]]
    assert stream == expected[:len(stream)]


def test_flags_for_a_source_the_run_does_not_read_are_named(tmp_path, caplog):
    cfg = pipeline.default_config("json")  # a recipe's flagfile set the huggingface group's shape
    cfg.huggingface_dataset.update(path="tatsu-lab/alpaca", seq_length=1024, batch_size=16)
    with caplog.at_level(logging.WARNING):
        pipeline.DatasetIterator(cfg, Tokenizer(str(DEMO_TOKENIZER)))
    message, = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert "reads --train_dataset.json_dataset.* (seq_length=128, batch_size=8)" in message
    assert "--train_dataset.huggingface_dataset.seq_length=1024" in message
    assert "--train_dataset.huggingface_dataset.batch_size=16" in message
    assert "--train_dataset.huggingface_dataset.path=FILE" in message


def test_a_flagfile_with_a_local_file_keeps_the_recipes_shape(tmp_path):
    # A recipe's flagfile (the hub's Alpaca, the huggingface group's shape), run offline on a local copy.
    flagfile = tmp_path / "recipe.flags"
    flagfile.write_text("\n".join([
        "--total_steps=1", "--log_freq=1", "--logger.tensorboard=False", "--train_dataset.text_processor.alpaca=True",
        "--train_dataset.type=huggingface", "--train_dataset.huggingface_dataset.path=tatsu-lab/alpaca",
        "--train_dataset.huggingface_dataset.seq_length=48", "--train_dataset.huggingface_dataset.batch_size=16"]) + "\n")
    out = tmp_path / "run"
    result = run_module("easylm_align.train", f"--flagfile={flagfile}", f"--logger.output_dir={out}",
                        f"--train_dataset.huggingface_dataset.path={ALPACA}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not used" not in result.stderr
    meta = checkpoint.read_meta(checkpoint.step_path(out, 1))
    assert meta["flags"]["train_dataset"]["huggingface_dataset"]["seq_length"] == 48
    assert meta["dataset"]["epoch"] == 0 and meta["dataset"]["next_record"] > 0  # read from the local file


# ------------------------------------------------------------------------------------------------
# Smaller holes (issue 20, section 6)
# ------------------------------------------------------------------------------------------------

def test_log_freq_zero_is_one_line(tmp_path):
    line = one_error_line(run_module("easylm_align.train", *TINY_RUN, "--log_freq=0",
                                     f"--logger.output_dir={tmp_path / 'run'}"))
    assert line == "error: --log_freq=0: must be at least 1 (log every N steps)"


def test_a_sequence_beyond_max_position_embeddings_warns(tmp_path, caplog):
    cfg = train_config.default_config()
    cfg.update_from_flattened_dict({"logger.output_dir": str(tmp_path), "train_dataset.json_dataset.seq_length": 2048})
    with caplog.at_level(logging.WARNING):
        train.Trainer(cfg)
    assert any("seq_length=2048 is longer than the model's max_position_embeddings=1024" in r.getMessage()
               for r in caplog.records)


def test_a_full_file_system_at_start_names_the_file(trained, tmp_path):
    """Resuming into a directory where nothing more can be written (a file-size limit of 0 bytes, which
    fails writes as a full disk does, with EFBIG instead of ENOSPC): one line naming the first file
    the run writes, its lock, which is not left behind to block the next run."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    # The limit is set, and SIGXFSZ ignored (the write fails instead of killing), in the process that
    # then becomes the trainer (exec keeps both).
    no_writes = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                 "resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY)); "
                 "os.execv(sys.executable, [sys.executable, '-m', 'easylm_align.train', *sys.argv[1:]])")
    result = subprocess.run([sys.executable, "-c", no_writes, *TINY_RUN, "--total_steps=2",
                             f"--logger.output_dir={run}", f"--tokenizer.vocab_file={trained['tok']}",
                             f"--update_llama_config={trained['update']}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    line = one_error_line(result)
    assert line.startswith(f"error: cannot write {run / 'trainer.lock'} (File too large); free space there")
    assert checkpoint.saved_steps(run) == [1] and not (run / "trainer.lock").exists()


def test_help_describes_every_flag_the_recipes_set():
    result = run_module("easylm_align.train", "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    lines = {line.split("=", 1)[0].strip(): line for line in result.stdout.splitlines() if line.startswith("  --")}
    assert "--optimizer.adamw_optimizer.lr" in lines and "peak learning rate" in lines["--optimizer.adamw_optimizer.lr"]
    from easylm_align import config
    assert set(lines) >= {f"--{name}" for name in config.flag_names(train_config.default_config())}
    # Every flag the shipped recipes (configs/*.flags) set has a one-line description.
    used = {line.split("=", 1)[0] for path in (REPO_ROOT / "configs").glob("*.flags")
            for line in path.read_text().splitlines() if line.startswith("--")}
    undescribed = sorted(name for name in used if len(lines[name].strip().split("  ", 1)) < 2)  # "--x=v  what"
    assert used and not undescribed, undescribed
    full = run_module("easylm_align.train", "--helpfull", timeout=120)
    assert full.returncode == 0 and "--flagfile" in full.stdout and "--verbosity" in full.stdout
