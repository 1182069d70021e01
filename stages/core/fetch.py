"""Fetch the dataset's four IDX files, verified by checksum, from sources in order; framework-free.

A source is a folder or an HTTP(S) URL holding the files under their usual names. HTTP requests
retry with exponential backoff. Each file is verified by the SHA-256 of its *decompressed* bytes,
so a mirror that recompresses still verifies; nothing half-fetched is left behind.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

from stages.core.common import StageError
from stages.core.dataset import DATASETS, LOCAL_MIRRORS, SPLIT_FILES, Dataset, dataset_of_checksum
from stages.core.idx import IdxError, decompress, parse_idx, sha256


@dataclass(frozen=True)
class Network:
    """How hard to try each HTTP source."""

    timeout_seconds: float = 30.0
    retries: int = 3
    backoff_seconds: float = 1.0


@dataclass(frozen=True)
class Fetcher:
    """Where and how `download` fetches each file: the sources in order, one HTTP session."""

    dataset_name: str
    sources: list[str]
    session: requests.Session
    network: Network


class SourceFailed(Exception):
    """One source could not deliver one file; the message is the reason."""


def sources_for(dataset: str, mirror: str | None) -> list[str]:
    """Return the sources to try in order: the user's mirror first, then the public ones."""
    return ([mirror] if mirror else []) + list(DATASETS[dataset].mirrors)


def _session(network: Network) -> requests.Session:  # pragma: no mutate block
    retry = Retry(
        total=network.retries,
        connect=network.retries,
        read=network.retries,
        status=network.retries,
        backoff_factor=network.backoff_seconds,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"GET"}),
        raise_on_status=False,
    )
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


def _local_path(source: str) -> Path | None:
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    return Path(source).expanduser()


def fetch_one(
    source: str, filename: str, dest: Path, session: requests.Session, network: Network
) -> None:
    """Copy or download `source`/`filename` to `dest`, or raise SourceFailed with the reason."""
    folder = _local_path(source)
    if folder is not None:
        try:
            shutil.copyfile(folder / filename, dest)
        except OSError as exc:
            raise SourceFailed(f"{exc.strerror or exc}: {folder / filename}") from None
        return
    url = source.rstrip("/") + "/" + filename
    try:
        with session.get(url, stream=True, timeout=network.timeout_seconds) as response:
            if response.status_code != 200:
                raise SourceFailed(f"HTTP {response.status_code} {response.reason} for {url}")
            with open(dest, "wb") as out, download_bar(filename, response) as bar:
                for chunk in response.iter_content(chunk_size=1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as exc:
        raise SourceFailed(f"{type(exc).__name__} for {url}: {_short(exc)}") from None


def download_bar(filename: str, response: requests.Response) -> tqdm:  # pragma: no mutate block
    """Return a byte progress bar for one file (shown on a terminal only, gone when done)."""
    total = int(response.headers.get("content-length", 0)) or None
    return tqdm(total=total, unit="B", unit_scale=True, desc=filename, disable=None, leave=False)


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def verify(path: Path, stem: str, expected_sha256: str) -> int:
    """Return the item count of a downloaded IDX file; raise IdxError if it is not the right one."""
    data = decompress(path)
    items = parse_idx(data, path.name).shape[0]
    actual = sha256(data)
    if actual != expected_sha256:
        other = dataset_of_checksum(actual)
        hint = f"; it is {other}'s {stem}, so set data.dataset={other}" if other else ""
        raise IdxError(
            f"{path.name}: checksum mismatch, SHA-256 of the decompressed file is {actual}, "
            f"expected {expected_sha256} for {stem}{hint}"
        )
    return items


def fetch_dataset(
    dataset: Dataset,
    out_dir: Path,
    sources: list[str],
    network: Network,
    reuse_dir: Path | None = None,
) -> dict[str, dict[str, object]]:
    """Fill `out_dir` with the dataset's verified .gz files; return per-file source and checksum.

    Files in `reuse_dir` that verify are copied rather than fetched again (DVC removes a stage's
    outputs before running it, so this serves runs outside DVC; DVC's run cache serves the rest).
    """
    fetcher = Fetcher(dataset.name, sources, _session(network), network)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, dict[str, object]] = {}
    for stem, expected in dataset.sha256.items():
        filename = f"{stem}.gz"
        dest = out_dir / filename
        previous = reuse_dir / filename if reuse_dir else None
        if previous is not None and previous.exists():
            try:
                items = verify(previous, stem, expected)
                shutil.copyfile(previous, dest)
                manifest[stem] = {"source": "already present", "sha256": expected, "items": items}
                continue
            except IdxError:
                pass  # fetch it again below
        manifest[stem] = _fetch_verified(fetcher, stem, expected, dest)
    shutil.rmtree(out_dir / ".partial", ignore_errors=True)
    for split, (images, labels) in SPLIT_FILES.items():
        if manifest[images]["items"] != manifest[labels]["items"]:
            raise IdxError(
                f"{split} split: {images} has {manifest[images]['items']} images but {labels} "
                f"has {manifest[labels]['items']} labels"
            )
    return manifest


def offline_hint(dataset_name: str) -> str:
    """Return how to point `download` at a local copy of `dataset_name`."""
    hint = (
        "Offline? Put the four .gz files in a folder (or serve them over HTTP) and set "
        "DATASET_MIRROR to it."
    )
    if dataset_name in LOCAL_MIRRORS:
        folder, package = LOCAL_MIRRORS[dataset_name]
        return f"{hint} Debian's {package} package puts them in {folder}."
    others = [
        f"DATASET_MIRROR={folder} with data.dataset={name} (Debian's {package})"
        for name, (folder, package) in LOCAL_MIRRORS.items()
    ]
    return f"{hint} No local package carries {dataset_name}; to try the pipeline offline, use " + (
        " or ".join(others) + "."
    )


def _fetch_verified(fetcher: Fetcher, stem: str, expected: str, dest: Path) -> dict[str, object]:
    filename = f"{stem}.gz"
    partial = dest.parent / ".partial" / filename  # same name, so errors name the real file
    partial.parent.mkdir(exist_ok=True)
    failures: list[str] = []
    for source in fetcher.sources:
        try:
            fetch_one(source, filename, partial, fetcher.session, fetcher.network)
        except SourceFailed as exc:
            partial.unlink(missing_ok=True)
            failures.append(f"{source}: {exc}")
            continue
        try:
            items = verify(partial, stem, expected)
        except IdxError as exc:
            shutil.rmtree(partial.parent, ignore_errors=True)
            raise IdxError(f"{exc} (from {source})") from None
        partial.replace(dest)
        return {"source": source, "sha256": expected, "items": items}
    shutil.rmtree(partial.parent, ignore_errors=True)
    tried = "\n  ".join(failures)
    raise StageError(
        f"could not fetch {filename} of {fetcher.dataset_name} from any source:\n  {tried}\n"
        + offline_hint(fetcher.dataset_name)
    )
