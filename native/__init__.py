"""bytemtp_native: the per-byte hot loops, compiled with Numba. NumPy in, NumPy out, no torch."""

from bytemtp_native.packing import MODES, PAD, PackPlan, concat_stream, fill_rows, pack, plan_rows
from bytemtp_native.shuffle import order_key, permutation

__all__ = [
    "MODES",
    "PAD",
    "PackPlan",
    "concat_stream",
    "fill_rows",
    "order_key",
    "pack",
    "permutation",
    "plan_rows",
]
