"""The optimiser of a run: the main network's AdamW or Muon, the text encoders' AdamW, the LR schedule,
EMA decay, and the update every objective's step ends with.

    tx, lr_schedule = make_optimizer(config.optimizer, trainable)   # trainable: ("unet", ...) components
    params, opt_state, moved = optimiser_step(tx, params, opt_state, grads)
    state, metrics = advance(state, finite, params, opt_state, moved, config.ema)

`config.optimizer.name` picks the main network's optimiser (the UNet's; the VAE's for the autoencoder
objective) from `OPTIMIZERS`; `schedule` the LR curve from `LR_SCHEDULES` (after a linear warmup).
Gradients are clipped by their global norm over every trainable component first (`grad_clip_norm` 0:
not clipped, as ldm trains its autoencoder); `accumulation_steps > 1` wraps the whole in
`optax.MultiSteps`. A discriminator (the autoencoder objective's) gets its own `make_optimizer` from
its own optimiser config.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax


def _constant(opt, peak, after_warmup):
    return optax.constant_schedule(peak)


def _cosine(opt, peak, after_warmup):
    return optax.cosine_decay_schedule(peak, max(opt.decay_steps - opt.warmup_steps, 1), alpha=opt.end_factor)


LR_SCHEDULES = {"constant": _constant, "cosine": _cosine}


def lr_schedule(opt: ml_collections.ConfigDict, peak: float) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps` optimiser updates, then constant or cosine to `end_factor * peak`."""
    main = LR_SCHEDULES[opt.schedule](opt, peak, opt.warmup_steps)
    if opt.warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, peak, opt.warmup_steps)
    return optax.join_schedules([warmup, main], [opt.warmup_steps])


def _adamw(opt, schedule):
    return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)


def muon_dimensions(params):
    """Which axes of each param Muon orthogonalises: every `kernel` as an `[inputs, outputs]` matrix
    (dense `[in, out]`, scanned dense `[layers, in, out]` one matrix per layer, conv `[kh, kw, in, out]`
    as `[kh * kw * in, out]`); None (AdamW) for biases and norm scales."""
    dims = {
        2: optax.contrib.MuonDimensionNumbers(0, 1),
        3: optax.contrib.MuonDimensionNumbers(1, 2),
        4: optax.contrib.MuonDimensionNumbers((0, 1, 2), 3),
    }

    def one(path, x):  # the last dict key names the param (boxed params add a `.value` after it)
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        if name != "kernel":
            return None
        if x.ndim not in dims:
            raise ValueError(f"Muon: no matrix layout for a {x.ndim}-D kernel at {jax.tree_util.keystr(path)}")
        return dims[x.ndim]

    return jax.tree_util.tree_map_with_path(one, params)


def _muon(opt, schedule):
    """Muon (optax.contrib): Nesterov momentum, orthogonalised by Newton-Schulz, for the kernels; AdamW
    with Nesterov momentum (NAdamW: optax's Muon uses its flag for both) for the rest. `consistent_rms`
    0.2 scales each update to AdamW's typical RMS, so the same learning rate and weight decay carry over
    (Moonlight's recipe). optax uses one `eps` for both Newton-Schulz's normalisation and AdamW."""
    return optax.contrib.muon(
        schedule,
        beta=opt.muon_beta,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        adam_b1=opt.b1,
        adam_b2=opt.b2,
        adam_weight_decay=opt.weight_decay,
        muon_weight_dimension_numbers=muon_dimensions,
        consistent_rms=0.2,
    )


OPTIMIZERS = {"adamw": _adamw, "muon": _muon}  # the main network's; the text encoders always take AdamW
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def make_optimizer(opt: ml_collections.ConfigDict, trainable: tuple[str, ...]):
    """(GradientTransformation over `{name: params}`, the main network's LR schedule).

    Global-norm clipping over all trainable params (unless `grad_clip_norm` is 0), then `opt.name`
    (AdamW or Muon) for every entry but the text encoders (the UNet; the VAE and its log-variance) and
    AdamW for the text encoders with their own LR (their largest params are token-embedding tables,
    looked up row by row, not the matrices Muon is made for), wrapped in `optax.MultiSteps` when
    `accumulation_steps > 1` (one update per that many batches; the accumulator costs one more copy
    of the params, so it is only there when asked for).
    """
    if opt.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name {opt.name!r} not in {sorted(OPTIMIZERS)}")
    if opt.grad_clip_norm < 0:
        raise ValueError(f"optimizer.grad_clip_norm must be >= 0 (0: no clipping), got {opt.grad_clip_norm}")
    schedule = lr_schedule(opt, opt.learning_rate)
    main = OPTIMIZERS[opt.name](opt, schedule)
    if not any(name in TEXT_ENCODERS for name in trainable):
        inner = main
    else:
        text = _adamw(opt, lr_schedule(opt, opt.text_encoder_learning_rate))
        # the main group's label is "unet", the name it has in the checkpoints of text-encoder runs
        labels = {name: "text" if name in TEXT_ENCODERS else "unet" for name in trainable}
        inner = optax.partition({"unet": main, "text": text}, labels)
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), inner) if opt.grad_clip_norm else inner
    if opt.accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=opt.accumulation_steps)
    return tx, schedule


def ema_decay(ema: ml_collections.ConfigDict, updates: jax.Array) -> jax.Array:
    """The EMA decay after `updates` optimiser updates: `min(decay, (1 + n) / (10 + n))` with warmup."""
    if not ema.warmup:
        return jnp.float32(ema.decay)
    n = updates.astype(jnp.float32)
    return jnp.minimum(jnp.float32(ema.decay), (1.0 + n) / (10.0 + n))


# ---- the end of every step ---------------------------------------------------------------------------


def optimiser_step(tx: optax.GradientTransformation, params, opt_state, grads):
    """(params, opt_state, moved) after one `tx` update; `moved` (bool []) is False while `MultiSteps`
    only accumulates (its window not yet closed)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    moved = opt_state.mini_step == 0 if isinstance(tx, optax.MultiSteps) else jnp.bool_(True)
    return params, opt_state, moved


def select(keep_new, new, old):
    """`new` where `keep_new` (bool []), else `old`, leaf by leaf (trees of one structure)."""
    return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


def discriminator_update(tx: optax.GradientTransformation, d, grads, collections: dict, loss, finite):
    """A discriminator's step beside the model's (the autoencoder's PatchGAN, ADD's heads): its optimiser
    on `grads`, its collections moved; kept only if it and the model's step (`finite`) are finite.
    Returns (the next `DiscriminatorState`, the combined finite flag, its gradient norm)."""
    grad_norm = optax.global_norm(grads)
    params, opt_state, _ = optimiser_step(tx, d.params, d.opt_state, grads)
    finite = finite & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    return select(finite, d.replace(params=params, collections=collections, opt_state=opt_state), d), finite, grad_norm


def advance(state, finite, params, opt_state, moved, ema: ml_collections.ConfigDict):
    """The next `TrainState` (any objective's) after one batch, and its bookkeeping metrics.

    `params`, `opt_state`: the optimiser's result (`optimiser_step`) for `state.params`; the EMA moves
    when the params did. A non-finite step (`finite` False) keeps params, optimiser state and EMA as
    they were; only `step` and the skip counters move."""
    applied = finite & moved
    decay = ema_decay(ema, state.updates)
    ema_params = jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), state.ema_params, params)
    new = state.replace(
        step=state.step + 1,
        updates=state.updates + applied.astype(jnp.int32),
        params=select(finite, params, state.params),
        opt_state=select(finite, opt_state, state.opt_state),
        ema_params=select(applied, ema_params, state.ema_params),
        skipped=jnp.where(finite, 0, state.skipped + 1),
        skipped_total=state.skipped_total + (~finite).astype(jnp.int32),
    )
    metrics = {"finite": finite, "updates": new.updates, "skipped": new.skipped,
               "skipped_total": new.skipped_total, "ema_decay": decay}  # fmt: skip
    return new, metrics
