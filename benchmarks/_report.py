"""Shared helpers of the benchmark scripts: write a marked section into a markdown results file.

A section is the text between a start marker and an end marker (HTML comments, invisible once rendered).
Writing replaces that text in place, or appends the section when the markers are absent, so each script
owns its section of ``benchmarks/RESULTS.md`` and leaves the rest of the file as it is.
"""

from __future__ import annotations

import contextlib
import platform
from importlib import metadata
from pathlib import Path

DEFAULT_TEXT = "# Benchmark results\n\n"
"""What a results file starts as when it does not exist yet."""


def section(body: str, start: str, end: str | None = None) -> str:
    """Wrap ``body`` in its markers: ``start``, the body, ``end`` (``start`` again if ``None``), one per line.

    Args:
        body: the section's markdown, without markers.
        start: the start marker.
        end: the end marker; the same as ``start`` when ``None``.

    Returns:
        The marked section, ending with a newline.
    """
    body = body.strip("\n")
    return f"{start}\n{body}\n{end or start}\n"


def replace_section(text: str, marked: str, start: str, end: str | None = None) -> str:
    """Put the marked section ``marked`` in place of the one in ``text``, or append it if ``text`` has none.

    Args:
        text: the whole markdown file.
        marked: the new section, markers included (see :func:`section`).
        start: the start marker.
        end: the end marker; the same as ``start`` when ``None``.

    Returns:
        The new file text; everything outside the markers is unchanged.

    Raises:
        ValueError: ``text`` has the start marker but no end marker after it.
    """
    end = end or start
    if start not in text:
        return text.rstrip("\n") + "\n\n" + marked
    first = text.index(start)
    last = text.find(end, first + len(start))
    if last < 0:
        raise ValueError(f"results file has the marker {start!r} but no {end!r} after it; fix it by hand")
    last += len(end)
    if text[last : last + 1] == "\n":
        last += 1
    return text[:first] + marked + text[last:]


def write_section(path: Path, marked: str, start: str, end: str | None = None) -> None:
    """Write the marked section into the markdown file ``path`` (created if missing), see :func:`replace_section`.

    Args:
        path: the results file.
        marked: the new section, markers included.
        start: the start marker.
        end: the end marker; the same as ``start`` when ``None``.
    """
    text = path.read_text() if path.exists() else DEFAULT_TEXT
    path.write_text(replace_section(text, marked, start, end))


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (else what ``platform`` knows), for results headers."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def package_version(package: str) -> str:
    """An installed distribution's version, or ``not installed``."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
