"""``python -m train``: train a byte-level language model on the embedded corpus.

A first, single-device version of the trainer: a small Flax NNX model that
predicts the next byte of Python source from the previous ``context`` bytes,
optimised with ``optim_jax`` (global-norm clipping, AdamW with decoupled decay
masked off biases, norm scales and embeddings, warmup + cosine schedule).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import optim_jax
from train import data


class ByteMLP(nnx.Module):
    """Embeds the last ``context`` bytes, one GELU hidden layer, logits over 256 bytes."""

    def __init__(self, context: int, embed: int, hidden: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(data.VOCAB_SIZE, embed, rngs=rngs)
        self.hidden = nnx.Linear(context * embed, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, data.VOCAB_SIZE, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.embed(x).reshape(x.shape[0], -1)
        return self.head(nnx.gelu(self.norm(self.hidden(h))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--context", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "context"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.learning_rate > 0:
        parser.error(f"--learning-rate must be > 0, got {args.learning_rate}")
    return args


def make_optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
    schedule = optim_jax.warmup_cosine_decay(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=max(1, steps // 20),
        decay_steps=steps,
        end_value=learning_rate / 10,
    )
    return optax.chain(
        optim_jax.clip_by_global_norm(1.0),
        optim_jax.adamw(schedule, weight_decay=0.1, mask=optim_jax.decay_mask),
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    train_tokens, eval_tokens = data.train_eval_split(data.embedded_corpus())
    model = ByteMLP(args.context, embed=32, hidden=256, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(args.learning_rate, args.steps)
    opt_state = tx.init(params)

    def loss_fn(params, inputs, targets):
        logits = nnx.merge(graphdef, params)(inputs).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def train_step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        grad_norm = optim_jax.pre_clip_global_norm(opt_state)
        return optax.apply_updates(params, updates), opt_state, loss, grad_norm

    eval_loss = jax.jit(loss_fn)
    rng = np.random.default_rng(args.seed)
    eval_batch = data.sample_windows(eval_tokens, args.context, 4096, np.random.default_rng(1))
    initial_eval = float(eval_loss(params, *eval_batch))

    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", unit="step", mininterval=1.0)
    for _ in bar:
        batch = data.sample_windows(train_tokens, args.context, args.batch_size, rng)
        params, opt_state, loss, grad_norm = train_step(params, opt_state, *batch)
        bar.set_postfix(loss=f"{float(loss):.3f}", grad_norm=f"{float(grad_norm):.2f}")
    elapsed = time.perf_counter() - start
    final_eval = float(eval_loss(params, *eval_batch))
    print(
        f"eval loss {initial_eval:.4f} -> {final_eval:.4f} (nats/byte) after {args.steps} steps "
        f"in {elapsed:.1f} s, {args.steps * args.batch_size / elapsed:,.0f} predictions/s"
    )
    return {"initial_eval_loss": initial_eval, "final_eval_loss": final_eval}


if __name__ == "__main__":
    main()
