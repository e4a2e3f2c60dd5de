"""Convert OpenAI CLIP's BPE file into Hugging Face CLIP tokenizer files.

OpenAI ships the byte-pair encoding as ``bpe_simple_vocab_16e6.txt.gz`` (in the ``clip`` and
``open_clip_torch`` packages). Hugging Face's ``CLIPTokenizer`` reads ``vocab.json`` (token -> id)
and ``merges.txt``. This script rebuilds both exactly as OpenAI's ``simple_tokenizer.py`` builds
its vocabulary, which is also what ``openai/clip-vit-base-patch16`` ships on the Hub:

- ids 0..255: the 256 byte-level unicode characters (``bytes_to_unicode`` order);
- ids 256..511: the same characters with the end-of-word suffix ``</w>``;
- ids 512..49405: the 48,894 merges, each pair joined;
- 49406 ``<|startoftext|>``, 49407 ``<|endoftext|>`` (49,408 entries in all).

``merges.txt`` is ``#version: 0.2`` followed by the same 48,894 merges, one ``left right`` per line.

Usage::

    python scripts/convert_clip_vocab.py [path/to/bpe_simple_vocab_16e6.txt.gz] [--output-dir decd/assets]

Without a path, the file of the installed ``open_clip`` package is used (found without importing it).
"""

import argparse
import gzip
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configuration_decd import CLIP_VOCAB_SIZE  # noqa: E402

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI keeps the first 49152 - 256 - 2 merges of the file (line 0 is a version header).
NUMBER_OF_MERGES = 49152 - 256 - 2
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent.parent / "decd" / "assets"


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's (and GPT-2's) reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...) are
    shifted to code points from 256 upwards, so that BPE never sees whitespace or control bytes.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    shift = 0
    for byte in range(2**8):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(2**8 + shift)
            shift += 1
    return dict(zip(byte_values, [chr(code_point) for code_point in code_points]))


def default_bpe_path() -> Path | None:
    """The BPE file of the installed ``open_clip`` package, located without importing the package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BPE_FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    """The merges OpenAI's tokenizer uses, in priority order."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUMBER_OF_MERGES + 1]]
    if len(merges) != NUMBER_OF_MERGES or any(len(merge) != 2 for merge in merges):
        raise ValueError(f"{bpe_path} does not look like OpenAI's {BPE_FILE_NAME}: bad merge lines.")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id, in OpenAI's order (see the module docstring)."""
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [token + "</w>" for token in tokens]
    tokens.extend("".join(merge) for merge in merges)
    tokens.extend([START_OF_TEXT, END_OF_TEXT])
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"Built {len(vocab)} distinct tokens, expected {CLIP_VOCAB_SIZE}.")
    return vocab


def convert(bpe_path: Path, output_dir: Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` into ``output_dir``; returns their paths."""
    merges = read_merges(bpe_path)
    vocab = build_vocab(merges)
    output_dir.mkdir(parents=True, exist_ok=True)
    vocab_path = output_dir / "vocab.json"
    merges_path = output_dir / "merges.txt"
    with open(vocab_path, "w", encoding="utf-8") as handle:
        json.dump(vocab, handle, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n")
        handle.writelines(f"{left} {right}\n" for left, right in merges)
    return vocab_path, merges_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_path", nargs="?", type=Path, help=f"path to {BPE_FILE_NAME} (default: open_clip's)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where to write the files")
    arguments = parser.parse_args(argv)
    bpe_path = arguments.bpe_path or default_bpe_path()
    if bpe_path is None or not Path(bpe_path).is_file():
        parser.error(f"{BPE_FILE_NAME} not found: pass its path (it ships with `pip install open_clip_torch`).")
    vocab_path, merges_path = convert(Path(bpe_path), arguments.output_dir)
    print(f"wrote {vocab_path} and {merges_path} from {bpe_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
