"""`python -m easylm_align.tools.sweep`: dry run, an end-to-end sweep on the tiny model, resuming, bad input.

Every train/eval subprocess costs ~10-20 s of JAX start-up and compilation here, so the sweep
runs once (two values) and the other tests reuse its directory or fail before training. Input
checks run in-process (`plan.make_plan`), as the sweep does before it starts anything.
"""

import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from easylm_align.evaluation.qa import default_eval_config
from easylm_align.tools.sweep import plan

TINY = json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2})
RATIO = "train_dataset.text_processor.codemix_ratio"
TRAIN_FLAGS = ["--total_steps=2", "--train_dataset.json_dataset.seq_length=32", f"--update_llama_config={TINY}",
               "--logger.tensorboard=false",
               f"--train_dataset.text_processor.codemix_dict_path={REPO_ROOT / 'dicts/en-hi.txt'}"]


def eval_flags(test_data):
    return [f"--eval.squad_file={test_data / 'xquad/xquad.hi.json'}", "--eval.lang=hi", "--eval.prompt_lang=hi",
            "--eval.max_examples=4"]


def run_sweep(*args):
    return subprocess.run([sys.executable, "-m", "easylm_align.tools.sweep", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, env=dict(os.environ))


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def swept(tmp_path_factory, test_data):
    """One real sweep over two values: train 2 steps each, then evaluate on 4 XQuAD questions."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    args = [f"--param={RATIO}", "--values=0,1.0", f"--sweep_dir={sweep_dir}", *eval_flags(test_data),
            "--", *TRAIN_FLAGS]
    proc = run_sweep(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sweep_dir, args, proc


def test_dry_run_prints_one_train_and_one_eval_command_per_value(tmp_path, test_data):
    proc = run_sweep(f"--param={RATIO}", "--values=0,0.5,1.0", f"--sweep_dir={tmp_path / 's'}", "--dry_run",
                     *eval_flags(test_data), "--", *TRAIN_FLAGS)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    trains = [line for line in lines if "-m easylm_align.train " in line]
    evals = [line for line in lines if "-m easylm_align.evaluate " in line]
    assert len(trains) == len(evals) == 3 and not any(line.startswith("#") for line in trains + evals), proc.stdout
    for value, train, evaluation in zip(["0", "0.5", "1.0"], trains, evals):
        run_dir = tmp_path / "s" / f"codemix_ratio={value}"
        assert f"--{RATIO}={value} " in train and train.endswith(f"--logger.output_dir={run_dir}")
        # The evaluator gets the trained model's config and the run's final step.
        assert f"--load_checkpoint=params::{run_dir}/checkpoints/streaming_params_2" in evaluation
        assert "--load_llama_config=demo" in evaluation and '"hidden_size": 64' in evaluation
        assert "--eval.max_examples=4" in evaluation and f"--eval.output={run_dir}/eval_xquad_hi.json" in evaluation
    assert not (tmp_path / "s").exists()  # a dry run writes nothing


def test_sweep_writes_csv_table_and_plot(swept):
    sweep_dir, _, proc = swept
    rows = read_csv(sweep_dir / "sweep.csv")
    assert [(r["value"], r["status"]) for r in rows] == [("0", "ok"), ("1.0", "ok")], rows
    for row in rows:
        run_dir = sweep_dir / f"codemix_ratio={row['value']}"
        assert (run_dir / "checkpoints/streaming_params_2/params").is_dir()
        assert json.loads((run_dir / "config.json").read_text())["train_dataset"]["text_processor"][
            "codemix_ratio"] == float(row["value"])
        report = json.loads((run_dir / "eval_xquad_hi.json").read_text())
        assert row["final_step"] == "2" and float(row["final_loss"]) > 0
        assert row["task"] == "xquad_hi" and row["num_examples"] == "4"
        assert float(row["exact_match"]) == pytest.approx(report["aggregate"]["exact_match"])
        assert 0 <= float(row["f1"]) <= 100
    assert rows[0]["final_loss"] != rows[1]["final_loss"]  # code-mixing changed the training data

    table = (sweep_dir / "sweep.md").read_text()
    assert f"| `{RATIO}` | status | final step | final loss | EM | F1 |" in table
    assert "| 0 | ok | 2 |" in table and "| 1.0 | ok | 2 |" in table

    png = (sweep_dir / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image
    height, width, _ = matplotlib.image.imread(str(sweep_dir / "sweep.png")).shape
    assert width > height > 100


def test_rerun_neither_retrains_nor_reevaluates(swept):
    sweep_dir, args, _ = swept
    watched = [p for v in ("0", "1.0") for p in (sweep_dir / f"codemix_ratio={v}/checkpoints/streaming_params_2",
                                                 sweep_dir / f"codemix_ratio={v}/metrics.jsonl",
                                                 sweep_dir / f"codemix_ratio={v}/eval_xquad_hi.json")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    proc = run_sweep(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("trained already") == 2 and proc.stdout.count("evaluated already") == 2, proc.stdout
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert [r["status"] for r in read_csv(sweep_dir / "sweep.csv")] == ["ok", "ok"]

    # A dry run over the finished sweep shows both commands of each value commented out.
    split = args.index("--")
    proc = run_sweep(*args[:split], "--dry_run", *args[split:])
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if "-m easylm_align." in line]
    assert len(commands) == 4 and all(line.startswith("# ") for line in commands), proc.stdout


def test_failed_runs_are_reported_and_the_sweep_goes_on(tmp_path):
    proc = run_sweep("--param=train_dataset.json_dataset.path", "--values=/no/such/a.jsonl,/no/such/b.jsonl",
                     f"--sweep_dir={tmp_path}", "--", "--total_steps=2")
    assert proc.returncode == 1
    rows = read_csv(tmp_path / "sweep.csv")
    assert [r["status"] for r in rows] == ["train_failed", "train_failed"]  # the second still ran
    assert "matches no file" in rows[1]["note"]
    assert "train_dataset.json_dataset.path=/no/such/a.jsonl: train_failed" in proc.stderr
    assert (tmp_path / "sweep.md").exists() and (tmp_path / "sweep.png").exists()


def test_unknown_param_fails_with_a_clear_message(tmp_path):
    proc = run_sweep("--param=train_dataset.text_processor.codemix_rate", "--values=0,1", f"--sweep_dir={tmp_path / 's'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --param=train_dataset.text_processor.codemix_rate: the trainer has no flag "
        f"--train_dataset.text_processor.codemix_rate; did you mean --param={RATIO}?")
    assert not (tmp_path / "s").exists()


def test_bad_input_is_refused_before_anything_runs(tmp_path):
    cfg = default_eval_config()
    with pytest.raises(plan.SweepError, match="--values is empty"):
        plan.parse_values("")
    with pytest.raises(plan.SweepError, match="repeats 0.5"):
        plan.parse_values("0.5,1,0.5")
    with pytest.raises(plan.SweepError, match="--logger.output_dir must not be given"):
        plan.make_plan(RATIO, ["0"], tmp_path, cfg, ["--logger.output_dir", "elsewhere"])
    with pytest.raises(plan.SweepError, match="is the swept flag"):
        plan.make_plan("seed", ["1"], tmp_path, cfg, ["--seed=3"])
    with pytest.raises(plan.SweepError, match="same run directory"):
        plan.make_plan("train_dataset.json_dataset.path", ["a/b", "a_b"], tmp_path, cfg, [])
    # The trainer's flags are parsed here, as the trainer would: a typo or a malformed value fails now.
    with pytest.raises(plan.SweepError, match=r"unknown flag --optimizer.adamw_optimizer.lrr; "
                                              r"did you mean --optimizer.adamw_optimizer.lr\?"):
        plan.make_plan(RATIO, ["0"], tmp_path, cfg, ["--optimizer.adamw_optimizer.lrr=1e-3"])
    with pytest.raises(plan.SweepError, match="'many' is not a valid --total_steps"):
        plan.make_plan("total_steps", ["2", "many"], tmp_path, cfg, [])
    with pytest.raises(plan.SweepError, match="a group of train flags"):
        plan.make_plan("optimizer.adamw_optimizer", ["0"], tmp_path, cfg, [])
    cfg.update(squad_file=str(tmp_path / "missing.json"), lang="hi")
    with pytest.raises(plan.SweepError, match="no such file"):
        plan.make_plan(RATIO, ["0"], tmp_path, cfg, [])
    assert plan.run_dir_name("optimizer.adamw_optimizer.lr", "1e-5") == "lr=1e-5"
    assert not any(tmp_path.iterdir())


def test_each_value_gets_the_config_the_trainer_would_parse(tmp_path):
    p = plan.make_plan("optimizer.adamw_optimizer.lr", ["1e-4", "3e-4"], tmp_path / "s", default_eval_config(),
                       ["--total_steps=7", "--llama.scan_layers=true"])
    assert [c.optimizer.adamw_optimizer.lr for c in p.configs.values()] == [1e-4, 3e-4]
    assert all(c.total_steps == 7 and c.llama.scan_layers is True for c in p.configs.values())
    assert p.run_dir("3e-4") == tmp_path / "s" / "lr=3e-4" and p.task == ""


def test_sigterm_is_passed_to_the_trainer_which_saves_and_a_rerun_resumes(tmp_path):
    """A scheduler's SIGTERM to the sweep: the trainer saves (exit 75), the sweep exits 75, nothing is
    left running, and the same sweep resumes the value; then a rerun with a changed flag is refused
    and leaves the summary as it was."""
    import signal
    import time

    sweep_dir = tmp_path / "sweep"
    flags = [f for f in TRAIN_FLAGS if not f.startswith("--total_steps")] + ["--log_freq=1"]
    args = ["--param=seed", "--values=1", f"--sweep_dir={sweep_dir}", "--"]
    proc = subprocess.Popen([sys.executable, "-m", "easylm_align.tools.sweep", *args, *flags, "--total_steps=100000"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = sweep_dir / "seed=1" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)  # to the sweep alone, as a scheduler does
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stdout + stderr
    assert "interrupted: SIGTERM received; passed on to easylm_align.train, which exited with status 75" in stderr
    log = (sweep_dir / "seed=1" / "train.log").read_text()
    assert "preempted: SIGTERM received" in log
    from easylm_align import checkpoint
    steps = checkpoint.saved_steps(sweep_dir / "seed=1")
    assert len(steps) == 1
    rows = len(metrics.read_text().splitlines())
    time.sleep(2)  # no orphaned trainer goes on writing
    assert len(metrics.read_text().splitlines()) == rows

    # The same sweep (here told to stop one step later) resumes the value from the saved step.
    done = run_sweep(*args, *flags, f"--total_steps={steps[0] + 1}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumes from step {steps[0]}" in done.stdout
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()][-1] == steps[0] + 1
    summary = {name: (sweep_dir / name).read_bytes() for name in ("sweep.csv", "sweep.md", "sweep.png")}
    assert read_csv(sweep_dir / "sweep.csv")[0]["final_loss"]

    # A changed flag: refused in one line, nothing trained or rewritten.
    changed = run_sweep(*args, *flags, f"--total_steps={steps[0] + 1}", "--train_dataset.json_dataset.seq_length=48")
    assert changed.returncode == 2
    error, = [line for line in changed.stderr.splitlines() if line.startswith("error: ")]
    assert "seed=1:" in error and "was trained with other flags" in error and "seq_length" in error
    assert {name: (sweep_dir / name).read_bytes() for name in summary} == summary
