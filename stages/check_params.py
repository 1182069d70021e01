"""Typed, validated view of params.yaml: every stage loads it once, in main(), through `load_params`."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.core.common import run_cli
from stages.core.config import (
    load_params,
)


def main(params: Path = typer.Option(Path("params.yaml"), help="Parameters file.")) -> None:
    """Validate the whole params file; dvc.yaml runs this whenever any key in it changes."""
    load_params(params)
    print(f"{params}: valid")


if __name__ == "__main__":
    run_cli(main)
