"""The loop and its records: one engine for every stream, the RL loop, progress."""
