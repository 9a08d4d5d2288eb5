"""Decoding: the generation loop, verifiers, sampling, the draft policy and draft trees,
stop strings, and the benchmark that compares them with plain decoding."""
