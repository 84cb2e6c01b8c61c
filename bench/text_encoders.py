"""Text encoders: the jitted Flax CLIP-L and bigG vs transformers, full size, random weights, fp32.

    python bench/text_encoders.py [--batch 8] [--rounds 5]

Both frameworks live in one process (bigG is 2.8 GB in fp32, so both copies fit) and alternate call by
call; the summary quotes medians. The timed call is one encoder forward on a batch of 77-token rows.
"""

import argparse
import os
import statistics
import time

import jax
import numpy as np
import torch
import transformers

from sdxl_jax.models.clip import CLIPTextConfig, CLIPTextModel, abstract_params


def torch_model(cfg: CLIPTextConfig) -> torch.nn.Module:
    config = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        hidden_act=cfg.activation, projection_dim=cfg.projection_dim or cfg.hidden_size, eos_token_id=2,
    )  # fmt: skip
    cls = transformers.CLIPTextModel if cfg.projection_dim is None else transformers.CLIPTextModelWithProjection
    return cls(config).eval()


def flax_params(cfg: CLIPTextConfig, seed: int = 0):
    abstract = jax.tree_util.tree_map(lambda b: b.value, abstract_params(cfg), is_leaf=lambda b: hasattr(b, "value"))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: 0.02 * rng.standard_normal(s.shape, dtype=np.float32), abstract)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, cfg: CLIPTextConfig, batch: int, rounds: int) -> None:
    ids = np.random.default_rng(0).integers(1, 49000, (batch, 77)).astype(np.int32)
    ids[:, 0], ids[:, 20] = 49406, 49407
    params = jax.device_put(flax_params(cfg))
    forward = jax.jit(lambda p, i: CLIPTextModel(cfg).apply({"params": p}, i).hidden_states[-2])
    start = time.perf_counter()
    forward(params, ids).block_until_ready()
    compile_s = time.perf_counter() - start
    model, ids_t = torch_model(cfg), torch.from_numpy(ids).long()

    def run_torch():
        with torch.no_grad():
            model(ids_t, output_hidden_states=True)

    run_torch()  # warm-up
    jax_times, torch_times = [], []
    for _ in range(rounds):
        jax_times.append(timed(lambda: forward(params, ids).block_until_ready()))
        torch_times.append(timed(run_torch))
    j, t = statistics.median(jax_times), statistics.median(torch_times)
    print(f"{name}: batch {batch} x 77 tokens: jax {j * 1e3:.0f} ms, transformers {t * 1e3:.0f} ms, "
          f"ratio {j / t:.2f} (compile {compile_s:.1f} s)", flush=True)  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads, jax {jax.devices()[0]}")
    bench("CLIP ViT-L/14", CLIPTextConfig.clip_vit_l14(), args.batch, args.rounds)
    bench("OpenCLIP ViT-bigG/14", CLIPTextConfig.openclip_vit_bigg14(), args.batch, args.rounds)


if __name__ == "__main__":
    main()
