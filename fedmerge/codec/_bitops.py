"""Bit-level primitives for the codec's numba kernels (LLVM intrinsics, no Python-level fallback).

- :func:`trailing_zeros` (x: uint64) → the number of trailing zero bits of x (``llvm.cttz``; x ≠ 0,
  the result for 0 is 64).
- :func:`float_of_bits` (b: uint32) → the fp32 whose IEEE-754 bit pattern is b (a bitcast).
- :func:`round_half_even` (x: fp32) → x rounded to an integer, ties to even (``llvm.roundeven``).
- :func:`store_u64_le` (buf, pos, v) → the 8 bytes of v stored at ``buf[pos:pos + 8]``.
- :func:`load_u64_le` (buf, pos) → the 8 bytes at ``buf[pos:pos + 8]`` as a uint64.

Loads and stores are little-endian: the byte order of every platform numba targets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def _trailing_zeros(typingctx: Any, x: Any) -> Any:
    """cttz(x) as a uint64: the index of the lowest set bit of x (64 for x = 0)."""
    sig = types.uint64(types.uint64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fn = builder.module.declare_intrinsic("llvm.cttz", [ir.IntType(64), ir.IntType(1)])
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 0)])

    return sig, codegen


@intrinsic
def _float_of_bits(typingctx: Any, b: Any) -> Any:
    """The fp32 with bit pattern ``b`` (uint32), reinterpreted without conversion."""
    sig = types.float32(types.uint32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _round_half_even(typingctx: Any, x: Any) -> Any:
    """x rounded to the nearest integer, ties to even (``llvm.roundeven``: the value of ``np.rint`` in
    the default rounding mode, ±inf and NaN unchanged), as an fp32; vectorisable, unlike a libm call."""
    sig = types.float32(types.float32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fn = builder.module.declare_intrinsic("llvm.roundeven", [ir.FloatType()])
        return builder.call(fn, [args[0]])

    return sig, codegen


@intrinsic
def _store_u64_le(typingctx: Any, buf: Any, pos: Any, value: Any) -> Any:
    """Store the 8 bytes of ``value`` (uint64) at byte ``pos`` of the uint8 array ``buf``, unaligned,
    in the host's byte order, which is little-endian on every platform numba targets (x86-64,
    AArch64, ppc64le). No bounds check: the caller guarantees pos + 8 ≤ buf.size."""
    sig = types.void(buf, pos, value)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(arr.data, [args[1]])
        wide = builder.bitcast(ptr, ir.IntType(64).as_pointer())
        store = builder.store(args[2], wide)
        store.align = 1
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _load_u64_le(typingctx: Any, buf: Any, pos: Any) -> Any:
    """The 8 bytes at byte ``pos`` of the uint8 array ``buf`` as a uint64, unaligned, in the host's
    (little-endian) byte order. No bounds check: the caller guarantees pos + 8 ≤ buf.size."""
    sig = types.uint64(buf, pos)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(arr.data, [args[1]])
        wide = builder.bitcast(ptr, ir.IntType(64).as_pointer())
        return builder.load(wide, align=1)

    return sig, codegen


# Typed names for the kernels (an intrinsic is called without its typing context inside numba code).
trailing_zeros = cast(Callable[[Any], Any], _trailing_zeros)
float_of_bits = cast(Callable[[Any], Any], _float_of_bits)
round_half_even = cast(Callable[[Any], Any], _round_half_even)
store_u64_le = cast(Callable[[Any, Any, Any], None], _store_u64_le)
load_u64_le = cast(Callable[[Any, Any], Any], _load_u64_le)
