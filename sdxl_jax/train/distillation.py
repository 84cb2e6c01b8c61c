"""The ADD objective: adversarial diffusion distillation (SDXL-Turbo's training) in the one trainer.

    config.objective = "add"                               # settings: config.distillation
    spec = StepSpec.build(config, mesh)                    # spec.objective: a `DistillationObjective`
    state, metrics = distillation_step(state, frozen, batch, key, spec)

The student is the run's UNet (initialised from `init_from`, like any fine-tune); `frozen["teacher"]`
is a second copy of those initial weights, never trained and sharded like the student. One batch:

  1. the student: s drawn from `student_timesteps` (a few, ending at the last), x_s = alpha_s x0 +
     s_s eps, and at the last timestep, with `zero_terminal_snr`, x_s = eps (no signal: what sampling
     from pure noise hands it); its x0 estimate x_theta from its output in the VP form
     (`parameterisation.vp_denoised`, with the table's alpha_s: an eps model cannot read x0 at alpha 0).
  2. the teacher target: t ~ U[teacher_t_min, teacher_t_max), x_t = alpha_t sg(x_theta) + s_t eps';
     one teacher evaluation with and without the text (zeros: the model's caption-dropout branch),
     guided in x0 space with w ~ U[guidance_min, guidance_max] (x0_u + w (x0_c - x0_u); the same as
     guiding eps at a fixed x_t), stop-gradient.
  3. the distillation loss in pixel space (ADD §3.1): both x0 estimates decoded by the first stage,
     the per-example mean squared difference weighted by c(t): "exponential" alpha_t (ADD's default),
     "sds" alpha_t / (2 s_t); averaged over the batch.
  4. the adversarial loss (`adversarial_weight` > 0): the discriminator's features are the frozen
     teacher UNet's encoder maps (`features = "teacher"`, `models/unet_features.py`) on the student's
     x_theta and on the real x0, both re-noised with the same noise at t_d ~ U[disc_t_min, disc_t_max);
     the projected heads (`models/projected_discriminator.py`) are conditioned on the pooled text.
     The student's loss is `adversarial_weight * L_G + distill_weight * L_distill` (ADD: 1 and 2.5).
  5. the discriminator, after the student's update, on the same batch: the hinge loss on the real
     features and the student's (detached: the features step 4 computed), plus R1 (gamma `r1_gamma`)
     on the heads' real inputs (`train/adversarial.py`); its own optimiser.

The spectral-norm power iteration runs once per training-mode call of the heads, as in torch: the
student's D(fake) and the discriminator step's D(real) and D(fake) each move it, in that order.
A non-finite loss or gradient of either update leaves the whole state as it was. What is not built:
`features = "dinov2"` (the paper's DINOv2 ViT-S on decoded pixels with the ViT-L image embedding; the
networks exist, `models/dinov2.py`) and the NFSD weighting; both are refused in the config check.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sdxl_jax.diffusion import losses
from sdxl_jax.diffusion.parameterisation import expand_to, vp_denoised
from sdxl_jax.models import UNet, UNetConfig, from_latents
from sdxl_jax.models.pixel_space import first_stage
from sdxl_jax.models.projected_discriminator import ProjectedDiscriminator, ProjectedDiscriminatorConfig
from sdxl_jax.models.projected_discriminator import abstract_variables as abstract_heads
from sdxl_jax.models.unet_features import feature_channels, unet_feature_tokens
from sdxl_jax.train.adversarial import (
    discriminator_accuracy,
    discriminator_hinge_loss,
    generator_hinge_loss,
    r1_penalty,
)
from sdxl_jax.train.objective import alphas_cumprod, encode_batch
from sdxl_jax.train.optim import advance, discriminator_update, make_optimizer, optimiser_step, select
from sdxl_jax.train.state import model_params, models_from_config

DISCRIMINATOR_KEY = 400  # folded into the seed: apart from the components', LoRA's and the autoencoder's keys
WEIGHTINGS = ("exponential", "sds")
FEATURE_NETWORKS = ("teacher",)


@dataclasses.dataclass(frozen=True, eq=False)
class DistillationObjective:
    """The ADD step's static part (`StepSpec.objective`), from `config.distillation` (`from_config`)."""

    unet: UNetConfig
    pooled_dim: int  # the pooled text width at the front of y (`conditioning.vector_conditioning`)
    student_timesteps: tuple[int, ...]
    zero_terminal_snr: bool
    teacher_t: tuple[int, int]
    guidance: tuple[float, float]
    weighting: str
    distill_weight: float
    adversarial_weight: float
    feature_names: tuple[str, ...]
    disc_t: tuple[int, int]
    r1_gamma: float
    discriminator: ProjectedDiscriminatorConfig
    tx: optax.GradientTransformation  # the discriminator's
    lr_schedule: optax.Schedule

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "DistillationObjective":
        d = config.distillation
        models = models_from_config(config.model)
        unet = models.unet
        pooled = unet.adm_in_channels - models.num_time_ids * unet.time_id_embed_dim
        names = tuple(filter(None, d.feature_names.split(",")))
        heads = ProjectedDiscriminatorConfig(
            feature_channels=feature_channels(unet, names), c_dim=d.c_dim, text_embed_dim=pooled,
            image_embed_dim=0, kernel_size=d.kernel_size, group_size=d.group_size,
        )  # fmt: skip
        tx, lr = make_optimizer(d.discriminator_optimizer, ("discriminator",))
        return cls(
            unet, pooled, tuple(d.student_timesteps), d.zero_terminal_snr, (d.teacher_t_min, d.teacher_t_max),
            (d.guidance_min, d.guidance_max), d.weighting, d.distill_weight, d.adversarial_weight, names,
            (d.disc_t_min, d.disc_t_max), d.r1_gamma, heads, tx, lr,
        )  # fmt: skip

    @property
    def adversarial(self) -> bool:
        return self.adversarial_weight > 0

    # ---- the teacher (frozen) and the heads, abstract and on the devices ----

    def abstract_frozen(self, abstract_params: dict) -> dict:
        """`{"teacher": the UNet's boxed ShapeDtypeStructs}`: sharded like the student."""
        return {"teacher": abstract_params["unet"]}

    def frozen_params(self, seed: int, shardings: dict, params: dict) -> dict:
        """`{"teacher": a copy of the run's initial UNet params}` (the student's starting point), placed
        like them; the copy is its own buffers, so the student's donation leaves it alone."""
        copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings["teacher"])
        return {"teacher": copy(params["unet"])}

    def abstract_discriminator(self) -> dict:
        return abstract_heads(self.discriminator)

    def discriminator_variables(self, seed: int, shardings: dict) -> dict:
        """The heads' variables (`{"params", "spectral"}`), torch's default init from the seed."""
        cfg = self.discriminator
        features = [jnp.zeros((cfg.group_size, 1, c)) for c in cfg.feature_channels]
        text = jnp.zeros((cfg.group_size, cfg.text_embed_dim))
        init = lambda key: dict(nn.meta.unbox(ProjectedDiscriminator(cfg).init(key, features, text, train=False)))
        return jax.jit(init, out_shardings=shardings)(jax.random.fold_in(jax.random.key(seed), DISCRIMINATOR_KEY))


# ---- the step -------------------------------------------------------------------------------------


def c_weight(weighting: str, alpha, s) -> jax.Array:
    """c(t) of the distillation loss, `[B]`: exponential alpha_t, sds alpha_t / (2 s_t)."""
    if weighting == "exponential":
        return alpha
    if weighting == "sds":
        return alpha / (2.0 * s)
    raise ValueError(f"weighting {weighting!r} not in {WEIGHTINGS}")


def student_inputs(objective: DistillationObjective, table, x0, key):
    """(x_s fp32 like x0 `[B, h, w, C]`, timesteps s int32 `[B]`, alpha_s `[B]`, sigma_s `[B]`): the
    student's noisy input at timesteps drawn from its set; at the last timestep with `zero_terminal_snr`,
    pure noise. alpha and sigma are the table's (what the x0 estimate divides by), not the input's."""
    k_s, k_eps = jax.random.split(key)
    choices = jnp.asarray(objective.student_timesteps, jnp.int32)
    s = choices[jax.random.randint(k_s, (x0.shape[0],), 0, len(choices))]
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    ab = table[s]
    alpha, sigma = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    signal = alpha
    if objective.zero_terminal_snr:
        last = s == objective.student_timesteps[-1]
        signal, noise = jnp.where(last, 0.0, alpha), jnp.where(last, 1.0, sigma)
    else:
        noise = sigma
    x_s = expand_to(signal, x0) * x0 + expand_to(noise, x0) * eps
    return x_s, s, alpha, sigma


def renoise(x0, t, table, eps):
    """alpha_t x0 + s_t eps at integer timesteps `t` `[B]`."""
    return losses.noisy_latents(x0, eps, table[t])


def teacher_x0(objective, unet_fn, teacher, x_t, t, table, cond, w, prediction: str):
    """The guided teacher's x0 estimate at (x_t, t): `x0_u + w (x0_c - x0_u)`, the unconditional branch
    with the text zeroed (context and the pooled part of y), stop-gradient."""
    ab = table[t]
    alpha, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    y_uncond = cond.y.at[:, : objective.pooled_dim].set(0.0)
    both = jnp.concatenate
    out = unet_fn(teacher, both([x_t, x_t]), both([t, t]), both([cond.context, jnp.zeros_like(cond.context)]),
                  both([cond.y, y_uncond]))  # fmt: skip
    x0_c, x0_u = jnp.split(vp_denoised(out, both([x_t, x_t]), both([alpha, alpha]), both([s, s]), prediction), 2)
    return jax.lax.stop_gradient(x0_u + expand_to(w, x0_u) * (x0_c - x0_u))


def distillation_step(state, frozen: dict, batch: dict, key: jax.Array, spec):
    """One batch: the student's update, then the discriminator's (see the module docstring). Returns the
    next `AdversarialState` and scalar metrics."""
    objective, models, config = spec.objective, spec.models, spec.config
    prediction = config.diffusion.prediction
    table = jnp.asarray(alphas_cumprod(config.diffusion))
    k_vae, k_student, k_t, k_eps, k_w, k_d, k_deps = jax.random.split(key, 7)
    d = state.discriminator
    heads = ProjectedDiscriminator(objective.discriminator)
    b = batch["images"].shape[0] if "images" in batch else batch["latent_moments"].shape[0]

    def unet_fn(params, x, t, context, y):
        out = UNet(models.unet).apply({"params": params}, x, t, context, y)
        return out.astype(jnp.float32)

    def pixels(latents):
        return (
            first_stage(models.vae)
            .apply({"params": frozen["vae"]}, from_latents(latents, models.vae), method="decode")
            .astype(jnp.float32)
        )

    def features(x0, t, eps, cond):
        return unet_feature_tokens(
            objective.unet, frozen["teacher"], renoise(x0, t, table, eps), t, cond.context, cond.y,
            objective.feature_names,
        )  # fmt: skip

    def loss_fn(params):
        everything = model_params(frozen, params, None)
        x0, cond = encode_batch(models, everything, batch, k_vae)
        x_s, s, alpha_s, sigma_s = student_inputs(objective, table, x0, k_student)
        x_theta = vp_denoised(unet_fn(everything["unet"], x_s, s, cond.context, cond.y), x_s, alpha_s, sigma_s,
                              prediction)  # fmt: skip
        t = jax.random.randint(k_t, (b,), *objective.teacher_t)
        x_t = renoise(jax.lax.stop_gradient(x_theta), t, table, jax.random.normal(k_eps, x0.shape, jnp.float32))
        w = jax.random.uniform(k_w, (b,), minval=objective.guidance[0], maxval=objective.guidance[1])
        target = teacher_x0(objective, unet_fn, frozen["teacher"], x_t, t, table, cond, w, prediction)
        ab_t = table[t]
        c_t = c_weight(objective.weighting, jnp.sqrt(ab_t), jnp.sqrt(1.0 - ab_t))
        per_example = jnp.mean(jnp.square(pixels(x_theta) - pixels(target)), axis=(1, 2, 3))
        distill = jnp.mean(c_t * per_example)
        aux = {"distill_loss": distill, "t_student_mean": s.astype(jnp.float32).mean(),
               "x0": jax.lax.stop_gradient(x0), "x_theta": jax.lax.stop_gradient(x_theta), "cond": cond}  # fmt: skip
        loss = objective.distill_weight * distill
        spectral = d.collections
        if objective.adversarial:
            t_d = jax.random.randint(k_d, (b,), *objective.disc_t)
            eps_d = jax.random.normal(k_deps, x0.shape, jnp.float32)
            fake = features(x_theta, t_d, eps_d, cond)
            pooled = cond.y[:, : objective.pooled_dim]
            logits, spectral = heads.apply({"params": d.params, **d.collections}, fake, pooled, train=True,
                                           mutable=list(d.collections))  # fmt: skip
            g_loss = generator_hinge_loss(logits)
            loss = loss + objective.adversarial_weight * g_loss
            aux |= {"g_loss": g_loss, "t_d": t_d, "eps_d": eps_d, "fake": [jax.lax.stop_gradient(f) for f in fake]}
        aux["spectral"] = dict(spectral)
        return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    params, opt_state, moved = optimiser_step(spec.tx, state.params, state.opt_state, grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": spec.lr_schedule(state.updates),
               "distill_loss": aux["distill_loss"], "t_mean": aux["t_student_mean"]}  # fmt: skip
    collections = aux["spectral"]
    if objective.adversarial:
        real = features(aux["x0"], aux["t_d"], aux["eps_d"], aux["cond"])
        pooled = aux["cond"].y[:, : objective.pooled_dim]

        def d_loss_fn(d_params):
            def logits_fn(f):
                out, c = heads.apply({"params": d_params, **collections}, f, pooled, train=True,
                                     mutable=list(collections))  # fmt: skip
                return out, c

            r1, real_logits, c = r1_penalty(logits_fn, real, objective.r1_gamma)
            fake_logits, c = heads.apply({"params": d_params, **c}, aux["fake"], pooled, train=True, mutable=list(c))
            hinge = discriminator_hinge_loss(real_logits, fake_logits)
            accuracy = discriminator_accuracy(real_logits, fake_logits)
            return hinge + r1, (hinge, r1, accuracy, dict(c))

        (d_loss, (hinge, r1, accuracy, collections)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d.params)
        d, finite, d_grad_norm = discriminator_update(objective.tx, d, d_grads, collections, d_loss, finite)
        metrics |= {"g_loss": aux["g_loss"], "d_loss": hinge, "r1": r1, "d_grad_norm": d_grad_norm,
                    "d_lr": objective.lr_schedule(state.updates), "d_accuracy_real": accuracy["real"],
                    "d_accuracy_fake": accuracy["fake"]}  # fmt: skip
    else:
        d = select(finite, d.replace(collections=collections), d)
    new, common = advance(state, finite, params, opt_state, moved, config.ema)
    return new.replace(discriminator=d), metrics | common
