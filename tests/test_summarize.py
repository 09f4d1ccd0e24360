"""``python -m occscene_pl.summarize``: per-mode means of the consistency scores in meta.json files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from occscene_pl.summarize import main, summarize


def _sample(root: Path, name: str, mode: str, **meta: float) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "meta.json").write_text(json.dumps({"frame_id": name, "mode": mode, "meta": meta}))


def test_summary_means_per_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _sample(tmp_path, "a", "layout", consistency_miou=0.2, cotrained_consistency_miou=0.5)
    _sample(tmp_path, "b", "layout", consistency_miou=0.4, cotrained_consistency_miou=0.7)
    _sample(tmp_path, "c", "text", consistency_miou=0.1)
    _sample(tmp_path, "d", "text")  # no judge: counted, no score
    summary = summarize(tmp_path)
    assert summary["layout"]["samples"] == 2 and summary["text"]["samples"] == 2
    assert summary["layout"]["consistency_miou"]["mean"] == pytest.approx(0.3)
    assert summary["layout"]["cotrained_consistency_miou"]["max"] == pytest.approx(0.7)
    assert summary["text"]["consistency_miou"] == {"mean": 0.1, "min": 0.1, "max": 0.1, "n": 1}
    main([str(tmp_path)])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "layout: 2 samples; consistency_miou 0.300 (n=2)" in capsys.readouterr().out


def test_summary_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        summarize(tmp_path / "missing")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is not valid JSON"):
        summarize(tmp_path)
