"""Three small private text files, one per institution, each in its own style: data to try the example
with (``write_corpora``), used by its tests and by ``python -m bench rounds``' LoRA leg.

    python examples/hf_lora/sample_data.py OUT_DIR    # writes OUT_DIR/inst0.txt … inst2.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

TEXTS = [
    "the river runs north past the old mill and the stone bridge",
    "patients with fever should drink water and rest for two days",
    "the contract ends when both parties sign the final page",
]


def write_corpora(folder: Path, lines: int = 24) -> list[Path]:
    """One text file per institution (``inst{i}.txt``, ``lines`` rotations of its sentence); the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(TEXTS):
        words = text.split()
        rows = [" ".join(words[(j % 3) :] + words[: (j % 3)]) for j in range(lines)]
        paths.append(folder / f"inst{i}.txt")
        paths[-1].write_text("\n".join(rows) + "\n")
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write three institutions' sample text files.")
    parser.add_argument("out", type=Path, help="folder to write inst0.txt … inst2.txt in")
    for path in write_corpora(parser.parse_args().out):
        print(path)
