"""The autoencoder objective: training the first stage (the KL VAE) as CompVis' ldm does, in the one trainer.

    config.objective = "autoencoder"                       # with config.model.kind = "autoencoder"
    spec = StepSpec.build(config, mesh)                    # spec.objective: an `AutoencoderObjective`
    state, metrics = autoencoder_step(state, frozen, batch, key, spec)

One step is ldm's two optimiser steps on the same batch (`AutoencoderKL.training_step` with
`optimizer_idx` 0 then 1, which PyTorch Lightning 1.x runs one after the other, each with its own
forward pass):

  0. the autoencoder: x -> posterior -> a sample -> x_rec; the loss of `autoencoder_losses` (L1 +
     LPIPS as a Gaussian NLL, KL, the adaptive weight times -mean(D(x_rec)) from `disc_start` on);
     its gradients, clipped (unless `grad_clip_norm` is 0), through the run's optimiser; EMA.
  1. the discriminator: the *updated* autoencoder reconstructs the batch again (a new posterior
     sample, as Lightning's second `training_step` call does), and D takes one step of
     `disc_factor(step) * hinge(D(x), D(x_rec))` with its own optimiser.

D runs in training mode throughout, as in ldm: BatchNorm normalises with each call's batch statistics
and moves its running averages three times per step (D(x_rec) in step 0, then D(x) and D(x_rec) in
step 1, separately). Before `disc_start` the adversarial terms are multiplied by 0, as in ldm, so D's
gradients are 0 (Adam leaves its params where they are) while its running averages still move.
With `disc_factor` 0 (no adversarial terms at all) D is not run: ldm runs it and multiplies its terms
by 0, which changes nothing but D's running averages (used only in evaluation mode, never in training);
its `d_*`, `g_loss` and `logits_*` metrics are then absent.

The adaptive weight needs the gradients of the NLL and of the generator loss with respect to the
decoder's last kernel (`decoder/conv_out/kernel`). They come out of the step's one forward pass: the
VAE is differentiated with `jax.vjp` once, the losses are differentiated with respect to the
reconstruction (and the posterior), and the VAE's pullback is applied to three cotangents: the NLL's,
the generator loss's (of which only the last kernel's gradient is read, so XLA drops the rest of
those two backward passes), and the total's `ct_nll + d_weight * disc_factor * ct_g` with the KL's
posterior cotangent, which gives the gradient of the whole loss.

A non-finite loss or gradient of either step leaves the whole state (both networks) as it was.
The batch's `images` are all this objective reads (uint8 `[B, H, W, 3]`; the text fields are ignored).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sdxl_jax.convert.perceptual import load_lpips, load_lpips_heads, load_patch_discriminator
from sdxl_jax.models import AutoencoderKL, Lpips, PatchDiscriminator, PatchDiscriminatorConfig, patchgan
from sdxl_jax.models import lpips as lpips_model
from sdxl_jax.train.autoencoder_losses import (
    AutoencoderLossConfig,
    GeneratorTerms,
    autoencoder_loss,
    discriminator_loss,
    generator_loss,
    kl_loss,
    nll_loss,
    reconstruction_loss,
)
from sdxl_jax.train.optim import advance, discriminator_update, make_optimizer, optimiser_step
from sdxl_jax.train.state import DiscriminatorState, merge_components, place

LAST_LAYER = ("decoder", "conv_out", "kernel")  # ldm's `get_last_layer()`: decoder.conv_out.weight
LPIPS_KEY, DISCRIMINATOR_KEY = 200, 300  # folded into the seed: apart from the components' and LoRA's keys


def last_layer(vae_tree):
    """The decoder's last kernel in a VAE param (or gradient) tree, `[3, 3, C, out_channels]`."""
    for name in LAST_LAYER:
        vae_tree = vae_tree[name]
    return vae_tree


@dataclasses.dataclass(frozen=True, eq=False)
class AutoencoderObjective:
    """What the autoencoder step needs beyond the run's models and optimiser (`StepSpec.objective`):
    the loss weights, the discriminator and its optimiser (`tx`, `lr_schedule`), and where the fixed
    and the discriminator's weights come from. Built from `config.autoencoder` by `from_config`
    (`decoder_only` is not here: it decides the state's split, `state.split_trained`)."""

    loss: AutoencoderLossConfig
    discriminator: PatchDiscriminatorConfig
    tx: optax.GradientTransformation  # the discriminator's
    lr_schedule: optax.Schedule
    sample_posterior: bool
    lpips_vgg16: str
    lpips_heads: str
    lpips_random_vgg: bool
    discriminator_init: str

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "AutoencoderObjective":
        ae = config.autoencoder
        tx, lr = make_optimizer(ae.discriminator_optimizer, ("discriminator",))
        return cls(
            AutoencoderLossConfig(**ae.loss.to_dict()), PatchDiscriminatorConfig(**ae.discriminator.to_dict()),
            tx, lr, ae.sample_posterior, ae.lpips_vgg16, ae.lpips_heads, ae.lpips_random_vgg, ae.discriminator_init,
        )  # fmt: skip

    @property
    def adversarial(self) -> bool:
        """Whether the loss has its adversarial terms (`disc_factor` > 0; D is not run otherwise)."""
        return self.loss.disc_factor > 0

    @property
    def lpips(self) -> bool:
        """Whether the loss has its perceptual term (LPIPS is built only then)."""
        return self.loss.perceptual_weight > 0

    # ---- the fixed networks (LPIPS) and the discriminator, abstract and on the devices ----

    def abstract_frozen(self, abstract_params: dict) -> dict:
        """`{"lpips": boxed ShapeDtypeStructs}`, or `{}` without the perceptual term (the run's own
        components, `abstract_params`, are not needed)."""
        return {"lpips": lpips_model.abstract_params()} if self.lpips else {}

    def frozen_params(self, seed: int, shardings: dict, params: dict) -> dict:
        """`{"lpips": params}` on the devices: torchvision's VGG16 and lpips' heads from their files, or
        (`lpips_random_vgg`) a random VGG16 from the seed with the heads' file or, without one, random
        non-negative heads (lpips clamps its trained heads at 0; a negative one would reward a
        difference). `{}` without the perceptual term."""
        if not self.lpips:
            return {}
        target = shardings["lpips"]
        if not self.lpips_random_vgg:
            return {"lpips": place(load_lpips(self.lpips_vgg16, self.lpips_heads), target)}
        x = jnp.zeros((1, lpips_model.MIN_SIZE, lpips_model.MIN_SIZE, 3))

        def init(key):
            params = nn.meta.unbox(Lpips().init(key, x, x)["params"])
            return {name: tree if name == "vgg" else jax.tree.map(jnp.abs, tree) for name, tree in params.items()}

        params = jax.jit(init, out_shardings=target)(jax.random.fold_in(jax.random.key(seed), LPIPS_KEY))
        if self.lpips_heads:  # the real heads on the random trunk
            heads = load_lpips_heads(self.lpips_heads)
            params = params | place(heads, {name: target[name] for name in heads})
        return {"lpips": params}

    def abstract_discriminator(self) -> dict:
        """The discriminator's variables `{"params", "batch_stats"}` as boxed `ShapeDtypeStruct`s."""
        return patchgan.abstract_variables(self.discriminator)

    def discriminator_variables(self, seed: int, shardings: dict) -> dict:
        """The discriminator's variables on the devices: from `discriminator_init` (a taming / ldm
        checkpoint or a bare `NLayerDiscriminator` state dict) or taming's random init from the seed."""
        if self.discriminator_init:
            return place(load_patch_discriminator(self.discriminator_init, self.discriminator), shardings)
        cfg = self.discriminator
        x = jnp.zeros((1, cfg.min_size, cfg.min_size, cfg.in_channels))
        init = lambda key: dict(nn.meta.unbox(PatchDiscriminator(cfg).init(key, x, train=False)))
        return jax.jit(init, out_shardings=shardings)(jax.random.fold_in(jax.random.key(seed), DISCRIMINATOR_KEY))


# ---- the step -------------------------------------------------------------------------------------


def images_of(batch: dict) -> jax.Array:
    """The batch's images in [-1, 1], fp32 `[B, H, W, 3]`."""
    if "images" not in batch:
        raise ValueError(f"the autoencoder objective trains on images; this batch has {sorted(batch)} "
                         "(cached latents cannot train a VAE)")  # fmt: skip
    return batch["images"].astype(jnp.float32) / 127.5 - 1.0


def reconstruct(models, frozen: dict, trained_vae: dict, x: jax.Array, key, sample: bool):
    """(x_rec fp32 `[B, H, W, 3]`, posterior) of the VAE whose params are `frozen["vae"]` (decoder-only
    fine-tuning's encoder side) joined with `trained_vae`: a posterior sample decoded (`sample`, as ldm
    trains), or its mode."""
    params = merge_components(frozen, {"vae": trained_vae})["vae"]
    vae = AutoencoderKL(models.vae)
    posterior = vae.apply({"params": params}, x, method="encode")
    z = posterior.sample(key) if sample else posterior.mode()
    return vae.apply({"params": params}, z, method="decode"), posterior


def generator_step(state, frozen: dict, x: jax.Array, key, spec):
    """Step 0 (the autoencoder's loss), before any update: (loss, grads of `state.params`, metrics,
    the discriminator's collections after D(x_rec))."""
    objective, cfg = spec.objective, spec.objective.loss
    d = state.discriminator
    disc = PatchDiscriminator(objective.discriminator)
    trained = state.params
    (x_rec, posterior), pullback = jax.vjp(
        lambda vae: reconstruct(spec.models, frozen, vae, x, key, objective.sample_posterior), trained["vae"]
    )
    logvar = trained["logvar"] if cfg.learn_logvar else jnp.float32(cfg.logvar_init)

    def nll_of(x_rec, logvar):
        lpips = Lpips().apply({"params": frozen["lpips"]}, x, x_rec) if objective.lpips else None
        rec = reconstruction_loss(x, x_rec, lpips, cfg.perceptual_weight)
        return nll_loss(rec, logvar), (rec, lpips)

    def g_of(x_rec):
        logits, updated = disc.apply(
            {"params": d.params, **d.collections}, x_rec, train=True, mutable=list(d.collections)
        )
        return generator_loss(logits), dict(updated)

    (nll, (rec, lpips)), (ct_nll, grad_logvar) = jax.value_and_grad(nll_of, (0, 1), has_aux=True)(x_rec, logvar)
    kl, ct_kl = jax.value_and_grad(kl_loss)(posterior)
    if objective.adversarial:
        (g_loss, collections), ct_g = jax.value_and_grad(g_of, has_aux=True)(x_rec)
        no_posterior = jax.tree.map(jnp.zeros_like, posterior)
        nll_last = last_layer(pullback((ct_nll, no_posterior))[0])
        g_last = last_layer(pullback((ct_g, no_posterior))[0])
    else:  # disc_factor 0: D is never run (see the module docstring)
        g_loss, collections, ct_g, nll_last, g_last = jnp.float32(0.0), d.collections, 0.0, None, None
    terms = GeneratorTerms(rec, nll, nll, kl, g_loss)  # the trainer passes no per-example weights
    loss, metrics = autoencoder_loss(cfg, terms, logvar, state.step, nll_last, g_last)
    if not objective.adversarial:
        for name in ("g_loss", "d_weight", "disc_factor"):
            metrics.pop(name)

    ct_x = ct_nll + (metrics["d_weight"] * metrics["disc_factor"]) * ct_g if objective.adversarial else ct_nll
    ct_posterior = jax.tree.map(lambda c: cfg.kl_weight * c, ct_kl)
    grads = {"vae": pullback((ct_x, ct_posterior))[0]}
    if cfg.learn_logvar:
        grads["logvar"] = grad_logvar
    metrics["l1_loss"] = jnp.mean(jnp.abs(x - x_rec))
    if lpips is not None:
        metrics["lpips"] = jnp.mean(lpips)
    return loss, grads, metrics, collections


def discriminator_step(d: DiscriminatorState, collections: dict, x, x_rec, step, objective):
    """Step 1's loss and gradients: (loss, grads of `d.params`, metrics, collections after D(x), D(x_rec))."""
    disc = PatchDiscriminator(objective.discriminator)
    x_rec = jax.lax.stop_gradient(x_rec)

    def loss_of(params):
        mutable = list(collections)
        real, c = disc.apply({"params": params, **collections}, x, train=True, mutable=mutable)
        fake, c = disc.apply({"params": params, **c}, x_rec, train=True, mutable=mutable)
        loss, metrics = discriminator_loss(objective.loss, real, fake, step)
        return loss, (metrics, dict(c))

    (loss, (metrics, collections)), grads = jax.value_and_grad(loss_of, has_aux=True)(d.params)
    return loss, grads, metrics, collections


def autoencoder_step(state, frozen: dict, batch: dict, key: jax.Array, spec):
    """One batch: the autoencoder's update, then the discriminator's (see the module docstring).
    Returns the next `AdversarialState` and scalar metrics."""
    objective, config = spec.objective, spec.config
    x = images_of(batch)
    k_generator, k_discriminator = jax.random.split(key)

    loss, grads, g_metrics, collections = generator_step(state, frozen, x, k_generator, spec)
    grad_norm = optax.global_norm(grads)
    params, opt_state, moved = optimiser_step(spec.tx, state.params, state.opt_state, grads)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": spec.lr_schedule(state.updates),
               **{k: v for k, v in g_metrics.items() if k != "total_loss"}}  # fmt: skip
    d = state.discriminator
    if objective.adversarial:
        x_rec, _ = reconstruct(spec.models, frozen, params["vae"], x, k_discriminator, objective.sample_posterior)
        d_loss, d_grads, d_metrics, collections = discriminator_step(d, collections, x, x_rec, state.step, objective)
        d, finite, d_grad_norm = discriminator_update(objective.tx, d, d_grads, collections, d_loss, finite)
        metrics |= {"d_loss": d_loss, "d_grad_norm": d_grad_norm, "d_lr": objective.lr_schedule(state.updates),
                    "logits_real": d_metrics["logits_real"], "logits_fake": d_metrics["logits_fake"]}  # fmt: skip
    new, common = advance(state, finite, params, opt_state, moved, config.ema)
    return new.replace(discriminator=d), metrics | common
