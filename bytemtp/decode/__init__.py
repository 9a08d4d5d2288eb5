"""Decoding: the engine (one fixed-shape step over a batch of rows), its chain and tree draft
strategies, verification, sampling, the draft policy, stop strings, and the benchmark that
compares them with plain decoding."""
