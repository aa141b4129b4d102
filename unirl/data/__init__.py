"""Data: the Shapes world (scenes, prompts, tasks), the verifier, shard I/O, validation and imports."""
