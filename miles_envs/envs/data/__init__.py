"""Package data of the built-in envs (a package so the JSONL files ship in the wheel)."""
