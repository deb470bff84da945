"""The C++ CPU kernels: the cross-entropy kernel against a NumPy statement of its definition, and
the fallback when no compiler is at hand (the attention kernel's parity tests are in
test_attention.py)."""

import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import skip_without_cpu_kernels
from easylm_align.model.kernels import cpu_cross_entropy, native


def numpy_cross_entropy(logits, targets, mask):
    """Per row: -log softmax[target] (NaN for a target outside the vocabulary), whether the first
    arg-max is the target, and (softmax - one-hot) * mask."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(-1)) + logits.max(-1)
    rows = np.arange(len(targets))
    valid = (targets >= 0) & (targets < logits.shape[1])
    nll = np.where(valid, lse - logits[rows, np.clip(targets, 0, logits.shape[1] - 1)], np.nan)
    correct = (valid & (logits.argmax(-1) == targets)).astype(np.float64)
    grad = np.exp(logits - lse[:, None])
    grad[rows[valid], targets[valid]] -= 1.0
    return nll, correct, grad * mask[:, None]


@pytest.mark.parametrize("vocab", [1, 15, 500, 4099])
def test_cross_entropy_kernel_equals_its_definition(vocab):
    """Vocabularies below, at and off the kernel's 16-float lanes; ties; masked rows; a bad target."""
    skip_without_cpu_kernels()
    rng = np.random.default_rng(vocab)
    logits = (rng.normal(size=(37, vocab)) * 4).astype(np.float32)
    targets = rng.integers(0, vocab, 37).astype(np.int32)
    mask = (rng.random(37) > 0.3).astype(np.float32)
    if vocab > 7:  # row 0: the maximum twice; the target is its second occurrence, which is not the arg-max
        logits[0, 3] = logits[0, 7] = logits[0].max() + 1.0
        targets[0] = 7
        logits[1, 5] = logits[1].max() + 30.0  # row 1: confidently right
        targets[1] = 5
    targets[2] = vocab  # outside the vocabulary
    nll, correct, grad = (np.asarray(x) for x in cpu_cross_entropy.loss_and_logit_grads(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)))
    ref_nll, ref_correct, ref_grad = numpy_cross_entropy(logits, targets, mask)
    assert np.isnan(nll[2]) and np.isnan(ref_nll[2])
    np.testing.assert_allclose(nll, ref_nll, atol=1e-5, rtol=1e-6)
    np.testing.assert_array_equal(correct, ref_correct)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6, rtol=0)
    if vocab > 7:
        assert correct[0] == 0 and correct[1] == 1


def test_the_kernels_build_where_a_compiler_is_found():
    """A source that no longer compiles must fail here, not only skip the parity tests."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler here ($CXX or g++)")
    assert native.unavailable() is None


def test_auto_falls_back_to_xla_ops_without_a_compiler(tmp_path):
    """In a fresh process (the kernels register once per process) with no compiler on hand."""
    script = ("import logging, jax.numpy as jnp\n"
              "from easylm_align import objectives\nfrom easylm_align.model import attention\n"
              "logging.basicConfig(level=logging.INFO)\n"
              "fp32 = attention.Options(0.0, False, jnp.float32)\n"
              "print(attention.resolve('auto', fp32, 'cpu'))\n"
              "print(objectives.resolve_loss_kernel('auto', 'cpu', 1))\n"
              "for resolve in (lambda: attention.resolve('cpu_fused', fp32, 'cpu'),\n"
              "                lambda: objectives.resolve_loss_kernel('cpu_fused', 'cpu', 1)):\n"
              "    try:\n        resolve()\n"
              "    except ValueError as error:\n        print(error)\n")
    env = {**os.environ, "CXX": "no-such-compiler", "EASYLM_ALIGN_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["chunked", "xla"]
    why = "the CPU kernels need a C++ compiler to build; 'no-such-compiler' was not found (set CXX)"
    assert lines[2] == f"attention=cpu_fused: {why}"
    assert lines[3] == f"--objectives.loss_kernel=cpu_fused: {why}"
    assert f"attention=auto picked chunked on cpu; not attention=cpu_fused: {why}" in done.stderr
    assert f"objectives.loss_kernel=auto picked xla on cpu; not cpu_fused: {why}" in done.stderr
    assert not list(tmp_path.iterdir())  # nothing half-built left in the cache


def test_a_second_process_loads_the_cached_build(tmp_path):
    script = "from easylm_align.model.kernels import native\nprint(native.unavailable())\n"
    env = {**os.environ, "EASYLM_ALIGN_CACHE": str(tmp_path)}
    built = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        if done.stdout.strip() != "None":
            pytest.skip(done.stdout.strip())
        built.append([(p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir()])
    assert len(built[0]) == 1 and built[0][0][0].startswith("cpu_kernels-") and built[0][0][0].endswith(".so")
    assert built[1] == built[0]  # loaded, not rebuilt
