"""Whole-pipeline loading: diffusers folders (as diffusers' own save_pretrained writes them) load into
components whose outputs equal diffusers' modules, and the project's Orbax format round-trips exactly."""

import jax
import numpy as np
import pytest
import torch

from sdxl_jax.conditioning import vector_conditioning
from sdxl_jax.convert import pipeline_weights as pw
from sdxl_jax.convert.mapping import ConversionError
from sdxl_jax.models import CLIPTextModel, UNet
from sdxl_jax.models.vae import AutoencoderKL
from tests.helpers.tiny_pipeline import POOLED, TIME_ID_DIM, base_pipeline, refiner_pipeline
from tests.helpers.torch_reference import from_nchw, to_nchw


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    base, refiner = base_pipeline(), refiner_pipeline()
    base.save_pretrained(root / "base", safe_serialization=True)
    refiner.save_pretrained(root / "refiner", safe_serialization=True)
    return root, base, refiner


def assert_close(ours, ref, rel=1e-5):
    scale = float(np.abs(ref).max())
    assert scale > 0.01
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=rel * scale)


def test_base_folder_components_compute_what_diffusers_modules_compute(saved):
    root, pipe, _ = saved
    weights = pw.load_diffusers(root / "base")
    assert weights.model == "base" and set(weights.components) == set(pw.MODEL_COMPONENTS["base"])
    assert weights.num_parameters() == sum(
        sum(p.numel() for p in getattr(pipe, name).parameters()) for name in pw.MODEL_COMPONENTS["base"]
    )
    rng = np.random.default_rng(0)
    ids = np.full((2, 77), 49407, np.int32)
    ids[:, 0], ids[0, 1:4], ids[1, 1:9] = 49406, [320, 1125, 539], rng.integers(300, 40000, 8)
    for name in ("text_encoder", "text_encoder_2"):
        cfg, params = weights.components[name]
        with torch.no_grad():
            ref = getattr(pipe, name)(torch.from_numpy(ids).long(), output_hidden_states=True).hidden_states[-2].numpy()
        assert_close(CLIPTextModel(cfg).apply({"params": params}, ids).hidden_states[-2], ref)

    cfg, params = weights.components["unet"]
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, cfg.context_dim)).astype(np.float32)
    pooled, time_ids = (
        rng.standard_normal((1, POOLED)).astype(np.float32),
        np.array([[768, 1024, 0, 64, 1024, 1024]], np.float32),
    )
    with torch.no_grad():
        cond = dict(text_embeds=torch.from_numpy(pooled), time_ids=torch.from_numpy(time_ids))
        ref = pipe.unet(to_nchw(x), torch.tensor([500.0]), torch.from_numpy(ctx), added_cond_kwargs=cond).sample
    y = vector_conditioning(pooled, time_ids, dim=TIME_ID_DIM)
    assert_close(UNet(cfg).apply({"params": params}, x, np.array([500.0], np.float32), ctx, y), from_nchw(ref))

    cfg, params = weights.components["vae"]
    z = rng.standard_normal((1, 6, 5, 4)).astype(np.float32)
    with torch.no_grad():
        ref = from_nchw(pipe.vae.decode(to_nchw(z)).sample)
    assert_close(AutoencoderKL(cfg).apply({"params": params}, z, method=AutoencoderKL.decode), ref)


def test_refiner_folder_is_detected_and_loads(saved):
    root, _, refiner = saved
    weights = pw.load_diffusers(root / "refiner")
    assert weights.model == "refiner" and set(weights.components) == {"unet", "vae", "text_encoder_2"}
    assert weights.config("unet").adm_in_channels == refiner.unet.config.projection_class_embeddings_input_dim


def test_variant_and_dtype_cast(saved, tmp_path):
    _, pipe, _ = saved
    pipe.to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16", safe_serialization=True)
    pipe.to(torch.float32)
    weights16 = pw.load_diffusers(tmp_path / "fp16", variant="fp16")  # params keep the stored dtype
    assert {x.dtype for x in jax.tree_util.tree_leaves(weights16.params("unet"))} == {np.dtype(np.float16)}
    assert weights16.config("unet").param_dtype == "float16" and weights16.config("unet").dtype == "float32"
    weights32 = pw.load_diffusers(tmp_path / "fp16", variant="fp16", dtype="fp32")
    assert {x.dtype for x in jax.tree_util.tree_leaves(weights32.params("text_encoder"))} == {np.dtype(np.float32)}
    got = weights16.params("unet")["conv_in"]["kernel"]
    np.testing.assert_array_equal(got, pipe.unet.conv_in.weight.detach().half().numpy().transpose(2, 3, 1, 0))
    with pytest.raises(FileNotFoundError, match=r"no diffusion_pytorch_model.bf16.safetensors"):
        pw.load_diffusers(tmp_path / "fp16", variant="bf16")


def test_project_format_round_trips_exactly(saved, tmp_path):
    root, _, _ = saved
    weights = pw.load_diffusers(root / "base")
    pw.save_project(weights, tmp_path / "ckpt")
    assert pw.is_project(tmp_path / "ckpt")
    again = pw.load_project(tmp_path / "ckpt")
    assert again.model == "base" and again.metadata["source_format"] == "diffusers"
    for name, (cfg, params) in weights.components.items():
        assert again.config(name) == cfg
        jax.tree.map(np.testing.assert_array_equal, again.params(name), params)
    bf16 = pw.load_project(tmp_path / "ckpt", dtype="bf16")
    assert bf16.config("vae").param_dtype == "bfloat16"
    assert {x.dtype.name for x in jax.tree_util.tree_leaves(bf16.params("vae"))} == {"bfloat16"}
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        pw.save_project(weights, tmp_path / "ckpt")


def test_failed_save_leaves_nothing_behind(saved, tmp_path, monkeypatch):
    root, _, _ = saved
    weights = pw.load_diffusers(root / "refiner")
    real_dumps = pw.json.dumps

    def fail(*args, **kwargs):  # the index is written last: fail right before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(pw.json, "dumps", fail)
    with pytest.raises(KeyboardInterrupt):
        pw.save_project(weights, tmp_path / "ckpt")
    monkeypatch.setattr(pw.json, "dumps", real_dumps)
    assert list(tmp_path.iterdir()) == []


def test_project_params_are_checked_against_their_config(saved, tmp_path):
    root, _, _ = saved
    weights = pw.load_diffusers(root / "refiner")
    del weights.params("vae")["decoder"]["conv_out"]
    pw.save_project(weights, tmp_path / "ckpt")
    with pytest.raises(
        ConversionError, match=r"vae params do not match its config:\n  missing \(2\):\n    decoder/conv_out/bias"
    ):
        pw.load_project(tmp_path / "ckpt")


def _placement(dtype="bfloat16"):
    from jax.sharding import NamedSharding, PartitionSpec

    whole = NamedSharding(jax.make_mesh((1,), ("data",)), PartitionSpec())
    shardings = lambda name, cfg: jax.tree.map(lambda _: whole, pw.nn.meta.unbox(pw.ABSTRACT_PARAMS[name](cfg)))
    return pw.Placement(shardings, dict.fromkeys(("unet", "text_encoder", "text_encoder_2"), dtype))


def test_placed_loading_gives_device_arrays_equal_to_the_host_path(saved, tmp_path):
    """Every reader with a Placement: each leaf a device array in the component's target dtype (the VAE
    keeps its own), equal to the numpy load cast the same way; tensors read one at a time, each once."""
    from sdxl_jax.convert import export, files

    root, _, _ = saved
    host = pw.load_diffusers(root / "base")
    pw.save_project(host, tmp_path / "ckpt")
    export.export_single_file(host, tmp_path / "base.safetensors")
    reads = []
    real = files.LazySafetensors.__getitem__
    counting = lambda self, key: reads.append((self.path.name, key)) or real(self, key)
    for source in (root / "base", tmp_path / "ckpt", tmp_path / "base.safetensors"):
        reads.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(files.LazySafetensors, "__getitem__", counting)
            if source.suffix == ".safetensors":  # a tiny model: its own layout, not SDXL's
                layout = export.single_file_layout(host)
                placed = pw.load_single_file(source, layout=layout, placement=_placement())
            else:
                placed = pw.load_pipeline_weights(source, model="base", placement=_placement())
        if source.suffix == ".safetensors":
            in_proj = sum(1 for _, k in reads if "in_proj" in k)  # bigG's q/k/v stacked: one read for the three
            assert len(reads) == len(set(reads)), "a tensor was read twice"
            assert in_proj == 2 * host.config("text_encoder_2").num_layers
        for name in host.components:
            want_dtype = host.config(name).param_dtype if name == "vae" else "bfloat16"
            for got, want in zip(jax.tree.leaves(placed.params(name)), jax.tree.leaves(host.params(name)), strict=True):
                assert isinstance(got, jax.Array) and got.dtype == want_dtype, (source, name, got.dtype)
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(want_dtype))


def test_placed_project_loading_still_checks_the_params(saved, tmp_path):
    root, _, _ = saved
    weights = pw.load_diffusers(root / "refiner")
    del weights.params("vae")["decoder"]["conv_out"]
    pw.save_project(weights, tmp_path / "ckpt")
    with pytest.raises(ConversionError, match=r"vae params do not match its config:\n  missing \(2\)"):
        pw.load_project(tmp_path / "ckpt", placement=_placement())
