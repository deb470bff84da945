"""The throughput benchmarks run end to end on the CPU and write complete, correct result lines.

Speed itself is never asserted here (it belongs in benchmarks/results and docs/PERFORMANCE.md);
these check that a run produces every documented key and that the FLOP count is the formula's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import decode_throughput  # noqa: E402
import train_throughput  # noqa: E402

# Keys that are null on the CPU: no peak FLOP/s is known for it and its runtime keeps no peak memory.
CPU_NULL = {"peak_flops_per_device", "mfu", "device_peak_memory_gib"}


def only_line(path: Path) -> dict:
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def debug_flops_per_token(seq: int) -> int:
    """The `debug` preset by hand: hidden 128, intermediate 256, 2 layers, 4 heads (= kv heads) of
    dimension 32, vocabulary 32,000; 2 FLOPs per multiply-add, backward = 2 x forward."""
    q = k = v = o = 128 * 128                # hidden x heads*head_dim (kv heads = heads)
    mlp = 128 * 256 + 128 * 256 + 256 * 128  # gate, up, down
    lm_head = 128 * 32000
    n = 2 * (q + k + v + o + mlp) + lm_head  # the embedding is a lookup, the norms elementwise
    assert n == 4_423_680
    # Per layer: q.k and weights.v, each 4 heads x 32 dims of multiply-adds per visible key, and a
    # causal query sees seq/2 keys on average.
    attention_forward = 2 * (2 * 4 * 32 * (seq // 2)) * 2  # 2 layers
    return 3 * (2 * n + attention_forward)


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """One CPU device (not the tests' eight): an 8-way sharded step on 2 cores is several times slower."""
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_benchmark_writes_a_complete_line_with_the_hand_counted_flops(tmp_path):
    out = tmp_path / "train.jsonl"
    proc = run_script("train_throughput.py", "--config=debug", "--batch=2", "--seq=32", "--steps=3", "--warmup=0",
                      "--loss_chunk_size=16", "--torch", f"--output={out}")
    assert "ours/torch" in proc.stdout
    line = only_line(out)
    assert set(line) == set(train_throughput.RESULT_KEYS)
    assert [k for k, v in line.items() if v is None] == [k for k in train_throughput.RESULT_KEYS if k in CPU_NULL]
    assert set(line["torch"]) == set(train_throughput.TORCH_KEYS)
    assert line["flops_per_token"] == debug_flops_per_token(32) == 6 * 4_423_680 + 6 * 2 * 4 * 32 * 32
    assert line["matmul_params"] == 4_423_680
    assert line["tokens_per_step"] == 64 and line["num_devices"] == 1
    assert line["tokens_per_s"] == pytest.approx(64 / line["step_seconds"])
    assert line["ours_over_torch"] == pytest.approx(line["tokens_per_s"] / line["torch"]["tokens_per_s"])
    # one round: its ratio is the fastest blocks' ratio
    assert line["ours_over_torch_paired"] == pytest.approx(line["ours_over_torch"])
    assert len(line["step_seconds_runs"]) == 1 and len(line["step_seconds_runs"][0]) == 3
    assert line["params"] == line["torch"]["params"]  # the same model on both sides
    assert line["losses"][-1] < line["losses"][0]  # the step trains (the first at learning rate 0)
    assert line["memory_analysis_gib"]["temporaries"] > 0
    assert line["flags"]["config"] == "debug" and line["versions"]["jax"] and line["host"]["load_avg"]


def test_train_benchmark_names_a_bad_flag_value_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train_throughput.main(["--config=7B", f"--output={tmp_path / 'x.jsonl'}"])
    assert "--load_llama_config='7B' is not a known config" in str(exit_info.value.code)
    assert not (tmp_path / "x.jsonl").exists()


def test_decode_benchmark_writes_a_complete_line_and_both_sides_agree(tmp_path):
    out = tmp_path / "decode.jsonl"
    decode_throughput.main(["--batch=2", "--prompt=8", "--new_tokens=4", "--steps=1", "--check_steps=4",
                            f"--output={out}"])
    line = only_line(out)
    assert set(line) == set(decode_throughput.RESULT_KEYS)
    assert [k for k, v in line.items() if v is None] == []
    assert set(line["torch"]) == set(decode_throughput.TORCH_KEYS)
    assert line["tokens_match"] and line["matching_prefix"] == line["checked_steps"] == 4
    assert line["tokens_per_s"] == pytest.approx(2 * line["decoded_steps"] / line["call_seconds"])
