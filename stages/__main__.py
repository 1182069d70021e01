"""`python -m stages`: commands that work from the pipeline's outputs at any time, and a
throwaway team MLflow server to try the team set-up with."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.core.common import StageError, read_json
from stages.tracking.links import DEFAULT_PORT

app = typer.Typer(
    help="Read the comparison the pipeline produced; try a team MLflow server.",
    no_args_is_help=True,
)


@app.command()
def report(metrics: Path = typer.Option(Path("metrics/evaluate.json"))) -> None:
    """Print the comparison table from the evaluate stage's metrics."""
    from stages.report.tables import print_table

    try:
        print_table(read_json(metrics, "evaluate"))
    except StageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def readme(
    metrics: Path = typer.Option(Path("metrics/evaluate.json")),
    export: Path = typer.Option(Path("metrics/export.json")),
    root: Path = typer.Option(Path("."), help="The checkout: dvc.yaml and the stages' code."),
    lock: Path = typer.Option(Path("dvc.lock"), help="DVC's record of the code each stage ran."),
    readme_path: Path = typer.Option(Path("README.md"), "--readme"),
    deployment_doc: Path = typer.Option(Path("docs/deployment.md"), "--deployment-doc"),
) -> None:
    """Regenerate the README's results and docs/deployment.md's tables from the outputs."""
    from stages.report.readme import recorded_digest, update_readme

    try:
        digest = recorded_digest(root, lock)
        deployment = read_json(export, "export") if export.exists() else None
        result = read_json(metrics, "evaluate")
        update_readme(readme_path, result, digest, deployment_doc, deployment)
    except StageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"updated the results in {readme_path} and {deployment_doc}")


@app.command()
def ui(
    port: int = typer.Option(DEFAULT_PORT, help="Port on 127.0.0.1; 0 picks a free one."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
) -> None:
    """Start MLflow's UI on the project's store and print the URL of the comparison (the last
    train-tf and train-torch runs side by side); Ctrl-C stops it."""
    import os
    import tempfile
    import time

    import mlflow

    from stages.core.common import Terminated, handle_stop_signals
    from stages.core.config import load_params
    from stages.tools.ui import latest_stage_runs, port_to_use, ui_server
    from stages.tracking.links import comparison_url
    from stages.tracking.runs import is_server, tracking_uri, workspace_root

    handle_stop_signals()
    try:
        experiment = load_params(params).mlflow.experiment_name
        uri = tracking_uri(os.environ, workspace_root(os.environ, Path.cwd()))
        mlflow.set_tracking_uri(uri)
        runs = latest_stage_runs(experiment)
        if is_server(uri):  # a team's server already serves the UI
            typer.echo(f"The comparison: {comparison_url(uri, runs)}")
            return
        with (
            tempfile.TemporaryDirectory() as folder,
            ui_server(uri, port_to_use(port), Path(folder) / "ui.log") as (base, process),
        ):
            typer.echo(f"The comparison: {comparison_url(base, runs)}", color=False)
            typer.echo("Ctrl-C stops the UI.")
            while process.poll() is None:
                time.sleep(0.5)
            raise StageError(f"mlflow ui stopped by itself with code {process.returncode}")
    except StageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (KeyboardInterrupt, Terminated):
        typer.echo("stopped", err=True)


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

    from stages.core.common import Terminated, handle_stop_signals
    from stages.tools.team_server import team_server

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
    except StageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (KeyboardInterrupt, Terminated):
        typer.echo("stopped; its databases and artifacts are deleted", err=True)


if __name__ == "__main__":
    app()
