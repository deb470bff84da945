"""Runs COMMIT's EasyLM (the reference's own model, loss and optimizer) for 20 steps on the batches
`our_batches.py` wrote, from its own random init, which it saves as a streaming params file for our
trainer; writes the reference's metrics. Run in an environment with the reference's libraries and
COMMIT_EASYLM pointing at a checkout of thnkinbtfly/COMMIT (docs/REFERENCE_CHECKS.md).

    python commit_reference_run.py NAME   # NAME: alpaca or text
"""
import json
import os
import sys

OUT = os.environ.get("PARITY_DIR", "/tmp/refrun")
sys.path.insert(0, os.environ["COMMIT_EASYLM"])
import numpy as np, jax, jax.numpy as jnp
from flax.training.train_state import TrainState
from EasyLM.models.llama.llama_model import LLaMAConfig, FlaxLLaMAForCausalLMModule
from EasyLM.optimizers import OptimizerFactory
from EasyLM.jax_utils import cross_entropy_loss_and_accuracy, get_weight_decay_mask, JaxRNG, global_norm
from EasyLM.checkpoint import StreamingCheckpointer

name = sys.argv[1]
batches = np.load(f"{OUT}/batches_{name}.npz")
cfg = LLaMAConfig.load_config("debug")
cfg.update(dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, fcm_max_ratio=0.0, fcm_min_ratio=0.0,
                bos_token_id=1, eos_token_id=2))
model = FlaxLLaMAForCausalLMModule(cfg, dtype=jnp.float32)
opt = OptimizerFactory.get_default_config()
opt.type = "adamw"
opt.adamw_optimizer.update(dict(init_lr=0.0, lr=1e-3, end_lr=1e-5, lr_warmup_steps=5, lr_decay_steps=20,
                                b1=0.9, b2=0.999, clip_gradient=1.0, weight_decay=0.1, bf16_momentum=True))
optimizer, info = OptimizerFactory.get_optimizer(opt, get_weight_decay_mask(LLaMAConfig.get_weight_decay_exclusions()))
rng = JaxRNG(jax.random.PRNGKey(42))
params = model.init(input_ids=jnp.zeros((4, 128), jnp.int32), position_ids=jnp.zeros((4, 128), jnp.int32),
                    attention_mask=jnp.ones((4, 128), jnp.int32), rngs=rng(cfg.rng_keys()))
StreamingCheckpointer.save_train_state_to_file(params["params"], f"{OUT}/streaming_params_{name}_0", None, "fp32")
state = TrainState.create(params=params, tx=optimizer, apply_fn=None)


def train_step(train_state, rng, batch):
    rng_generator = JaxRNG(rng)
    def loss_and_accuracy(params):
        logits = model.apply(params, batch["input_tokens"], deterministic=False,
                             rngs=rng_generator(cfg.rng_keys())).logits
        return cross_entropy_loss_and_accuracy(logits, batch["target_tokens"], batch["loss_masks"])
    (loss, accuracy), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(train_state.params)
    train_state = train_state.apply_gradients(grads=grads)
    return train_state, rng_generator(), dict(loss=loss, accuracy=accuracy, gradient_norm=global_norm(grads))


step = jax.jit(train_step)
srng = rng()
rows = []
for i in range(20):
    batch = {k: jnp.asarray(batches[k][i]) for k in ("input_tokens", "target_tokens", "loss_masks")}
    state, srng, m = step(state, srng, batch)
    rows.append({k: float(v) for k, v in m.items()})
json.dump(rows, open(f"{OUT}/ref_{name}.json", "w"))
print(rows[0], rows[-1])
