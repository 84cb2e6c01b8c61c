"""`sdxl-convert` / `python -m sdxl_jax.convert`: conversions in every direction from a tiny diffusers
refiner, progress and summary output, and a one-line error with exit code != 0 for every bad input."""

import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from sdxl_jax.convert import pipeline_weights as pw
from sdxl_jax.convert.cli import ProgressBar, main
from sdxl_jax.convert.export import WEIGHTS_FILES, Progress
from tests.helpers.tiny_pipeline import refiner_pipeline

SUMMARY = re.compile(r"-> (\S+) \((\S+)\): (\d+) tensors, ([\d,]+) parameters, \d+\.\d\d GB in \d+\.\d s$")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "refiner"
    refiner_pipeline().save_pretrained(path, safe_serialization=True)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def source_files(folder) -> dict[str, dict[str, np.ndarray]]:
    return {name: load_file(folder / name / WEIGHTS_FILES[name]) for name in pw.MODEL_COMPONENTS["refiner"]}


def test_converts_to_jax_and_back_to_both_pytorch_layouts(folder, tmp_path, capsys):
    source = source_files(folder)
    code, out, err = run(capsys, folder, tmp_path / "ckpt")
    assert code == 0 and "reading" in err and "unet: 618 tensors" in err
    (path, target, tensors, parameters), = [SUMMARY.search(line).groups() for line in out.splitlines()]  # fmt: skip
    assert (path, target, int(tensors)) == (str(tmp_path / "ckpt"), "jax", 919)
    assert int(parameters.replace(",", "")) == sum(v.size for state in source.values() for v in state.values())

    code, out, err = run(
        capsys, tmp_path / "ckpt", tmp_path / "sdxl.safetensors", "--to", "single-file", "--dtype=fp16"
    )
    assert code == 0 and "text_encoder_2 written: 907/907 tensors" in err
    written = load_file(tmp_path / "sdxl.safetensors")
    assert len(written) == int(SUMMARY.search(out).group(3)) == 907
    assert {v.dtype.name for v in written.values()} == {"float16"}
    want = source["unet"]["conv_out.weight"].astype(np.float16)
    np.testing.assert_array_equal(written["model.diffusion_model.out.2.weight"], want)

    code, out, _ = run(capsys, tmp_path / "ckpt", tmp_path / "diffusers", "--to", "diffusers", "--model", "refiner")
    assert code == 0 and SUMMARY.search(out).group(2) == "diffusers"
    for name, state in source_files(tmp_path / "diffusers").items():  # bit-exact (bigG's keys were prefixed already)
        assert sorted(state) == sorted(source[name])
        assert all(np.array_equal(v, source[name][k]) for k, v in state.items())


class CodePayload:
    """Unpickling this would create `path`: a stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def bad_inputs(tmp_path, folder) -> dict[str, tuple[list, str]]:
    """case -> (argv, what the error line says)."""
    save_file({"a": np.zeros(1000, np.float32)}, tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    sd15 = ["cond_stage_model.transformer.text_model.final_layer_norm.bias", "model.diffusion_model.out.2.bias"]
    save_file({k: np.zeros(2, np.float16) for k in sd15}, tmp_path / "sd15.safetensors")
    refiner = ["conditioner.embedders.0.model.ln_final.bias", "model.diffusion_model.out.2.bias"]  # detected by name
    save_file({k: np.zeros(2, np.float16) for k in refiner}, tmp_path / "refiner.safetensors")
    payload = {"state_dict": {"w": torch.zeros(2)}, "hook": CodePayload(tmp_path / "pwned")}
    torch.save(payload, tmp_path / "payload.ckpt")
    (tmp_path / "taken").mkdir()
    out, f = tmp_path / "out", lambda name: tmp_path / name
    return {
        "missing": ([f("nope.safetensors"), out], r"no such file or folder: .*nope.safetensors"),
        "truncated": ([f("truncated.safetensors"), out], r"not a readable safetensors file .* truncated or corrupt"),
        "garbage": ([f("garbage.safetensors"), out], r"not a readable safetensors file"),
        "sd15": ([f("sd15.safetensors"), out], r"looks like an SD 1.x checkpoint .* only SDXL base/refiner"),
        "payload": ([f("payload.ckpt"), out], r"refused or unreadable as a weights-only PyTorch pickle"),
        "wrong model": (
            [f("refiner.safetensors"), out, "--model", "base"],
            r"is an SDXL refiner checkpoint, not a base",
        ),
        "existing": ([folder, f("taken")], r"taken exists; refusing to overwrite it"),
        "variant": ([f("sd15.safetensors"), out, "--variant", "fp16"], r"--variant applies to a diffusers folder"),
        "suffix": ([folder, f("out.ckpt"), "--to", "single-file"], r"out.ckpt: a single-file output must be named"),
    }


def test_every_bad_input_is_one_line_and_a_nonzero_exit(folder, tmp_path, capsys):
    for case, (argv, message) in bad_inputs(tmp_path, folder).items():
        code, out, err = run(capsys, *argv)
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert code == 1 and out == "", case
        assert len(errors) == 1 and errors[0] == err.splitlines()[-1], (case, err)
        assert errors[0].startswith("sdxl-convert: error: ") and re.search(message, errors[0]), (case, errors[0])
        assert "Traceback" not in err, case
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists(), case
    assert not (tmp_path / "pwned").exists()  # the payload never ran


def test_usage_errors_exit_2_and_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = run(capsys, tmp_path / "a", tmp_path / "b", "--dtype", "fp8")
    assert code == 2 and "invalid choice: 'fp8'" in err
    assert run(capsys, "only-one-argument")[0] == 2
    code, _, err = run(capsys, tmp_path / "nope", tmp_path / "b", "--debug")
    assert code == 1 and "Traceback" in err and err.splitlines()[-1].startswith("sdxl-convert: error: no such file")


def test_progress_bar_on_a_terminal_and_in_a_log():
    events = [Progress(c, i, 4, 10 * i, 40) for c, i in [("unet", 1), ("unet", 2), ("vae", 3), ("vae", 4)]]
    log = io.StringIO()
    bar = ProgressBar(log, interactive=False)
    for p in events:
        bar(p)
    lines = log.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["  unet written: 2/4 tensors", "  vae written: 4/4 tensors"]
    terminal = io.StringIO()
    bar = ProgressBar(terminal, interactive=True, width=8)
    for p in events:
        bar(p)
    drawn = terminal.getvalue()
    assert drawn.count("\r") == 3 and drawn.endswith("\n")  # unet, vae, and done; the 2nd unet event is throttled
    assert "[########] 4/4 tensors 0.00/0.00 GB" in drawn and "[##------] 1/4 tensors" in drawn


def test_module_runs_as_a_subprocess(folder, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    dst = tmp_path / "sdxl.safetensors"
    cmd = [sys.executable, "-m", "sdxl_jax.convert", str(folder), str(dst), "--to", "single-file"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert SUMMARY.search(done.stdout.strip()).groups()[1:3] == ("single-file", "907")
    assert len(load_file(dst)) == 907
