"""Diffusion math as pure functions: schedules -> denoisers -> guidance -> samplers (+ training losses).

How a pipeline uses it (inside its own `jax.jit`, with params and conditioning as traced arguments):

    table = schedules.scaled_linear_table(diffusers_float32=True)   # float64 (default): sgm's table
    sched = schedules.diffusers_euler(table, 50)                      # SDXL's default: leading, offset 1
    model = lambda x_in, t, c: unet.apply({"params": params}, x_in, t, c.context, c.y)
    denoise = guidance.classifier_free_guidance(denoisers.eps_denoiser(model), use_cfg=True)
    x = noise * sched.init_noise_sigma
    latent = samplers.sample(denoise, x, sched.sigmas, sched.timesteps, "euler", key,
                             guidance.Guided(cond, uncond, scale))
"""

from sdxl_jax.diffusion import denoisers, guidance, losses, samplers, schedules

__all__ = ["denoisers", "guidance", "losses", "samplers", "schedules"]
