"""Summarise a folder of generated samples: ``python -m occscene_pl.summarize runs/demo/samples``.

Reads every complete sample's ``meta.json`` (written by :class:`~occscene_pl.writer.GenerationWriter`) and reports,
per generation mode (``text`` / ``layout``), the number of samples and the mean of each consistency score: the
judge's ``consistency_miou`` / ``consistency_iou`` (headline, when predict ran with ``model.evaluation.judge``) and the
co-trained perceiver's ``cotrained_consistency_*``. Prints a table and writes ``summary.json`` into the folder.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["SCORES", "main", "summarize"]

SCORES = ("consistency_miou", "consistency_iou", "cotrained_consistency_miou", "cotrained_consistency_iou")


def summarize(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Per-mode sample counts and mean scores of the samples in ``folder``.

    Args:
        folder: A predict output folder (one sub-folder per sample, each with ``meta.json``).

    Returns:
        ``{mode: {"samples": n, score: {"mean": m, "min": lo, "max": hi, "n": k}, ...}}`` for the scores present.

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
        ValueError: A ``meta.json`` is not valid JSON (named).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"summarize: {root} is not a folder of generated samples")
    values: dict[str, dict[str, list[float]]] = {}
    counts: dict[str, int] = {}
    for path in sorted(root.glob("*/meta.json")):
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"summarize: {path} is not valid JSON ({error})") from error
        mode = str(record.get("mode", "unknown"))
        counts[mode] = counts.get(mode, 0) + 1
        meta = record.get("meta") or {}
        for score in SCORES:
            value = meta.get(score)
            if isinstance(value, int | float) and math.isfinite(value):
                values.setdefault(mode, {}).setdefault(score, []).append(float(value))
    summary: dict[str, dict[str, Any]] = {}
    for mode, n in sorted(counts.items()):
        entry: dict[str, Any] = {"samples": n}
        for score, xs in values.get(mode, {}).items():
            entry[score] = {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs), "n": len(xs)}
        summary[mode] = entry
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """Print the summary table of a samples folder and write ``summary.json`` into it."""
    parser = argparse.ArgumentParser(prog="python -m occscene_pl.summarize", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="predict output folder (e.g. runs/demo/samples)")
    args = parser.parse_args(argv)
    summary = summarize(args.folder)
    (args.folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for mode, entry in summary.items():
        scores = ", ".join(
            f"{score} {entry[score]['mean']:.3f} (n={entry[score]['n']})" for score in SCORES if score in entry
        )
        print(f"{mode}: {entry['samples']} samples; {scores or 'no consistency scores'}")


if __name__ == "__main__":
    main()
