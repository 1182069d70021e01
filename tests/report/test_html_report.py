"""reports/comparison.html: one self-contained page, checked in a real browser."""

import re

import numpy as np
import pytest
from PIL import Image

from stages.core.common import StageError
from stages.report.html import html_report
from tests.browser import chromium, file_url, recording_proxy

MARKDOWN = """# TensorFlow vs PyTorch on mnist

Inconclusive: a sentence.

| Measure | TensorFlow/Keras | PyTorch |
|---|---:|---:|
| Test accuracy (mean ± 95% CI) | 86.86 ± 0.39 % | 87.06 ± 0.60 % |

## Learning curves

![](curves.png)
"""


def _report_folder(folder):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(3, 2))
    axis.plot(np.arange(5), np.arange(5) ** 2)
    fig.savefig(folder / "curves.png")
    plt.close(fig)
    return folder


def test_images_are_embedded_and_nothing_is_linked(tmp_path):
    page = html_report(MARKDOWN, _report_folder(tmp_path), "TensorFlow vs PyTorch on mnist")
    assert "<title>TensorFlow vs PyTorch on mnist</title>" in page
    assert '<img src="data:image/png;base64,iVBORw0KGgo' in page  # the PNG signature, inlined
    assert "curves.png" not in page
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert '<td style="text-align:right">86.86 ± 0.39 %</td>' in page


def test_an_image_from_the_network_or_missing_is_refused(tmp_path):
    with pytest.raises(StageError, match="the report links https://x.invalid/a.png"):
        html_report("![](https://x.invalid/a.png)", tmp_path, "t")
    with pytest.raises(StageError, match=f"the report shows gone.png, which is not in {tmp_path}"):
        html_report("![](gone.png)", tmp_path, "t")


def test_the_page_renders_in_chromium_without_any_request_off_the_machine(tmp_path):
    folder = _report_folder(tmp_path)
    page = folder / "comparison.html"
    page.write_text(html_report(MARKDOWN, folder, "TensorFlow vs PyTorch on mnist"))
    control = folder / "control.html"  # the same check must see a page that loads from afar
    control.write_text('<html><body><img src="http://example.invalid/x.png"></body></html>')
    screenshot = tmp_path / "page.png"
    with recording_proxy() as proxy:
        dom = chromium(file_url(page), proxy.port)
        chromium(file_url(page), proxy.port, f"--screenshot={screenshot}", "--window-size=900,1400")
        assert proxy.from_pages() == []
        chromium(file_url(control), proxy.port)
        assert proxy.from_pages() == ["GET http://example.invalid/x.png"]
    # the embedded plot is drawn: matplotlib's first line colour (#1f77b4) is on the screen
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).reshape(-1, 3).astype(int)
    assert (np.abs(pixels - (0x1F, 0x77, 0xB4)).sum(axis=1) < 30).sum() > 50
    assert "<h1>TensorFlow vs PyTorch on mnist</h1>" in dom
    assert '<td style="text-align:right">87.06 ± 0.60 %</td>' in dom
    assert dom.count('<img src="data:image/png;base64,') == 1
