"""`python -m stages`: commands that work from the pipeline's outputs at any time, and a
throwaway team MLflow server to try the team set-up with."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import StageError, read_json

app = typer.Typer(
    help="Read the comparison the pipeline produced; try a team MLflow server.",
    no_args_is_help=True,
)


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
    export: Path = typer.Option(Path("metrics/export.json")),
    root: Path = typer.Option(Path("."), help="Where bench/, experiments/ and tests/ results are."),
    readme_path: Path = typer.Option(Path("README.md"), "--readme"),
) -> None:
    """Regenerate the README's results section from the outputs."""
    from .readme import update_readme

    try:
        deployment = read_json(export, "export") if export.exists() else None
        update_readme(readme_path, read_json(metrics, "evaluate"), root, deployment)
    except StageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"updated the results section of {readme_path}")


@app.command()
def server(
    port: int = typer.Option(5000, help="Port of the MLflow server on 127.0.0.1."),
    artifacts_destination: str = typer.Option(
        "", help="Where the server stores artifacts (default: a folder removed on exit)."
    ),
    workers: int = typer.Option(2, help="mlflow server worker processes."),
) -> None:
    """Run a throwaway team MLflow server (PostgreSQL, proxied artifacts, basic auth) until Ctrl-C."""
    import time

    from .common import Terminated, handle_stop_signals
    from .team_server import PortInUse, free_port, team_server

    handle_stop_signals()
    try:
        with team_server(port, artifacts_destination or None, workers) as running:
            typer.echo(f"MLflow team server at {running.url}, storing in {running.folder}")
            typer.echo("In the shell that runs the pipeline:")
            for name, value in running.client_env().items():
                typer.echo(f"  export {name}={value}")
            typer.echo("Ctrl-C stops it and deletes everything it stored.")
            while running.alive():
                time.sleep(1)
            raise running.failure()
    except PortInUse as exc:
        typer.echo(f"error: {exc}; choose another with --port, e.g. --port {free_port()}", err=True)
        raise typer.Exit(1) from None
    except StageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (KeyboardInterrupt, Terminated):
        typer.echo("stopped; its databases and artifacts are deleted", err=True)


if __name__ == "__main__":
    app()
