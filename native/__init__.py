"""bytemtp_native: the per-byte hot loops, compiled with Numba. NumPy in, NumPy out, no torch."""
