"""Runs AFP's own trainer (chongli17/CrossLingualAlignment: `src/train.py` main(), its CLTrainer loop,
`LlamaForCL`, data collator and block grouping) for a few steps on a tiny random LLaMA, and records
each step's loss at full precision. Run it in an environment with the reference's libraries
(transformers 4.28.1, datasets 2.14.6, torch) and AFP_SRC pointing at the reference's `src/`
(docs/REFERENCE_CHECKS.md).

    python afp_reference_run.py model TOKENIZER_MODEL   # writes $PARITY_DIR/hf: tiny LLaMA + right-padded tokenizer
    python afp_reference_run.py train DATA.json [reference args...]   # 20 steps of run_sup_example.sh's settings

`train` writes $PARITY_DIR/ref_afp.json (per-step losses, the reference's record order and the
model inputs of each step) and $PARITY_DIR/ordered.json (the data file in the order the
reference's RandomSampler visits it, for our side with shuffling off). Nothing of the reference is
changed: the records are observed through a TrainerCallback added to transformers' default
callbacks and torch forward hooks. Left out of run_sup_example.sh: its evaluation (`--do_eval`,
`--evaluation_strategy steps --eval_steps 500 --eval_config_file --metric_for_best_model
--load_best_model_at_end`: the few-shot PAWS-X evaluation, every 500 steps and after training, none
of it inside the 20 training steps), `--bf16 --tf32` (fp32 on CPU), wandb (`--report_to none`).
"""
import json
import os
import sys

import torch
import transformers

OUT = os.environ.get("PARITY_DIR", "/tmp/afpparity")


def make_model(tokenizer_model: str) -> None:
    """A 2-layer LLaMA with the tokenizer's vocabulary; norms and embeddings spread so that the
    first block's states differ between sentences."""
    tok = transformers.LlamaTokenizer(vocab_file=tokenizer_model, padding_side="right")
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=176,
                                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024,
                                   rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith("norm.weight"):
                w.normal_(1.0, 0.1)
            elif "embed_tokens" in name:
                w.normal_(0.0, 0.5)
    model.save_pretrained(f"{OUT}/hf")
    tok.save_pretrained(f"{OUT}/hf")


class Recorder(transformers.TrainerCallback):
    """Observes the run: the sampler's first-epoch order, each training forward's inputs and loss, and
    the norm of each step's gradient (before clipping)."""

    def __init__(self, data_file: str):
        self.data_file, self.order, self.steps, self.squares = data_file, None, [], 0.0

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        # RandomSampler's first epoch is randperm(n) from its generator: replay it on a copy.
        sampler = train_dataloader.sampler
        copy = torch.Generator()
        copy.set_state(sampler.generator.get_state())
        self.order = torch.randperm(len(sampler.data_source), generator=copy).tolist()
        model.register_forward_pre_hook(self.inputs, with_kwargs=True)
        model.register_forward_hook(self.loss)
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(self.square)

    def square(self, param):
        self.squares += param.grad.double().pow(2).sum().item()

    def inputs(self, module, args, kwargs):
        if module.training:
            self.squares = 0.0
            self.steps.append({k: kwargs[k].tolist() for k in ("input_ids", "attention_mask", "clm_input_ids",
                                                               "clm_labels")})

    def loss(self, module, args, output):
        if module.training:
            self.steps[-1]["loss"] = output.loss.item()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[-1]["gradient_norm"] = self.squares ** 0.5

    def on_train_end(self, args, state, control, **kwargs):
        json.dump({"order": self.order, "steps": self.steps, "transformers": transformers.__version__,
                   "torch": torch.__version__}, open(f"{OUT}/ref_afp.json", "w"))
        lines = open(self.data_file, encoding="utf-8").read().splitlines()
        with open(f"{OUT}/ordered.json", "w", encoding="utf-8") as f:
            f.writelines(lines[i] + "\n" for i in self.order)
        print("losses", [s["loss"] for s in self.steps])


def train(data_file: str, extra: list) -> None:
    sys.path.insert(0, os.environ["AFP_SRC"])
    import train as afp  # the reference's src/train.py
    transformers.trainer.DEFAULT_CALLBACKS.append(Recorder(data_file))
    os.makedirs(f"{OUT}/afp_work", exist_ok=True)
    os.chdir(f"{OUT}/afp_work")  # its datasets cache is ./data/cache
    sys.argv = ["train.py", "--model_name_or_path", f"{OUT}/hf", "--pooler_type", "last-1",
                "--train_file", data_file, "--output_dir", f"{OUT}/afp_work/out",
                "--cache_dir", f"{OUT}/afp_work/cache",
                "--seed", "0", "--temp", "0.05", "--gradient_accumulation_steps", "1",
                "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "1",
                "--learning_rate", "1e-3", "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03",
                "--max_seq_length", "512", "--clm_block_size", "512",
                "--save_steps", "2500", "--save_total_limit", "1", "--overwrite_output_dir", "--do_train",
                "--max_steps", "20", "--do_clm", "--clm_weight", "1.5",
                "--no_cuda", "--report_to", "none", "--logging_steps", "1", *extra]
    afp.main()


if __name__ == "__main__":
    if sys.argv[1] == "model":
        make_model(sys.argv[2])
    else:
        train(os.path.abspath(sys.argv[2]), sys.argv[3:])
