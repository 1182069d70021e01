"""Where a person looks at the comparison in MLflow's UI: the URL of its compare-runs page. Apart
from stages/ui.py so that `evaluate` can print the URL without depending on the server code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import quote

DEFAULT_PORT = 5000  # mlflow ui's own, and `python -m stages ui`'s


@dataclass(frozen=True)
class StageRuns:
    """The runs the comparison page shows: the last stage run of each trainer."""

    experiment_id: str
    run_ids: tuple[str, str]  # train-tf's, train-torch's


def comparison_url(base: str, runs: StageRuns) -> str:
    """Return the URL of MLflow's compare-runs page for the two trainer stage runs."""
    return (
        f"{base.rstrip('/')}/#/compare-runs?runs={quote(json.dumps(list(runs.run_ids)))}"
        f"&experiments={quote(json.dumps([runs.experiment_id]))}"
    )
