"""One module per `loom` command: its `Options` dataclass (the flags are generated from it,
and its pipeline stage reads the same class) and `run(options) -> int`."""
