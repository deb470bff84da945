"""Train-step throughput, MFU and memory of easylm-align, against Hugging Face + PyTorch.

    python benchmarks/train_throughput.py --config=debug --batch=8 --seq=512 --mesh=1,-1,1 \\
        --attention=auto --steps=10 [--dtype=fp32|bf16] [--param_dtype=fp32] \\
        [--update_llama_config='{"hidden_size": 512, "num_hidden_layers": 8}'] \\
        [--remat_policy=nothing_saveable] [--scan_layers=true] [--loss_chunk_size=256] [--loss_kernel=auto] \\
        [--torch] [--repeats=2] [--memory_only] [--output=benchmarks/results/train_throughput.jsonl]

What runs is the trainer's own step: a `Trainer` is built from these flags with `dry_run=True`
(so no data is opened), its jitted train step (loss, gradients, clipping, AdamW, donation) is
compiled for abstract arrays, and the compiled executable then runs on fresh parameters and a
synthetic batch (random tokens, one segment per row, every position in the loss). Compile time
is that compilation; `--warmup` executions follow untimed; then `--steps` steps are timed one by
one, each waiting for its outputs (`jax.block_until_ready`), and the median is reported.
With `--repeats=R` the timed block runs R times, interleaved with the PyTorch peer (ours,
torch, ours, torch, ...), and the fastest block's median counts for each: on a shared machine
the least disturbed run is the truest. `--memory_only` stops after compiling.

Throughput = batch · seq / step time; per device, divided by the device count. MFU = tokens/s ·
FLOPs per token / (devices · peak FLOP/s), only where the peak is known (`logger.PEAK_FLOPS`,
or `--peak_flops`); FLOPs per token = 6·N + 6·L·H·d·T (`model.flops_per_token`): N weights
each token multiplies (q/k/v/o, MLP, LM head), 2 FLOPs per multiply-add, forward + backward
= 3 × forward; the causal attention's q·kᵀ and weights·v over T/2 visible keys on average.
Memory: XLA's `memory_analysis()` of the compiled step (per device, everywhere) and the
device's own peak `memory_stats()` where the platform keeps one (GPU, TPU; not the CPU), and
this process's peak RSS measured before the peer runs.

`--torch` also trains `transformers.LlamaForCausalLM` built from the same LLaMA config
(`attn_implementation="sdpa"`) with `torch.optim.AdamW` (same betas, eps, learning rate, weight
decay off on the norms), gradient clipping at the same norm, bf16 autocast when `--dtype=bf16`,
on the matching device (CUDA for a GPU, else the CPU), same batch and sequence, same timing.

Each run appends one JSON line to `--output` with the keys in `RESULT_KEYS` (null where not
measured); `torch` holds the peer's figures (`TORCH_KEYS`) and `ours_over_torch` the ratio of
tokens/s, both from this one run (each side's fastest block). `ours_over_torch_paired` is the
median, over the interleaved rounds, of each round's ratio (the peer's block median over ours):
on a host whose speed drifts during a run, the rounds compare blocks that ran minutes apart, not
each side's luckiest block, so this is the figure to quote.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's easylm_align, uninstalled

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench_env  # noqa: E402
from easylm_align import logger, model, sharding, train
from easylm_align.conversion import families
from easylm_align.model import memory  # noqa: E402

RESULT_KEYS = (
    "benchmark", "flags", "date", "device_kind", "platform", "num_devices", "versions", "host",
    "llama_config", "params", "attention_backend", "loss_kernel", "tokens_per_step", "matmul_params",
    "flops_per_token", "flop_formula", "compile_seconds", "step_seconds", "step_seconds_runs", "step_cpu_seconds",
    "step_cpu_seconds_runs", "tokens_per_s", "tokens_per_s_per_device", "peak_flops_per_device", "mfu",
    "memory_analysis_gib", "device_peak_memory_gib", "host_peak_rss_gib", "losses", "torch", "ours_over_torch",
    "ours_over_torch_cpu_time", "ours_over_torch_paired")
TORCH_KEYS = ("device", "threads", "autocast", "attn_implementation", "params", "step_seconds",
              "step_seconds_runs", "step_cpu_seconds", "step_cpu_seconds_runs", "tokens_per_s", "tokens_per_s_per_device", "device_peak_memory_gib", "losses")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    flag = lambda s: s.lower() in ("1", "true", "yes")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="debug", help="a model.LLAMA_PRESETS name")
    p.add_argument("--update_llama_config", default="", help="JSON object of LLaMA config fields")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--mesh", default="1,-1,1", help="dp,fsdp,mp")
    p.add_argument("--attention", default="auto", help="LLaMA config field attention")
    p.add_argument("--remat_policy", default=None, help="LLaMA remat_policy (default: the preset's)")
    p.add_argument("--scan_layers", type=flag, default=None, help="LLaMA scan_layers (default: the preset's)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="compute dtype")
    p.add_argument("--param_dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--loss_chunk_size", type=int, default=None, help="objectives.loss_chunk_size (default: the trainer's)")
    p.add_argument("--loss_kernel", default=None, help="objectives.loss_kernel (default: the trainer's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed executions after compiling")
    p.add_argument("--repeats", type=int, default=1, help="timed blocks, interleaved with the peer")
    p.add_argument("--torch", type=flag, nargs="?", const=True, default=False, help="also run the PyTorch peer")
    p.add_argument("--memory_only", type=flag, nargs="?", const=True, default=False, help="compile only")
    p.add_argument("--peak_flops", type=float, default=0.0, help="peak FLOP/s per device (default: logger.PEAK_FLOPS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(bench_env.RESULTS / "train_throughput.jsonl"))
    args = p.parse_args(argv)
    if min(args.batch, args.seq, args.steps, args.repeats) < 1 or args.warmup < 0:
        p.error("--batch, --seq, --steps and --repeats must be >= 1, --warmup >= 0")
    return args


def trainer_config(args: argparse.Namespace):
    """The trainer's ConfigDict for these flags, in dry-run mode (no data is opened)."""
    cfg = train.default_config()
    cfg.update(dict(load_llama_config=args.config, update_llama_config=args.update_llama_config, mesh_dim=args.mesh,
                    dtype=args.dtype, param_dtype=args.param_dtype, dry_run=True, seed=args.seed))
    cfg.train_dataset.json_dataset.update(dict(batch_size=args.batch, seq_length=args.seq))
    cfg.llama.attention = args.attention
    if args.remat_policy is not None:
        cfg.llama.remat_policy = args.remat_policy
    if args.scan_layers is not None:
        cfg.llama.scan_layers = args.scan_layers
    if args.loss_chunk_size is not None:
        cfg.objectives.loss_chunk_size = args.loss_chunk_size
    if args.loss_kernel is not None:
        cfg.objectives.loss_kernel = args.loss_kernel
    return cfg


def synthetic_tokens(batch: int, seq: int, vocab: int, seed: int) -> np.ndarray:
    """(batch, seq + 1) random token ids: inputs are [:, :-1], targets [:, 1:]."""
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1), dtype=np.int32)


def synthetic_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
    batch, seq = tokens.shape[0], tokens.shape[1] - 1
    rows = (batch, seq)
    return {"input_tokens": tokens[:, :-1], "target_tokens": tokens[:, 1:],
            "segment_ids": np.ones(rows, np.int32), "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), rows),
            "loss_masks": np.ones(rows, np.float32)}


def device_peak_memory_gib() -> Optional[float]:
    """The largest per-device peak the runtime recorded; None where it keeps none (the CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    return round(max(peaks) / (1 << 30), 3) if all(p is not None for p in peaks) else None


class OurStep:
    """The trainer's compiled step on fresh state; each call runs one step and waits for it."""

    def __init__(self, trainer: train.Trainer, tokens: np.ndarray):
        self.compiled, _, self.compile_seconds = trainer.compile_train_step()
        self.memory = memory.compiled_memory_gib(self.compiled)
        self.params, self.state = trainer.initial_state()
        self.batch = sharding.host_batch_to_global(synthetic_batch(tokens), trainer.mesh)
        self.losses: list[float] = []

    def __call__(self) -> None:
        self.params, self.state, metrics = self.compiled(self.params, self.state, self.batch)
        jax.block_until_ready((self.params, self.state, metrics))
        self.losses.append(float(metrics["loss"]))


class TorchStep:
    """The Hugging Face + PyTorch peer: LlamaForCausalLM (SDPA) and AdamW on the same shapes."""

    def __init__(self, llama_config, cfg, tokens: np.ndarray, dtype: str):
        import torch
        import transformers
        self.torch = torch
        self.device = torch.device("cuda" if jax.default_backend() == "gpu" else "cpu")
        hf = families.hf_config(llama_config, "fp32", pad_token_id=0)
        hf.pop("architectures"), hf.pop("model_type"), hf.pop("torch_dtype")
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**hf, attn_implementation="sdpa")
        self.model = transformers.LlamaForCausalLM(config).to(self.device).train()
        self.params = sum(p.numel() for p in self.model.parameters())
        opt = cfg.optimizer.adamw_optimizer
        spared = lambda name: opt.weight_decay_exclude and name.endswith("norm.weight")  # norm/scale$ in ours
        decay = [p for n, p in self.model.named_parameters() if not spared(n)]
        no_decay = [p for n, p in self.model.named_parameters() if spared(n)]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps)
        self.clip = opt.clip_gradient
        self.autocast = torch.bfloat16 if dtype == "bf16" else None
        self.inputs = torch.from_numpy(tokens[:, :-1].astype(np.int64)).to(self.device)
        self.losses: list[float] = []

    def __call__(self) -> None:
        torch = self.torch
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            loss = self.model(input_ids=self.inputs, labels=self.inputs).loss  # shifts the labels itself
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(float(loss.detach()))  # waits for the device

    def peak_memory_gib(self) -> Optional[float]:
        if self.device.type != "cuda":
            return None
        return round(self.torch.cuda.max_memory_allocated() / (1 << 30), 3)


def flop_formula(llama_config, seq: int) -> str:
    c = llama_config
    n, flops = model.matmul_param_count(c), model.flops_per_token(c, seq)
    return (f"6*N + 6*L*H*d*T, N = L*(hidden*d*2*(H+KV) + 3*hidden*intermediate) + hidden*vocab = "
            f"{c.num_hidden_layers}*({c.hidden_size}*{model.head_dim(c)}*2*({c.num_attention_heads}+"
            f"{c.num_key_value_heads}) + 3*{c.hidden_size}*{c.intermediate_size}) + {c.hidden_size}*{c.vocab_size}"
            f" = {n}; L={c.num_hidden_layers} H={c.num_attention_heads} d={model.head_dim(c)} T={seq}"
            f" -> {flops:.6g} FLOPs per token")


def _throughput(runs: list[tuple[list[float], list[float]]], tokens: int) -> dict[str, Any]:
    """Figures from the timed blocks' (wall, CPU) seconds per step."""
    wall, cpu = [r[0] for r in runs], [r[1] for r in runs]
    step = bench_env.best_median(wall)
    return {"step_seconds": step, "step_seconds_runs": wall, "step_cpu_seconds": bench_env.best_median(cpu),
            "step_cpu_seconds_runs": cpu, "tokens_per_s": tokens / step,
            "tokens_per_s_per_device": tokens / step / jax.device_count()}


def run(args: argparse.Namespace, trainer: train.Trainer) -> dict[str, Any]:
    """Compiles and (unless --memory_only) times; returns the result row it appended."""
    cfg, llama = trainer.cfg, trainer.llama_config
    tokens = synthetic_tokens(args.batch, args.seq, llama.vocab_size, args.seed)
    tokens_per_step = args.batch * args.seq
    env = bench_env.environment()
    ours = OurStep(trainer, tokens)
    row: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    flops = model.flops_per_token(llama, args.seq)
    peak = logger.peak_flops_per_device(args.peak_flops)
    row.update(env, benchmark="train_throughput", flags=vars(args), llama_config=llama.to_dict(),
               params=model.param_count(ours.params), attention_backend=trainer.attention_backend,
               loss_kernel=trainer.loss_kernel,
               tokens_per_step=tokens_per_step, matmul_params=model.matmul_param_count(llama),
               flops_per_token=flops, flop_formula=flop_formula(llama, args.seq),
               compile_seconds=round(ours.compile_seconds, 3), peak_flops_per_device=peak,
               memory_analysis_gib=ours.memory)
    if not args.memory_only:
        peer = TorchStep(llama, cfg, tokens, args.dtype) if args.torch else None
        our_runs, peer_runs = [], []
        for repeat in range(args.repeats):  # interleaved: ours, torch, ours, torch, ...
            our_runs.append(bench_env.time_calls(ours, args.steps, args.warmup if repeat == 0 else 0))
            if repeat == 0:
                row["host_peak_rss_gib"] = bench_env.host_peak_rss_gib()
            if peer is not None:
                peer_runs.append(bench_env.time_calls(peer, args.steps, args.warmup if repeat == 0 else 0))
        row.update(_throughput(our_runs, tokens_per_step), losses=ours.losses,
                   device_peak_memory_gib=device_peak_memory_gib())
        row["mfu"] = row["tokens_per_s"] * flops / (jax.device_count() * peak) if peak else None
        if peer is not None:
            row["torch"] = dict(device=str(peer.device), threads=peer.torch.get_num_threads(),
                                autocast=str(peer.autocast) if peer.autocast else None,
                                attn_implementation="sdpa", params=peer.params, losses=peer.losses,
                                device_peak_memory_gib=peer.peak_memory_gib(),
                                **_throughput(peer_runs, tokens_per_step))
            row["ours_over_torch"] = row["tokens_per_s"] / row["torch"]["tokens_per_s"]
            row["ours_over_torch_cpu_time"] = row["torch"]["step_cpu_seconds"] / row["step_cpu_seconds"]
            row["ours_over_torch_paired"] = statistics.median(
                statistics.median(theirs) / statistics.median(mine)
                for mine, theirs in zip(row["step_seconds_runs"], row["torch"]["step_seconds_runs"]))
    row["host"]["load_avg_after"] = list(os.getloadavg())
    bench_env.append_result(Path(args.output), row)
    return row


def summary(row: dict[str, Any]) -> str:
    lines = [f"{row['llama_config']['hidden_size']}h x {row['llama_config']['num_hidden_layers']}L, "
             f"{row['params']:,} params, attention={row['attention_backend']}, loss_kernel={row['loss_kernel']}, "
             f"{row['tokens_per_step']} tokens/step, "
             f"compile {row['compile_seconds']:.1f} s, memory_analysis {row['memory_analysis_gib']} GiB",
             f"FLOPs/token: {row['flop_formula']}"]
    if row["tokens_per_s"] is not None:
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a (no known peak)"
        lines.append(f"ours:  {row['step_seconds']:.4f} s/step ({row['step_cpu_seconds']:.3f} CPU s), "
                     f"{row['tokens_per_s']:.1f} tokens/s "
                     f"({row['tokens_per_s_per_device']:.1f}/device), MFU {mfu}")
    if row["torch"] is not None:
        lines.append(f"torch: {row['torch']['step_seconds']:.4f} s/step, {row['torch']['tokens_per_s']:.1f} tokens/s; "
                     f"ours/torch = {row['ours_over_torch']:.3f} (by CPU seconds per step: "
                     f"{row['ours_over_torch_cpu_time']:.3f}; round by round: {row['ours_over_torch_paired']:.3f})")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    return bench_env.main_with(argv, parse_args, lambda args: train.Trainer(trainer_config(args)), run, summary)


if __name__ == "__main__":
    main()
