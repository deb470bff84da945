r"""Held-out Hindi loss right after resizing, for each initialisation of the new rows (docs/VOCABULARY.md).

    python benchmarks/resize_init_loss.py --data=../shared/data --steps=300 --new_pieces=1000

1. Trains the demo model (demo tokenizer, 4096 pieces) on the English demo corpus for `--steps`.
2. Extends the demo tokenizer with `--new_pieces` pieces trained on the first 800 lines of
   `mono/hi.ud_pud.txt` (tools/extend_vocab).
3. Resizes the trained parameters with each `--resize.init` (resize.resize_params).
4. Reports, on the last 200 lines (held out), the mean loss per token and the loss per character
   (the sum of token losses over the characters: comparable across tokenizers), also for the
   un-resized model with the old tokenizer.

A small honest measurement of where each initialisation starts, not a claim about training.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from easylm_align import checkpoint, model, resize, train
from easylm_align.tokenizer import DEMO_TOKENIZER, Tokenizer
from easylm_align.tools import extend_vocab


def heldout_loss(params: dict, config, tok: Tokenizer, texts: list[str], length: int = 256,
                 batch: int = 8) -> dict[str, float]:
    """Summed token loss over the texts (each BOS + text + EOS, cut to `length`), per token and per character."""
    flax_model = model.build_model(config)

    @jax.jit
    def token_losses(p, ids):  # one shape for every batch: compiled once
        logits = flax_model.apply({"params": p}, ids[:, :-1]).logits.astype(jnp.float32)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1)[..., 0]

    total, tokens, chars = 0.0, 0, 0
    for start in range(0, len(texts), batch):
        group = texts[start:start + batch]
        rows = [([tok.bos_id] + tok.encode(t) + [tok.eos_id])[:length + 1] for t in group]
        ids = np.zeros((batch, length + 1), np.int32)
        mask = np.zeros((batch, length), np.float64)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = row
            mask[r, :len(row) - 1] = 1.0
        total += float((np.asarray(token_losses(params, jnp.asarray(ids)), np.float64) * mask).sum())
        tokens += int(mask.sum())
        chars += sum(len(t) for t in group)
    return {"loss_per_token": total / tokens, "loss_per_char": total / chars, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--new_pieces", type=int, default=1000)
    parser.add_argument("--out", default="")
    parser.add_argument("--trained_run", default="", help="reuse this run directory instead of training")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    cfg = train.default_config()
    cfg.update_from_flattened_dict({"total_steps": args.steps, "log_freq": args.steps, "mesh_dim": "1,-1,1",
                                    "logger.output_dir": str(work / "run"), "logger.tensorboard": False})
    trainer = train.Trainer(cfg)
    run = Path(args.trained_run) if args.trained_run else trainer.run()
    english_loss = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    params = checkpoint.load_params_numpy(str(run / f"checkpoints/streaming_params_{args.steps}"))

    hindi = (Path(args.data) / "mono/hi.ud_pud.txt").read_text(encoding="utf-8").splitlines()
    (work / "hi.txt").write_text("\n".join(hindi[:800]) + "\n", encoding="utf-8")
    heldout = hindi[800:]
    extended = work / "extended.model"
    added, _ = extend_vocab.extend(str(DEMO_TOKENIZER), str(work / "hi.txt"), 4096 + args.new_pieces, str(extended))
    old_tok, new_tok = Tokenizer(str(DEMO_TOKENIZER)), Tokenizer(str(extended))
    new_vocab = 4096 + added
    result = {"steps": args.steps, "english_train_loss": english_loss, "pieces_added": added,
              "old_tokenizer": heldout_loss(params, trainer.llama_config, old_tok, heldout)}
    sources = resize.new_row_sources(resize._load_tokenizer(str(DEMO_TOKENIZER)), resize._load_tokenizer(str(extended)),
                                     4096, new_vocab)
    config = trainer.llama_config.copy_and_resolve_references()
    config.vocab_size = new_vocab
    for init in resize.INITS:
        grown = resize.resize_params(params, new_vocab, sources, init, config.initializer_range, seed=0)
        result[init] = heldout_loss(grown, config, new_tok, heldout)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
