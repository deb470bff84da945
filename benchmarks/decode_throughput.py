"""Batched greedy decoding tokens/s: our KV-cache decoder against transformers' `generate`.

    python benchmarks/decode_throughput.py --config=demo --batch=8 --prompt=64 --new_tokens=32 \\
        [--update_llama_config='{"hidden_size": 256, "num_hidden_layers": 4}'] [--dtype=fp32|bf16] \\
        [--steps=5] [--repeats=2] [--check_steps=8] [--torch=false] \\
        [--output=benchmarks/results/decode_throughput.jsonl]

Both sides decode the same weights: random parameters of the named LLaMA config are saved as a
params checkpoint and exported with the project's converter (`conversion.to_hf.export`, the tensor
map in `conversion.hf_mapping`), and transformers loads that directory (`LlamaForCausalLM.from_pretrained`,
SDPA attention). Prompts are `--batch` rows of `--prompt` random token ids (no padding: the
prompt length is its own bucket); each side then decodes greedily up to `--new_tokens` tokens,
stopping early only when every row has produced EOS (ours: `generation.GreedyDecoder` with
newline stops off; theirs: `generate(do_sample=False)` with the same EOS). One call = prefill +
decode of the whole batch; after one untimed call (ours: the compilation), `--steps` calls are
timed and the median counts; with `--repeats` the timed blocks interleave (ours, theirs, ...)
and the fastest block's median counts. Tokens/s = batch · decoded steps / call time.

The check: in fp32 both sides must produce the same first `--check_steps` tokens in every row
(`tokens_match`; `matching_prefix` is the shortest common prefix over the rows). In bf16 the
comparison is reported but rounding may legitimately make it diverge.

Each run appends one JSON line to `--output` with the keys in `RESULT_KEYS` (`torch` holds the
peer's figures, `TORCH_KEYS`; null where not run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's easylm_align, uninstalled

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench_env  # noqa: E402
from easylm_align import checkpoint, model, tokenizer
from easylm_align.conversion import output, to_hf
from easylm_align.evaluation import generation  # noqa: E402

RESULT_KEYS = (
    "benchmark", "flags", "date", "device_kind", "platform", "num_devices", "versions", "host", "llama_config",
    "params", "batch", "prompt_length", "new_tokens", "decoded_steps", "first_call_seconds", "call_seconds",
    "call_seconds_runs", "call_cpu_seconds", "tokens_per_s", "torch", "ours_over_torch", "tokens_match", "matching_prefix",
    "checked_steps")
TORCH_KEYS = ("device", "threads", "attn_implementation", "decoded_steps", "call_seconds", "call_seconds_runs",
              "call_cpu_seconds", "tokens_per_s")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    flag = lambda s: s.lower() in ("1", "true", "yes")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="demo", help="a model.LLAMA_PRESETS name")
    p.add_argument("--update_llama_config", default="", help="JSON object of LLaMA config fields")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="compute and cache dtype")
    p.add_argument("--steps", type=int, default=5, help="timed calls per repeat (median)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--check_steps", type=int, default=8, help="leading tokens compared with transformers")
    p.add_argument("--torch", type=flag, nargs="?", const=True, default=True, help="run transformers' generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(bench_env.RESULTS / "decode_throughput.jsonl"))
    args = p.parse_args(argv)
    if min(args.batch, args.prompt, args.new_tokens, args.steps, args.repeats) < 1 or args.check_steps < 0:
        p.error("--batch, --prompt, --new_tokens, --steps and --repeats must be >= 1, --check_steps >= 0")
    return args


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """Token ids above the special pieces (unk, bos, eos = 0..2)."""
    return np.random.default_rng(seed).integers(3, vocab, (batch, length), dtype=np.int32)


def decoded_steps(rows: list[list[int]]) -> int:
    return max(len(r) for r in rows)


class Ours:
    """generation.GreedyDecoder on freshly initialised parameters; a call decodes the whole batch."""

    def __init__(self, config, dtype: str, tok: tokenizer.Tokenizer, prompts: np.ndarray, new_tokens: int, seed: int):
        self.model = model.build_model(config, dtype)
        self.params = jax.jit(lambda rng: model.init_params(self.model, rng))(jax.random.PRNGKey(seed))
        self.decoder = generation.GreedyDecoder(self.model, tok, new_tokens, stop_at_newline=False,
                                                min_bucket=prompts.shape[1])
        self.prompts = prompts.tolist()
        self.tokens: list[list[int]] = []

    def __call__(self) -> None:
        self.tokens = self.decoder.generate(self.params, self.prompts).token_ids  # returns host data: synchronised


class Transformers:
    """transformers' LlamaForCausalLM.generate on the exported weights."""

    def __init__(self, hf_dir: Path, dtype: str, prompts: np.ndarray, new_tokens: int, tok: tokenizer.Tokenizer):
        import torch
        import transformers
        self.torch = torch
        self.device = torch.device("cuda" if jax.default_backend() == "gpu" else "cpu")
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        transformers.utils.logging.disable_progress_bar()
        self.model = transformers.LlamaForCausalLM.from_pretrained(
            hf_dir, dtype=torch_dtype, attn_implementation="sdpa").to(self.device).eval()
        self.inputs = torch.from_numpy(prompts.astype(np.int64)).to(self.device)
        self.kwargs = dict(attention_mask=torch.ones_like(self.inputs), max_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, use_cache=True)
        self.tokens: list[list[int]] = []

    def __call__(self) -> None:
        with self.torch.inference_mode():
            out = self.model.generate(self.inputs, **self.kwargs)
        new = out[:, self.inputs.shape[1]:].cpu().numpy()
        self.tokens = [list(map(int, row)) for row in new]


def export_params(params: Any, config, tok: tokenizer.Tokenizer, directory: Path, dtype: str) -> Path:
    """Our params → a params checkpoint → the project's Hugging Face export."""
    ckpt = directory / "params"
    checkpoint.save_params(ckpt, jax.device_get(params), meta={"llama_config": config.to_dict()})
    output.quiet_orbax_logs()
    return to_hf.export(str(ckpt), str(directory / "hf"), tok.vocab_file, dtype=dtype)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _timing(runs: list[tuple[list[float], list[float]]], batch: int, steps: int) -> dict[str, Any]:
    """Figures from the timed blocks' (wall, CPU) seconds per call."""
    wall = [r[0] for r in runs]
    call = bench_env.best_median(wall)
    return {"decoded_steps": steps, "call_seconds": call, "call_seconds_runs": wall,
            "call_cpu_seconds": bench_env.best_median([r[1] for r in runs]), "tokens_per_s": batch * steps / call}


def prepare(args: argparse.Namespace) -> tuple[Any, tokenizer.Tokenizer]:
    """The LLaMA config and the (demo) tokenizer; a bad flag value raises ValueError here."""
    config = model.get_llama_config(args.config, args.update_llama_config)
    tok = tokenizer.Tokenizer.from_config(tokenizer.default_config())
    tok.check_fits(config.vocab_size)
    return config, tok


def run(args: argparse.Namespace, config, tok: tokenizer.Tokenizer) -> dict[str, Any]:
    """Decodes with both sides, compares, appends the result row and returns it."""
    prompts = random_prompts(args.batch, args.prompt, config.vocab_size, args.seed)
    env = bench_env.environment()
    ours = Ours(config, args.dtype, tok, prompts, args.new_tokens, args.seed)
    start = time.perf_counter()
    ours()  # compiles
    first_call = time.perf_counter() - start
    peer = None
    if args.torch:
        with tempfile.TemporaryDirectory() as tmp:
            peer = Transformers(export_params(ours.params, config, tok, Path(tmp), args.dtype), args.dtype,
                                prompts, args.new_tokens, tok)
        peer()  # warm-up
    our_runs, peer_runs = [], []
    for _ in range(args.repeats):  # interleaved: ours, theirs, ours, theirs, ...
        our_runs.append(bench_env.time_calls(ours, args.steps, 0))
        if peer is not None:
            peer_runs.append(bench_env.time_calls(peer, args.steps, 0))
    row: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    row.update(env, benchmark="decode_throughput", flags=vars(args), llama_config=config.to_dict(),
               params=model.param_count(ours.params), batch=args.batch, prompt_length=args.prompt,
               new_tokens=args.new_tokens, first_call_seconds=round(first_call, 3),
               **_timing(our_runs, args.batch, decoded_steps(ours.tokens)))
    if peer is not None:
        row["torch"] = dict(device=str(peer.device), threads=peer.torch.get_num_threads(), attn_implementation="sdpa",
                            **_timing(peer_runs, args.batch, decoded_steps(peer.tokens)))
        row["ours_over_torch"] = row["tokens_per_s"] / row["torch"]["tokens_per_s"]
        k = min(args.check_steps, args.new_tokens)
        row["checked_steps"] = k
        row["matching_prefix"] = min(common_prefix(a[:k], b[:k]) for a, b in zip(ours.tokens, peer.tokens))
        row["tokens_match"] = row["matching_prefix"] == k
    row["host"]["load_avg_after"] = list(os.getloadavg())
    bench_env.append_result(Path(args.output), row)
    return row


def summary(row: dict[str, Any]) -> str:
    c = row["llama_config"]
    lines = [f"{c['hidden_size']}h x {c['num_hidden_layers']}L, {row['params']:,} params, batch {row['batch']}, "
             f"prompt {row['prompt_length']}, {row['decoded_steps']} steps; first call {row['first_call_seconds']} s",
             f"ours:  {row['call_seconds']:.4f} s/call, {row['tokens_per_s']:.1f} tokens/s"]
    if row["torch"] is not None:
        lines.append(f"transformers: {row['torch']['call_seconds']:.4f} s/call, {row['torch']['tokens_per_s']:.1f} "
                     f"tokens/s; ours/transformers = {row['ours_over_torch']:.3f}; first {row['checked_steps']} "
                     f"tokens match: {row['tokens_match']} (common prefix {row['matching_prefix']})")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    return bench_env.main_with(argv, parse_args, prepare, lambda args, prepared: run(args, *prepared), summary)


if __name__ == "__main__":
    main()
