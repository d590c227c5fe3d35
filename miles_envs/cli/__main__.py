"""`python -m miles_envs.cli` runs the CLI: the same commands where the `miles-envs` script is not on PATH."""

from miles_envs.cli import main

main()
