"""bytemtp_native: the per-byte hot loops, compiled with Numba. NumPy in, NumPy out, no torch."""

from bytemtp_native.packing import PACKING_MODES, PackPlan, concat_stream, fill_rows, pack, plan_rows
from bytemtp_native.shuffle import permutation

__all__ = [
    "PACKING_MODES",
    "PackPlan",
    "concat_stream",
    "fill_rows",
    "pack",
    "permutation",
    "plan_rows",
]
