"""The Flax CLIP text encoders compute what transformers' CLIPTextModel(WithProjection) computes
(CPU, fp32, perturbed random weights copied across), and the converter is exact in both directions."""

import jax
import numpy as np
import pytest
import torch
import transformers

from sdxl_jax.convert import load_text_encoder
from sdxl_jax.convert.text_encoder import (
    TEXT_MODEL_PREFIX,
    text_encoder_config_from_transformers,
    text_encoder_params_from_transformers,
    text_encoder_params_to_transformers,
)
from sdxl_jax.models.clip import CLIPTextModel, end_token_positions
from tests.helpers.torch_reference import perturb_, state_dict_numpy

VOCAB, MAX_LEN, BOS = 64, 16, 62
LEGACY_EOS = 2  # transformers: pool at argmax(ids), whose end token is the largest id (here VOCAB - 1)
EOS = 50  # any other eos_token_id: pool at its first occurrence


def make_reference(cls, activation: str, eos_token_id: int, seed: int = 0):
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, max_position_embeddings=MAX_LEN, hidden_size=32, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, hidden_act=activation, projection_dim=24,
        bos_token_id=BOS, eos_token_id=eos_token_id, pad_token_id=1,
    )  # fmt: skip
    config.architectures = [cls.__name__]  # what save_pretrained writes; the converter reads it
    torch.manual_seed(seed)
    return perturb_(cls(config), seed)


def make_ids(eos_token_id: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Tokenizer-like rows `[BOS, tokens..., end, padding...]` with varied end positions.

    Legacy rule: the end token is the largest id, padding alternates between the end token itself
    (CLIP-L's tokenizer) and 0 (bigG's). First-occurrence rule: tokens above the end id occur before
    it, and padding repeats the end id, so argmax and "last occurrence" would both pick wrongly.
    """
    rng = np.random.default_rng(seed)
    end = VOCAB - 1 if eos_token_id == LEGACY_EOS else eos_token_id
    ids = np.zeros((batch, length), np.int32)
    for b in range(batch):
        n = int(rng.integers(2, length - 1))  # end token at position n
        tokens = rng.integers(3, VOCAB - 1, n - 1)
        ids[b, 1:n] = np.where(tokens == end, 3, tokens)
        if eos_token_id != LEGACY_EOS:
            ids[b, 1] = VOCAB - 1  # an id above the end id, which argmax would pick
        ids[b, 0], ids[b, n] = BOS, end
        ids[b, n + 1 :] = end if (b % 2 == 0 or eos_token_id != LEGACY_EOS) else 0
    return ids


def reference_outputs(model, ids: np.ndarray) -> dict:
    text_model = getattr(model, "text_model", model)
    with torch.no_grad():
        out = text_model(torch.from_numpy(ids).long(), output_hidden_states=True)
        text_embeds = model(torch.from_numpy(ids).long()).text_embeds if text_model is not model else None
    return dict(
        hidden_states=[h.numpy() for h in out.hidden_states],
        last_hidden_state=out.last_hidden_state.numpy(),
        pooled=out.pooler_output.numpy(),
        text_embeds=None if text_embeds is None else text_embeds.numpy(),
    )


def assert_outputs_match(cfg, params, ids: np.ndarray, ref: dict, atol: float = 1e-5):
    ours = jax.jit(CLIPTextModel(cfg).apply)({"params": params}, ids)
    assert len(ours.hidden_states) == len(ref["hidden_states"]) == cfg.num_layers + 1
    pairs = [(f"hidden_states[{i}]", o, r) for i, (o, r) in enumerate(zip(ours.hidden_states, ref["hidden_states"]))]
    pairs += [(name, getattr(ours, name), ref[name]) for name in ("last_hidden_state", "pooled")]
    if cfg.projection_dim is None:
        assert ours.text_embeds is None and ref["text_embeds"] is None
    else:
        pairs.append(("text_embeds", ours.text_embeds, ref["text_embeds"]))
    for name, o, r in pairs:
        assert np.abs(r).max() > 0.01, name  # a degenerate reference would make the comparison vacuous
        np.testing.assert_allclose(np.asarray(o), r, rtol=0, atol=atol, err_msg=name)


CASES = {
    "clipL-like": (transformers.CLIPTextModel, "quick_gelu", LEGACY_EOS, MAX_LEN),
    "bigG-like": (transformers.CLIPTextModelWithProjection, "gelu", LEGACY_EOS, 11),  # shorter: positions sliced
    "gelu-first-eos": (transformers.CLIPTextModel, "gelu", EOS, 9),
    "projection-first-eos": (transformers.CLIPTextModelWithProjection, "quick_gelu", EOS, MAX_LEN),
}


@pytest.mark.parametrize("case", CASES)
def test_text_encoder_matches_transformers(case):
    cls, activation, eos, length = CASES[case]
    model = make_reference(cls, activation, eos)
    cfg = text_encoder_config_from_transformers(model.config.to_dict())
    assert (cfg.activation, cfg.eos_token_id) == (activation, None if eos == LEGACY_EOS else eos)
    assert cfg.projection_dim == (24 if cls is transformers.CLIPTextModelWithProjection else None)
    params = text_encoder_params_from_transformers(state_dict_numpy(model), cfg)
    ids = make_ids(eos, batch=4, length=length)
    # The rule matters for these ids: the other rule would pool elsewhere in some row.
    other_rule = end_token_positions(ids, EOS if cfg.eos_token_id is None else None)
    assert (np.asarray(other_rule) != np.asarray(end_token_positions(ids, cfg.eos_token_id))).any()
    assert_outputs_match(cfg, params, ids, reference_outputs(model, ids))


def test_explicit_eot_positions_override_the_rule():
    model = make_reference(transformers.CLIPTextModelWithProjection, "gelu", LEGACY_EOS)
    cfg = text_encoder_config_from_transformers(model.config.to_dict())
    params = text_encoder_params_from_transformers(state_dict_numpy(model), cfg)
    ids = make_ids(LEGACY_EOS, batch=3, length=MAX_LEN, seed=1)
    apply = jax.jit(CLIPTextModel(cfg).apply)
    by_rule = apply({"params": params}, ids)
    positions = np.asarray(end_token_positions(ids, None))
    np.testing.assert_array_equal(apply({"params": params}, ids, positions).text_embeds, by_rule.text_embeds)
    shifted = apply({"params": params}, ids, positions - 1)
    expected = np.asarray(by_rule.last_hidden_state)[np.arange(3), positions - 1]
    np.testing.assert_array_equal(shifted.pooled, expected)
    assert np.isnan(apply({"params": params}, ids, np.array([0, MAX_LEN, 1])).pooled[1]).all()  # no silent clamp


@pytest.mark.parametrize("cls", [transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection])
def test_both_key_forms_import_and_export_exactly(cls):
    model = make_reference(cls, "gelu", LEGACY_EOS, seed=2)
    cfg = text_encoder_config_from_transformers(model.config.to_dict())
    native = state_dict_numpy(model)  # transformers 5.23: CLIPTextModel unprefixed, WithProjection prefixed
    assert any(k.startswith(TEXT_MODEL_PREFIX) for k in native) == (cls is transformers.CLIPTextModelWithProjection)
    strip = lambda k: k.removeprefix(TEXT_MODEL_PREFIX)
    unprefixed = {strip(k): v for k, v in native.items()}
    prefixed = {(k if k.startswith("text_projection.") else TEXT_MODEL_PREFIX + k): v for k, v in unprefixed.items()}
    for form, state in ((True, prefixed), (False, unprefixed)):
        params = text_encoder_params_from_transformers(state, cfg)
        jax.tree.map(np.testing.assert_array_equal, params, text_encoder_params_from_transformers(native, cfg))
        back = text_encoder_params_to_transformers(params, cfg, prefixed=form)
        assert back.keys() == state.keys()
        for key, value in state.items():
            assert back[key].dtype == value.dtype
            np.testing.assert_array_equal(back[key], value, err_msg=key)
    # The export loads into transformers itself, strictly.
    native_form = cls is transformers.CLIPTextModelWithProjection
    exported = text_encoder_params_to_transformers(params, cfg, prefixed=native_form)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)


def test_save_pretrained_folders_load(tmp_path):
    """A sharded `text_encoder_2/` and a single-file `text_encoder/` written by transformers itself."""
    big = make_reference(transformers.CLIPTextModelWithProjection, "gelu", LEGACY_EOS, seed=3)
    big.save_pretrained(tmp_path / "text_encoder_2", max_shard_size="20KB")
    assert (tmp_path / "text_encoder_2" / "model.safetensors.index.json").exists()
    small = make_reference(transformers.CLIPTextModel, "quick_gelu", LEGACY_EOS, seed=4)
    small.save_pretrained(tmp_path / "text_encoder")
    ids = make_ids(LEGACY_EOS, batch=2, length=MAX_LEN, seed=3)
    cfg, params = load_text_encoder(tmp_path / "text_encoder_2", remat="full")
    assert (cfg.projection_dim, cfg.remat, cfg.eos_token_id) == (24, "full", None)
    assert_outputs_match(cfg, params, ids, reference_outputs(big, ids))
    cfg, params = load_text_encoder(tmp_path / "text_encoder")
    assert (cfg.projection_dim, cfg.activation) == (None, "quick_gelu")
    assert_outputs_match(cfg, params, ids, reference_outputs(small, ids))
