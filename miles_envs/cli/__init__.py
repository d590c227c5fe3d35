"""The ``miles-envs`` command line."""


def main() -> None:
    from miles_envs.cli.app import app

    app()
