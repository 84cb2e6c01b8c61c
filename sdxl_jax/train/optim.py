"""The optimiser of a run: the UNet's AdamW or Muon, the text encoders' AdamW, the LR schedule, EMA decay.

    tx, lr_schedule = make_optimizer(config.optimizer, trainable)   # trainable: ("unet", ...) components
    decay = ema_decay(config.ema, state.updates)

`config.optimizer.name` picks the UNet's optimiser from `OPTIMIZERS`; `schedule` the LR curve from
`LR_SCHEDULES` (after a linear warmup). Gradients are clipped by their global norm over every trainable
component first; `accumulation_steps > 1` wraps the whole in `optax.MultiSteps`.
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


OPTIMIZERS = {"adamw": _adamw, "muon": _muon}  # the UNet's; the text encoders always take AdamW


def make_optimizer(opt: ml_collections.ConfigDict, trainable: tuple[str, ...]):
    """(GradientTransformation over `{component: params}`, the UNet's LR schedule).

    Global-norm clipping over all trainable params, then the UNet's `opt.name` (AdamW or Muon) and
    AdamW for the text encoders with their own LR (their largest params are token-embedding tables,
    looked up row by row, not the matrices Muon is made for), wrapped in `optax.MultiSteps` when
    `accumulation_steps > 1` (one update per that many batches; the accumulator costs one more copy
    of the params, so it is only there when asked for).
    """
    if opt.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name {opt.name!r} not in {sorted(OPTIMIZERS)}")
    schedule = lr_schedule(opt, opt.learning_rate)
    unet = OPTIMIZERS[opt.name](opt, schedule)
    if trainable == ("unet",):
        inner = unet
    else:
        text = _adamw(opt, lr_schedule(opt, opt.text_encoder_learning_rate))
        labels = {name: "unet" if name == "unet" else "text" for name in trainable}
        inner = optax.partition({"unet": unet, "text": text}, labels)
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), inner)
    if opt.accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=opt.accumulation_steps)
    return tx, schedule


def ema_decay(ema: ml_collections.ConfigDict, updates: jax.Array) -> jax.Array:
    """The EMA decay after `updates` optimiser updates: `min(decay, (1 + n) / (10 + n))` with warmup."""
    if not ema.warmup:
        return jnp.float32(ema.decay)
    n = updates.astype(jnp.float32)
    return jnp.minimum(jnp.float32(ema.decay), (1.0 + n) / (10.0 + n))
