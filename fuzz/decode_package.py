"""Coverage-guided fuzzing (atheris) of the package decoder: any bytes may only decode or raise a
:class:`~fedmerge.codec.errors.PackageError` (an :class:`~fedmerge.errors.InvalidSubmission`).

    python fuzz/decode_package.py -max_total_time=600 [corpus_dir]

The seed inputs are valid packages (dense, top-k, int8, int4, fp16, bf16, random-k, factor pairs, one
deflated) for a small
reference model; atheris mutates them with coverage feedback, and
re-signs each mutant's checksums so it reaches the validation behind them. Coverage comes from
fedmerge's own functions.
``tests/codec/test_atheris.py`` (slow) runs it for 60 s.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import types
from pathlib import Path

import atheris
import torch
from numba.core.dispatcher import Dispatcher

from fedmerge.codec import CodecConfig, PackageMeta, decode_package, encode_package
from fedmerge.errors import InvalidSubmission
from fedmerge.v1 import delta_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # test support lives in the repository
from fedmerge_testing.hostile import resign

SHAPES = {"a.weight": (24, 8), "a.bias": (24,), "b.weight": (4, 24)}


def seeds() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    meta = PackageMeta("fuzz", 1, "v000001", "0" * 64, num_examples=5)
    configs = [
        CodecConfig(sparsify="none", density=1.0, values="fp32"),
        CodecConfig(density=0.1, values="int8"),
        CodecConfig(density=0.3, values="int4"),
        CodecConfig(density=0.5, values="fp16"),
        CodecConfig(density=0.5, values="bf16"),
        CodecConfig(sparsify="randomk", density=0.2, values="int8"),
        CodecConfig(rank=3, density=0.3, values="int4"),  # low-rank factor pairs (format 3)
        CodecConfig(density=0.3, values="int4", deflate=True),  # one DEFLATE stream (codec.container)
    ]
    return [encode_package(delta, c, meta=meta).data for c in configs]


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's byte mutation, then re-signed when the result still parses as a package: the
    checksums would otherwise stop nearly every mutant before the checks behind them."""
    out = atheris.Mutate(data, max_size)
    try:
        pkg = delta_pb2.DeltaPackage.FromString(out)
        resign(pkg)
        return pkg.SerializeToString()
    except Exception:  # unparsable, or a field the checksum cannot encode: keep the raw mutant
        return out


def test_one_input(data: bytes) -> None:
    with contextlib.suppress(InvalidSubmission):
        decode_package(data, expected_shapes=SHAPES)


def instrument_fedmerge() -> None:
    """Coverage feedback from fedmerge's own Python functions (a few thousand): instrumenting every
    loaded function, torch's included (``atheris.instrument_all``: over 40 000), took minutes of CPU
    before the first input and gave the mutator no signal it needs here."""
    objects = gc.get_objects()
    # numba compiles a kernel's Python function again for each new argument signature, and the first
    # input that reaches a kernel the seeds did not (a varint index, say) would compile the instrumented
    # bytecode, which numba cannot type (atheris._trace_branch): the kernels' functions stay as they are
    kernels = {id(obj.py_func) for obj in objects if isinstance(obj, Dispatcher)}
    funcs = [
        obj
        for obj in objects
        if isinstance(obj, types.FunctionType)
        and str(getattr(obj, "__module__", "")).startswith("fedmerge")
        and id(obj) not in kernels
    ]
    for func in funcs:
        with contextlib.suppress(Exception):  # e.g. code atheris cannot patch: left as it is
            atheris.instrument_func(func)
    left_out = f"{len(kernels)} numba kernels left out"
    print(f"INFO: instrumented {len(funcs)} fedmerge functions ({left_out})", file=sys.stderr)


def main() -> None:
    args = list(sys.argv)
    corpus = [a for a in args[1:] if not a.startswith("-")]
    if corpus:  # atheris reads the seeds from the corpus directory; write them there first
        from pathlib import Path

        folder = Path(corpus[0])
        folder.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(seeds()):
            (folder / f"seed-{i}").write_bytes(data)
    for data in seeds():  # compile the numba kernels the seeds reach before the first input
        decode_package(data, expected_shapes=SHAPES)
    instrument_fedmerge()
    atheris.Setup(args, test_one_input, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
