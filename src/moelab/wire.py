"""Wire formats: how a row of hidden-state values travels between ranks, and what it costs in bytes.

A *format* encodes one row of ``d`` values (``d = d_model``): ``fp32`` or ``bf16`` values, or ``fp8``, E4M3 values
with one fp32 scale per 1×128 tile packed behind them (:func:`moelab.quant.packed_bytes`; DeepSeek-V3 §3.3.3).

A *wire* names the formats of the four trips a row makes through an expert-parallel layer: dispatch and combine
in forward, and the gradients of both coming back in backward. moelab's ``fp8`` wire sends the forward dispatch in
FP8 and the other three trips in BF16. DeepSeek-V3 also sends the activation gradient before the down-projection in
FP8, so only its combines stay BF16; counting one trip at a time keeps both readings in view.

The expert-parallel layer (:mod:`moelab.ep`), the sizing of real models (:mod:`moelab.sizing`) and the capstone's
byte count all take their row sizes from here.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import quant
from .config import check

VALUE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}     # bytes per value of each format (fp8's scales come on top)
FORMATS = tuple(VALUE_BYTES)


def row_bytes(d: int, fmt: str) -> int:
    """Bytes of one row of ``d`` values in ``fmt``, one trip: 4 or 2 a value, or for ``fp8`` 1 a value plus an
    fp32 scale per 128."""
    check(fmt in FORMATS, "row_bytes", "fmt", fmt, f"allowed: {', '.join(FORMATS)}")
    return quant.packed_bytes(d) if fmt == "fp8" else VALUE_BYTES[fmt] * d


@dataclass(frozen=True)
class Wire:
    """The formats of a row's four trips through an expert-parallel layer."""

    dispatch: str
    combine: str
    dispatch_grad: str
    combine_grad: str

    def trips(self) -> tuple[str, str, str, str]:
        return self.dispatch, self.combine, self.dispatch_grad, self.combine_grad


WIRES = {"fp32": Wire("fp32", "fp32", "fp32", "fp32"),
         "fp8": Wire("fp8", "bf16", "bf16", "bf16")}


def wire_named(name: str) -> Wire:
    """The :class:`Wire` called ``name`` (a key of :data:`WIRES`), or a clear error."""
    check(name in WIRES, "wire", "name", name, f"allowed: {', '.join(WIRES)}")
    return WIRES[name]


def round_trip_bytes(d: int, wire: str) -> int:
    """Bytes one row of ``d`` values costs on all four trips of ``wire``: ``16·d`` on the fp32 wire; on the fp8 wire
    the packed FP8 dispatch plus three BF16 trips."""
    return sum(row_bytes(d, fmt) for fmt in wire_named(wire).trips())
