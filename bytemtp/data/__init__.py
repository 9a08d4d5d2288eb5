"""The data path up to the model: input readers, prepare and merge, the shard format, the
packing loader, atomic file writes. Nothing here imports the model."""
