"""The report as one self-contained HTML page: the same markdown, its images embedded, no script,
style or font loaded from anywhere, so it opens offline, in a browser or an e-mail."""

from __future__ import annotations

import base64
import html
import mimetypes
from pathlib import Path

from markdown_it import MarkdownIt

from stages.core.common import StageError

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em;
       color: #1f2328; line-height: 1.5; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.7em; }
th { background: #f6f8fa; }
td[style*="right"], th[style*="right"] { font-variant-numeric: tabular-nums; }
img { max-width: 100%; }
code { background: #f6f8fa; padding: 0.1em 0.3em; border-radius: 4px; }
"""


def data_uri(path: Path) -> str:
    """Return the file's bytes as a `data:` URI of its media type."""
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{media_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


def html_report(markdown: str, folder: Path, title: str) -> str:
    """Return the markdown as one HTML page, each image it names (relative to `folder`) inlined."""
    parser = MarkdownIt("commonmark").enable("table")
    tokens = parser.parse(markdown)
    for token in tokens:
        for child in token.children or []:
            if child.type != "image":
                continue
            source = str(child.attrGet("src") or "")
            if "://" in source or source.startswith("data:"):
                raise StageError(f"the report links {source}: only files beside it can be embedded")
            path = folder / source
            if not path.is_file():
                raise StageError(f"the report shows {source}, which is not in {folder}")
            child.attrSet("src", data_uri(path))
    body = parser.renderer.render(tokens, parser.options, {})
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body>\n{body}</body>\n</html>\n"
    )
