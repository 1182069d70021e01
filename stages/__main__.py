"""`python -m stages`: commands that work from the pipeline's outputs at any time."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import StageError, read_json

app = typer.Typer(help="Read the comparison the pipeline produced.", no_args_is_help=True)


@app.command()
def report(metrics: Path = typer.Option(Path("metrics/evaluate.json"))) -> None:
    """Print the comparison table from the evaluate stage's metrics."""
    from .evaluate import print_table

    try:
        print_table(read_json(metrics, "evaluate"))
    except StageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def readme(
    metrics: Path = typer.Option(Path("metrics/evaluate.json")),
    bench: Path = typer.Option(Path("bench/results.md")),
    blog_gap: Path = typer.Option(Path("experiments/blog_gap.md")),
    step_profile: Path = typer.Option(Path("bench/step_profile.md")),
    distributed: Path = typer.Option(Path("bench/distributed.md")),
    readme_path: Path = typer.Option(Path("README.md"), "--readme"),
) -> None:
    """Regenerate the README's results section from the outputs."""
    from .readme import update_readme

    try:
        update_readme(
            readme_path,
            read_json(metrics, "evaluate"),
            bench,
            blog_gap,
            step_profile,
            distributed,
        )
    except StageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"updated the results section of {readme_path}")


if __name__ == "__main__":
    app()
