"""The trainer: one `train(config, workdir)` for every objective, and the pieces a run is made of.

loop.py         train(config, workdir): the life of a run, top to bottom
config.py       the config skeleton every training config fills in, and `check`
state.py        the networks (`Models`), their params (random or loaded) and the sharded `TrainState`
optim.py        optimisers (AdamW, Muon), LR schedules, EMA decay
objective.py    the diffusion objective: a batch -> latents and conditioning -> the weighted loss
autoencoder.py  the autoencoder objective: the VAE and a PatchGAN trained as ldm trains its first stage
autoencoder_losses.py  ldm's first-stage loss terms as pure functions (NLL, KL, adaptive weight, hinge)
lora.py         LoRA adapters: targets, init, the kernels merged inside the step
step.py         `StepSpec` (what a compiled step needs), `OBJECTIVES`, and the jitted, donated train step
data.py         the data source a config names, host batches -> global arrays
checkpoint.py   Orbax checkpoints of the state and the data iterator; SIGTERM -> save and stop
metrics.py      console, metrics.jsonl and TensorBoard (tensorboard.py writes the event files)
validation.py   sampling fixed prompts (or reconstructing fixed images) with the EMA params during a run
image_quality.py  PSNR and SSIM of reconstructions
export.py       the finished run as a checkpoint others can open
memory_plan.py  `python -m sdxl_jax.plan`: compile the step or the sampling program ahead of time for
                a target (TPU topology or fake CPU devices), print memory per device, fit, roofline
targets.py      compile targets: TPU topologies with no TPU present, fake CPU devices; each chip's peaks
hlo_traffic.py  HBM traffic of a compiled program, loops times their trip counts (the roofline's bytes)
flops.py        model FLOPs of a traced program (for MFU and the roofline)
huge_pages.py   restart with glibc malloc on transparent huge pages (CPU runs)
"""
