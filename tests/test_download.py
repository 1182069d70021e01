"""Stage `download`: sources in order, retries, timeouts, checksums, nothing half-written."""

import http.server
import threading
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from stages import download
from stages.core.common import StageError
from stages.core.dataset import STEMS, Dataset
from stages.core.fetch import Network, _local_path, _short, fetch_dataset, offline_hint, sources_for
from stages.core.idx import IdxError
from tests.conftest import DEBIAN_FASHION, ROOT, run_stage

FAST = Network(timeout_seconds=0.5, retries=1, backoff_seconds=0.01)


@pytest.fixture
def server(tiny_idx):
    """An HTTP server on 127.0.0.1: /good/ serves the tiny files, /404/, /500/ and /hang/ fail."""
    folder, _ = tiny_idx
    hits: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            kind = self.path.strip("/").split("/")[0]
            hits[kind] = hits.get(kind, 0) + 1
            hits[f"path {self.path}"] = hits.get(f"path {self.path}", 0) + 1
            if kind == "hang":  # answers, but only after the client's timeout
                time.sleep(2)
            if kind in ("404", "500"):
                self.send_error(int(kind))
                return
            body = (folder / Path(self.path).name).read_bytes()
            if kind == "corrupt":  # right size, wrong bytes
                body = body[:20] + bytes(len(body) - 20)
            try:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
                pass

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()


@pytest.mark.parametrize("failing", ["404", "500", "hang"])
def test_next_source_after_a_failing_one(tmp_path, tiny_idx, server, failing):
    _, dataset = tiny_idx
    base, hits = server
    sources = [f"{base}/{failing}/", f"{base}/good/"]
    manifest = fetch_dataset(dataset, tmp_path / "out", sources, FAST)
    assert {info["source"] for info in manifest.values()} == {f"{base}/good/"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{s}.gz" for s in STEMS)
    expected_tries = {"404": 1, "500": 2, "hang": 2}[failing]  # 500 and timeouts are retried once
    assert hits[failing] == 4 * expected_tries


def test_checksum_mismatch_is_an_error_and_leaves_nothing(tmp_path, tiny_idx, server):
    _, dataset = tiny_idx
    base, _ = server
    wrong = dict(dataset.sha256, **{"train-labels-idx1-ubyte": "0" * 64})
    with pytest.raises(
        IdxError,
        match=r"train-labels-idx1-ubyte.gz: checksum mismatch, SHA-256 of the decompressed file "
        rf"is [0-9a-f]{{64}}, expected 0{{64}} for train-labels-idx1-ubyte \(from {base}/good/\)",
    ):
        fetch_dataset(Dataset("mnist", (), wrong), tmp_path / "out", [f"{base}/good/"], FAST)
    assert not any(p.name.startswith("train-labels") for p in (tmp_path / "out").iterdir())


def test_all_sources_failing_lists_each_with_its_reason(tmp_path, tiny_idx, server):
    _, dataset = tiny_idx
    base, _ = server
    sources = [f"{base}/404/", f"{base}/500/", str(tmp_path / "missing")]
    with pytest.raises(StageError) as error:
        fetch_dataset(dataset, tmp_path / "out", sources, FAST)
    message = str(error.value)
    tried = message.splitlines()[1:4]  # one indented line per source, in order
    assert tried[0].startswith(f"  {base}/404/: HTTP 404")
    assert tried[1].startswith(f"  {base}/500/: HTTP 500")
    assert tried[2].startswith(f"  {tmp_path / 'missing'}: No such file or directory")
    assert "DATASET_MIRROR" in message
    assert list((tmp_path / "out").iterdir()) == []  # not even the .partial folder


def test_corrupt_download_names_file_and_source(tmp_path, tiny_idx, server):
    _, dataset = tiny_idx
    base, _ = server
    with pytest.raises(IdxError, match=rf"train-images-idx3-ubyte.gz: .* \(from {base}/corrupt/\)"):
        fetch_dataset(dataset, tmp_path / "out", [f"{base}/corrupt/"], FAST)
    assert list((tmp_path / "out").iterdir()) == []


def test_verified_files_are_not_fetched_again(tmp_path, tiny_idx, server):
    _, dataset = tiny_idx
    base, hits = server
    fetch_dataset(dataset, tmp_path / "first", [f"{base}/good/"], FAST)
    manifest = fetch_dataset(
        dataset, tmp_path / "second", [f"{base}/good/"], FAST, reuse_dir=tmp_path / "first"
    )
    assert hits["good"] == 4
    assert {info["source"] for info in manifest.values()} == {"already present"}
    assert {stem: info["sha256"] for stem, info in manifest.items()} == dataset.sha256


def test_a_corrupt_reused_file_is_verified_and_fetched_again(tmp_path, tiny_idx, server):
    _, dataset = tiny_idx
    base, hits = server
    fetch_dataset(dataset, tmp_path / "first", [f"{base}/good/"], FAST)
    reused = tmp_path / "first" / "train-labels-idx1-ubyte.gz"
    reused.write_bytes(reused.read_bytes()[:-8])  # the kept copy went bad on disk
    manifest = fetch_dataset(
        dataset, tmp_path / "second", [f"{base}/good/"], FAST, reuse_dir=tmp_path / "first"
    )
    assert hits["good"] == 4 + 1
    assert manifest["train-labels-idx1-ubyte"]["source"] == f"{base}/good/"
    assert manifest["train-images-idx3-ubyte"]["source"] == "already present"


def test_image_and_label_counts_must_match(tmp_path, tiny_idx):
    folder, dataset = tiny_idx
    from tests.conftest import tiny_arrays, write_idx_folder

    arrays = tiny_arrays()
    arrays["t10k-labels-idx1-ubyte"] = arrays["t10k-labels-idx1-ubyte"][:-1]
    broken = write_idx_folder(tmp_path / "broken", arrays)
    with pytest.raises(
        IdxError,
        match="test split: t10k-images-idx3-ubyte has 100 images but "
        "t10k-labels-idx1-ubyte has 99 labels",
    ):
        fetch_dataset(broken, tmp_path / "out", [str(tmp_path / "broken")], FAST)


def test_mirror_comes_first_then_public_mirrors():
    assert sources_for("mnist", "/srv/mnist")[0] == "/srv/mnist"
    public = sources_for("mnist", None)
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in public
    assert "http://yann.lecun.com/exdb/mnist/" in public


@pytest.mark.skipif(
    not DEBIAN_FASHION.exists(),
    reason="needs `apt-get install dataset-fashion-mnist` (.ci/run installs it)",
)
def test_debian_fashion_mnist_folder_verifies_as_a_mirror(tmp_path):
    dataset = download.DATASETS["fashion-mnist"]
    manifest = fetch_dataset(dataset, tmp_path / "out", [str(DEBIAN_FASHION)], FAST)
    assert manifest["train-images-idx3-ubyte"]["items"] == 60000
    assert manifest["t10k-labels-idx1-ubyte"]["items"] == 10000
    assert {info["source"] for info in manifest.values()} == {str(DEBIAN_FASHION)}


def test_stage_writes_files_manifest_and_mlflow_run(workspace, tiny_idx, monkeypatch):
    folder, dataset = tiny_idx
    monkeypatch.setitem(download.DATASETS, "mnist", dataset)
    monkeypatch.setenv("DATASET_MIRROR", str(folder))
    run_stage(download.main, out=workspace / "data/raw", params=workspace / "params.yaml")
    manifest = (workspace / "data/raw/manifest.json").read_text()
    run_id = __import__("json").loads(manifest)["mlflow_run_id"]
    run = mlflow.get_run(run_id)
    assert run.info.run_name == "download" and run.info.status == "FINISHED"
    assert run.data.params["dataset"] == "mnist"
    assert run.data.params["source.train-images-idx3-ubyte"] == str(folder)
    assert (
        run.data.params["sha256.t10k-labels-idx1-ubyte"] == dataset.sha256["t10k-labels-idx1-ubyte"]
    )


def test_stage_failure_leaves_no_output_and_a_failed_run(workspace, tiny_idx, monkeypatch):
    folder, dataset = tiny_idx
    monkeypatch.setitem(
        download.DATASETS,
        "mnist",
        Dataset("mnist", (), dict(dataset.sha256, **{STEMS[3]: "f" * 64})),
    )
    monkeypatch.setenv("DATASET_MIRROR", str(folder))
    with pytest.raises(IdxError, match="checksum mismatch"):
        download.main(
            out=workspace / "data/raw",
            params=workspace / "params.yaml",
            timeout_seconds=1,
            retries=0,
        )
    assert not (workspace / "data/raw").exists()
    assert [p for p in (workspace / "data").iterdir()] == []
    runs = mlflow.search_runs(experiment_names=["tf-vs-torch"])
    assert list(runs["status"]) == ["FAILED"]


def test_the_mirror_is_not_a_dependency_of_any_stage():
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert "DATASET_MIRROR" not in str(pipeline)
    assert pipeline["stages"]["download"]["params"] == ["data.dataset"]
    # `dvc status` with another DATASET_MIRROR is checked end to end in test_pipeline.py


def test_each_file_is_asked_for_once_at_its_exact_path(tmp_path, tiny_idx, server):
    _, dataset = tiny_idx
    base, hits = server
    for source in (f"{base}/good/", f"{base}/good"):  # with or without the trailing slash
        fetch_dataset(dataset, tmp_path / "new" / source[-1], [source], FAST)  # parents made
    requested = {key: n for key, n in hits.items() if key.startswith("path ")}
    assert requested == {f"path /good/{stem}.gz": 2 for stem in STEMS}


def test_sources_are_local_folders_file_urls_or_http():
    assert _local_path("file:///srv/mnist") == Path("/srv/mnist")
    assert _local_path("/srv/mnist") == Path("/srv/mnist")
    assert _local_path("http://127.0.0.1:8000/mnist/") is None
    assert _local_path("https://127.0.0.1:8000/mnist/") is None
    assert sources_for("mnist", None) == list(download.DATASETS["mnist"].mirrors)
    assert sources_for("mnist", "") == list(download.DATASETS["mnist"].mirrors)


def test_long_reasons_are_cut_at_200_characters():
    assert _short(OSError("x" * 200)) == "x" * 200
    assert _short(OSError("x" * 201)) == "x" * 200 + "..."


def test_the_offline_hint_in_full():
    mirror = (
        "Offline? Put the four .gz files in a folder (or serve them over HTTP) and set "
        "DATASET_MIRROR to it."
    )
    assert offline_hint("fashion-mnist") == (
        f"{mirror} Debian's dataset-fashion-mnist package puts them in "
        "/usr/share/datasets/fashion-mnist."
    )
    assert offline_hint("mnist") == (
        f"{mirror} No local package carries mnist; to try the pipeline offline, use "
        "DATASET_MIRROR=/usr/share/datasets/fashion-mnist with data.dataset=fashion-mnist "
        "(Debian's dataset-fashion-mnist)."
    )
