"""Regenerate `vocab.json` and `merges.txt` (the CLIP BPE vocabulary) from OpenAI's merge list.

Both SDXL text encoders (CLIP-L and OpenCLIP bigG) use OpenAI CLIP's byte-level BPE vocabulary of
49,408 tokens. Its only primary source is `bpe_simple_vocab_16e6.txt.gz` (MIT licence, Copyright
(c) 2021 OpenAI), shipped inside the PyPI package `open-clip-torch`. This script rebuilds the two
files next to it the same way OpenAI CLIP / open_clip build their encoder table in memory:

    ids 0..255       the 256 byte-level symbols in `bytes_to_unicode` order (so '!' is id 0)
    ids 256..511     the same 256 symbols with '</w>' (end of word) appended
    ids 512..49405   one token per merge, the merge's two halves joined, in rank order
    49406, 49407     '<|startoftext|>', '<|endoftext|>'

The merges are lines [1 : 49152 - 256 - 2 + 1] of the decompressed file (line 0 is a header), i.e.
the first 48,894 merges; the file holds more, which CLIP never used.

Output format is the one transformers' `CLIPTokenizer` reads: `vocab.json` maps token -> id (keys in
id order, UTF-8, one line); `merges.txt` is '#version: 0.2' followed by one "left right" merge per line.

Run (with `pip install --no-deps open-clip-torch`):

    python sdxl_jax/assets/clip_tokenizer/make_vocab.py            # writes next to this script
    python sdxl_jax/assets/clip_tokenizer/make_vocab.py --gz PATH --out DIR

`tests/test_tokenizer.py` checks that the shipped files equal what this script produces.
"""

import argparse
import gzip
import importlib.util
import json
import os

VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # = 48894: CLIP's table size minus bytes, minus the 2 special tokens
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")  # ids 49406, 49407
MERGES_HEADER = "#version: 0.2"
GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """Byte value (0..255) -> one printable unicode character, OpenAI's byte-level alphabet.

    The 188 printable Latin-1 bytes map to themselves; the other 68 (controls, space, NBSP, soft
    hyphen) map to chr(256), chr(257), ... so that no symbol is whitespace or a control. The dict's
    order is the vocabulary's: the printable bytes first, then the shifted ones, each ascending.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    shifted = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


def read_merges(gz_path: str) -> list[tuple[str, str]]:
    """The first `NUM_MERGES` merge pairs of OpenAI's gz merge list, in rank order."""
    with gzip.open(gz_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    bad = [i for i, m in enumerate(merges) if len(m) != 2]
    if len(merges) != NUM_MERGES or bad:
        raise ValueError(
            f"{gz_path}: expected {NUM_MERGES} two-part merge lines, got {len(merges)} "
            f"with malformed lines at {bad[:5]}"
        )
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id, laid out as in the module docstring; checks size, uniqueness and special ids."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(tokens) != VOCAB_SIZE or len(vocab) != VOCAB_SIZE:
        raise ValueError(f"expected {VOCAB_SIZE} distinct tokens, got {len(tokens)} ({len(vocab)} distinct)")
    if (vocab[SPECIAL_TOKENS[0]], vocab[SPECIAL_TOKENS[1]]) != (49406, 49407):
        raise ValueError("start/end tokens did not land on ids 49406/49407")
    return vocab


def render(gz_path: str) -> dict[str, str]:
    """File name -> exact text of `vocab.json` and `merges.txt` derived from `gz_path`."""
    merges = read_merges(gz_path)
    vocab = build_vocab(merges)
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n",
        "merges.txt": "\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in merges]) + "\n",
    }


def open_clip_gz_path() -> str:
    """Path of the gz inside the installed `open_clip` package, found without importing it
    (its `__init__` needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip is not installed: pip install --no-deps open-clip-torch")
    path = os.path.join(list(spec.submodule_search_locations)[0], GZ_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"open_clip is installed but has no {GZ_NAME}: {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gz", default=None, help=f"path to {GZ_NAME} (default: open_clip's copy)")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = parser.parse_args()
    gz_path = args.gz or open_clip_gz_path()
    for name, text in render(gz_path).items():
        path = os.path.join(args.out, name)
        # newline="" keeps '\n' on every platform, so the files are byte-identical everywhere.
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        print(f"wrote {path} ({len(text.encode('utf-8')):,} bytes)")


if __name__ == "__main__":
    main()
