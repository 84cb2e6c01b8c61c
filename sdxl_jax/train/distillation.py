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
     guiding eps at a fixed x_t), stop-gradient. With the "nfsd" weighting a third branch on NFSD's
     negative prompt (`frozen["nfsd_negative"]`), and the target is NFSD's (`nfsd_target`).
  3. the distillation loss in pixel space (ADD §3.1): both x0 estimates decoded by the first stage,
     the per-example mean squared difference weighted by c(t): "exponential" alpha_t (ADD's default),
     "sds" and "nfsd" alpha_t / (2 s_t); averaged over the batch.
  4. the adversarial loss (`adversarial_weight` > 0): the projected heads
     (`models/projected_discriminator.py`) on a frozen feature network's view of the student's x_theta
     and of the real x0 (`train/add_features.py`: `features = "teacher"`, the teacher UNet's encoder on
     both re-noised alike, or `"dinov2"`, ADD's DINOv2 ViT-S on both decoded, with ViT-L's embedding
     of the real image), conditioned on the pooled text (and that image embedding).
     The student's loss is `adversarial_weight * L_G + distill_weight * L_distill` (ADD: 1 and 2.5).
  5. the discriminator, after the student's update, on the same batch: the hinge loss on the real
     features and the student's (detached: the features step 4 computed), plus R1 (gamma `r1_gamma`)
     on the heads' real inputs (`train/adversarial.py`); its own optimiser.

The spectral-norm power iteration runs once per training-mode call of the heads, as in torch: the
student's D(fake) and the discriminator step's D(real) and D(fake) each move it, in that order.
A non-finite loss or gradient of either update leaves the whole state as it was.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sdxl_jax.conditioning import encode_text
from sdxl_jax.diffusion import losses
from sdxl_jax.diffusion.parameterisation import expand_to, vp_denoised
from sdxl_jax.models import UNet, from_latents
from sdxl_jax.models.pixel_space import first_stage
from sdxl_jax.models.projected_discriminator import ProjectedDiscriminator, ProjectedDiscriminatorConfig
from sdxl_jax.models.projected_discriminator import abstract_variables as abstract_heads
from sdxl_jax.tokenizer import TokenPair, tokenize_pair
from sdxl_jax.train.add_features import Dinov2Features, TeacherFeatures, feature_network
from sdxl_jax.train.adversarial import (
    discriminator_accuracy,
    discriminator_hinge_loss,
    generator_hinge_loss,
    r1_penalty,
)
from sdxl_jax.train.objective import alphas_cumprod, encode_batch
from sdxl_jax.train.optim import advance, discriminator_update, make_optimizer, optimiser_step, select
from sdxl_jax.train.state import Models, model_params, models_from_config

DISCRIMINATOR_KEY = 400  # folded into the seed: apart from the components', LoRA's and the autoencoder's keys
WEIGHTINGS = ("exponential", "sds", "nfsd")


@dataclasses.dataclass(frozen=True, eq=False)
class DistillationObjective:
    """The ADD step's static part (`StepSpec.objective`), from `config.distillation` (`from_config`)."""

    models: Models  # the run's (the teacher and student are its UNet; NFSD reads its text encoders)
    pooled_dim: int  # the pooled text width at the front of y (`conditioning.vector_conditioning`)
    student_timesteps: tuple[int, ...]
    zero_terminal_snr: bool
    teacher_t: tuple[int, int]
    guidance: tuple[float, float]
    weighting: str
    distill_weight: float
    adversarial_weight: float
    features: TeacherFeatures | Dinov2Features  # the discriminator's feature network
    r1_gamma: float
    discriminator: ProjectedDiscriminatorConfig
    tx: optax.GradientTransformation  # the discriminator's
    lr_schedule: optax.Schedule
    nfsd_t_switch: int
    negative_tokens: TokenPair | None  # NFSD's negative prompt, `[1, 77]` ids (weighting "nfsd")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "DistillationObjective":
        d = config.distillation
        models = models_from_config(config.model)
        pooled = models.unet.adm_in_channels - models.num_time_ids * models.unet.time_id_embed_dim
        network = feature_network(config)
        heads = ProjectedDiscriminatorConfig(
            feature_channels=network.channels, c_dim=d.c_dim, text_embed_dim=pooled,
            image_embed_dim=network.image_embed_dim, kernel_size=d.kernel_size, group_size=d.group_size,
        )  # fmt: skip
        tx, lr = make_optimizer(d.discriminator_optimizer, ("discriminator",))
        negative = tokenize_pair([d.nfsd_negative_prompt]) if d.weighting == "nfsd" else None
        return cls(
            models, pooled, tuple(d.student_timesteps), d.zero_terminal_snr, (d.teacher_t_min, d.teacher_t_max),
            (d.guidance_min, d.guidance_max), d.weighting, d.distill_weight, d.adversarial_weight, network,
            d.r1_gamma, heads, tx, lr, d.nfsd_t_switch, negative,
        )  # fmt: skip

    @property
    def adversarial(self) -> bool:
        return self.adversarial_weight > 0

    # ---- the teacher (frozen) and the heads, abstract and on the devices ----

    def abstract_frozen(self, abstract_params: dict) -> dict:
        """`{"teacher": the UNet's boxed ShapeDtypeStructs}` (sharded like the student); with the
        adversarial term the feature network's own (DINOv2's `"dinov2"`, `"dinov2_image"`); with NFSD
        `"nfsd_negative"`, the negative prompt's text embedding (`{"context", "pooled"}`, replicated)."""
        out = {"teacher": abstract_params["unet"]}
        if self.adversarial:
            out |= self.features.abstract_frozen()
        if self.negative_tokens is not None:
            length = self.negative_tokens.ids_l.shape[1]
            shapes = {"context": (1, length, self.models.unet.context_dim), "pooled": (1, self.pooled_dim)}
            out["nfsd_negative"] = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
        return out

    def frozen_params(self, seed: int, shardings: dict, params: dict) -> dict:
        """`{"teacher": a copy of the run's initial UNet params}` (the student's starting point), placed
        like them (the copy is its own buffers, so the student's donation leaves it alone), and what
        `abstract_frozen` adds: the feature network's weights, NFSD's negative prompt through the run's
        text encoders."""
        copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings["teacher"])
        out = {"teacher": copy(params["unet"])}
        if self.adversarial:
            out |= self.features.frozen_params(shardings)
        if self.negative_tokens is not None:
            encoders, tokens = self.models.encoders, self.negative_tokens
            encode = lambda p: dict(zip(("context", "pooled"), encode_text(encoders(p), tokens)))
            as_f32 = lambda p: jax.tree.map(lambda x: x.astype(jnp.float32), encode(p))
            out["nfsd_negative"] = jax.jit(as_f32, out_shardings=shardings["nfsd_negative"])(params)
        return out

    def abstract_discriminator(self) -> dict:
        return abstract_heads(self.discriminator)

    def discriminator_variables(self, seed: int, shardings: dict) -> dict:
        """The heads' variables (`{"params", "spectral"}`), torch's default init from the seed."""
        cfg = self.discriminator
        features = [jnp.zeros((cfg.group_size, 1, c)) for c in cfg.feature_channels]
        text = jnp.zeros((cfg.group_size, cfg.text_embed_dim))
        image = jnp.zeros((cfg.group_size, cfg.image_embed_dim)) if cfg.image_embed_dim else None
        heads = ProjectedDiscriminator(cfg)
        init = lambda key: dict(nn.meta.unbox(heads.init(key, features, text, image, train=False)))
        return jax.jit(init, out_shardings=shardings)(jax.random.fold_in(jax.random.key(seed), DISCRIMINATOR_KEY))


# ---- the step -------------------------------------------------------------------------------------


def c_weight(weighting: str, alpha, s) -> jax.Array:
    """c(t) of the distillation loss, `[B]`: exponential alpha_t, sds and nfsd alpha_t / (2 s_t)."""
    if weighting == "exponential":
        return alpha
    if weighting in ("sds", "nfsd"):
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


def text_branches(objective, cond, negative: dict | None = None) -> list[tuple[jax.Array, jax.Array]]:
    """The teacher's (context, y) branches: the text; unconditional, the text zeroed (context and the
    pooled part of y: the model's caption-dropout input); with `negative` (`{"context": [1, L, D],
    "pooled": [1, P]}`, NFSD's negative prompt) that prompt's, the time ids kept."""
    p = objective.pooled_dim
    branches = [(cond.context, cond.y), (jnp.zeros_like(cond.context), cond.y.at[:, :p].set(0.0))]
    if negative is not None:
        context = jnp.broadcast_to(negative["context"].astype(cond.context.dtype), cond.context.shape)
        branches.append((context, cond.y.at[:, :p].set(negative["pooled"].astype(cond.y.dtype))))
    return branches


def teacher_x0s(unet_fn, teacher, x_t, t, table, branches, prediction: str) -> list[jax.Array]:
    """The teacher's x0 estimates at (x_t, t), one per (context, y) branch, from one batched call,
    stop-gradient."""
    ab = table[t]
    alpha, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    n, cat = len(branches), jnp.concatenate
    out = unet_fn(teacher, cat([x_t] * n), cat([t] * n), cat([c for c, _ in branches]), cat([y for _, y in branches]))
    x0 = vp_denoised(out, cat([x_t] * n), cat([alpha] * n), cat([s] * n), prediction)
    return [jax.lax.stop_gradient(part) for part in jnp.split(x0, n)]


def teacher_x0(objective, unet_fn, teacher, x_t, t, table, cond, w, prediction: str):
    """The guided teacher's x0 estimate at (x_t, t): `x0_u + w (x0_c - x0_u)` (`text_branches`), stop-gradient."""
    x0_c, x0_u = teacher_x0s(unet_fn, teacher, x_t, t, table, text_branches(objective, cond), prediction)
    return x0_u + expand_to(w, x0_u) * (x0_c - x0_u)


def nfsd_target(x_hat, x_t, alpha, x0_c, x0_u, x0_n, scale, t, t_switch: int):
    """NFSD's target (Katzir et al., noise-free score distillation) in x0 form, all `[B, h, w, C]` but
    alpha, scale, t `[B]`. NFSD's update direction in eps space is delta_D + scale delta_C with
    delta_C = eps_c - eps_u and delta_D = eps_u below `t_switch`, eps_u - eps_neg from it (no added-noise
    term, unlike SDS's eps_cfg - eps); as a distillation target, x_hat - (s_t / alpha_t)(that), which with
    eps_a - eps_b = -(alpha_t / s_t)(x0_a - x0_b) is
    x_hat + scale (x0_c - x0_u) + (x0_u - x_t / alpha_t below t_switch, else x0_u - x0_neg).
    With c(t) = alpha_t / (2 s_t) the gradient of c ||x_theta - target||² (a sum over latents) at
    x_hat is NFSD's direction; the step measures the distance on decoded pixels instead (ADD's choice),
    which passes it through the decoder's Jacobian and averages rather than sums."""
    e = lambda v: expand_to(v, x_hat)
    domain = jnp.where(e(t < t_switch), x0_u - x_t / e(alpha), x0_u - x0_n)
    return x_hat + e(scale) * (x0_c - x0_u) + domain


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

    def loss_fn(params):
        everything = model_params(frozen, params, None)
        x0, cond = encode_batch(models, everything, batch, k_vae)
        x_s, s, alpha_s, sigma_s = student_inputs(objective, table, x0, k_student)
        x_theta = vp_denoised(unet_fn(everything["unet"], x_s, s, cond.context, cond.y), x_s, alpha_s, sigma_s,
                              prediction)  # fmt: skip
        t = jax.random.randint(k_t, (b,), *objective.teacher_t)
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        x_t = losses.noisy_latents(jax.lax.stop_gradient(x_theta), eps, table[t])
        w = jax.random.uniform(k_w, (b,), minval=objective.guidance[0], maxval=objective.guidance[1])
        ab_t = table[t]
        if objective.weighting == "nfsd":
            branches = text_branches(objective, cond, frozen["nfsd_negative"])
            x0_c, x0_u, x0_n = teacher_x0s(unet_fn, frozen["teacher"], x_t, t, table, branches, prediction)
            target = nfsd_target(jax.lax.stop_gradient(x_theta), x_t, jnp.sqrt(ab_t), x0_c, x0_u, x0_n, w, t,
                                 objective.nfsd_t_switch)  # fmt: skip
        else:
            target = teacher_x0(objective, unet_fn, frozen["teacher"], x_t, t, table, cond, w, prediction)
        c_t = c_weight(objective.weighting, jnp.sqrt(ab_t), jnp.sqrt(1.0 - ab_t))
        fake_pixels = pixels(x_theta)
        per_example = jnp.mean(jnp.square(fake_pixels - pixels(target)), axis=(1, 2, 3))
        distill = jnp.mean(c_t * per_example)
        aux = {"distill_loss": distill, "t_student_mean": s.astype(jnp.float32).mean(),
               "x0": jax.lax.stop_gradient(x0), "cond": cond}  # fmt: skip
        loss = objective.distill_weight * distill
        spectral = d.collections
        if objective.adversarial:
            network = objective.features
            real_pixels = jax.lax.stop_gradient(pixels(x0)) if network.needs_pixels else None
            pure_noise = (s == objective.student_timesteps[-1]) & objective.zero_terminal_snr
            image = network.image_embed(frozen, real_pixels, pure_noise)
            fake = network.features(frozen, x_theta, fake_pixels, cond, (k_d, k_deps))
            pooled = cond.y[:, : objective.pooled_dim]
            logits, spectral = heads.apply({"params": d.params, **d.collections}, fake, pooled, image, train=True,
                                           mutable=list(d.collections))  # fmt: skip
            g_loss = generator_hinge_loss(logits)
            loss = loss + objective.adversarial_weight * g_loss
            aux |= {"g_loss": g_loss, "real_pixels": real_pixels, "image": image,
                    "fake": [jax.lax.stop_gradient(f) for f in fake]}  # fmt: skip
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
        real = objective.features.features(frozen, aux["x0"], aux["real_pixels"], aux["cond"], (k_d, k_deps))
        pooled, image = aux["cond"].y[:, : objective.pooled_dim], aux["image"]

        def d_loss_fn(d_params):
            def logits_fn(f):
                out, c = heads.apply({"params": d_params, **collections}, f, pooled, image, train=True,
                                     mutable=list(collections))  # fmt: skip
                return out, c

            r1, real_logits, c = r1_penalty(logits_fn, real, objective.r1_gamma)
            fake_logits, c = heads.apply({"params": d_params, **c}, aux["fake"], pooled, image, train=True,
                                         mutable=list(c))  # fmt: skip
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
