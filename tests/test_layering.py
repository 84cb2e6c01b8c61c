"""The package's layers import downward only: models, diffusion math and the tokenizer know nothing of
the trainer, the sampling pipeline or the converters; the trainer never imports the pipeline (both build
on `generation`). Read from the source (every import statement, function-level ones included)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sdxl_jax"

# layer -> the modules it may not import (a module and everything below it)
FORBIDDEN = {
    "models": ("sdxl_jax.train", "sdxl_jax.pipeline", "sdxl_jax.convert"),
    "diffusion": ("sdxl_jax.train", "sdxl_jax.pipeline", "sdxl_jax.convert"),
    "tokenizer.py": ("sdxl_jax.train", "sdxl_jax.pipeline", "sdxl_jax.convert"),
    "sharding.py": ("sdxl_jax.train", "sdxl_jax.pipeline", "sdxl_jax.convert", "sdxl_jax.models"),
    "train": ("sdxl_jax.pipeline",),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from sdxl_jax import pipeline`
    return names


def modules_of(layer: str) -> list[Path]:
    root = PACKAGE / layer
    return sorted(root.rglob("*.py")) if root.is_dir() else [root]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer):
    files = modules_of(layer)
    assert files and all(f.exists() for f in files)
    bad = []
    for path in files:
        for name in imported_modules(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from sdxl_jax import pipeline\n")
    assert "sdxl_jax.pipeline" in imported_modules(module)


def test_the_version_lives_in_the_package():
    import sdxl_jax

    assert sdxl_jax.__version__ == "0.1.0"
