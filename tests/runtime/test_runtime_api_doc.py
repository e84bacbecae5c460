"""docs/runtime-api.md's embedding example runs as written (with its engine dir at hand)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image

DOC = Path(__file__).resolve().parents[2] / "docs" / "runtime-api.md"


def test_the_documented_embedding_example_runs(default_engine, tmp_path, capsys):
    (code,) = re.findall(r"## A complete embedding.*?```python\n(.*?)```", DOC.read_text(), re.S)
    (tmp_path / "engines").symlink_to(default_engine)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, str(DOC), "exec"), {"__name__": "__doc_example__"})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "running on " in out and "refused: width 1024 is outside" in out
    parameters = Image.open(tmp_path / "circle.png").text["parameters"]
    assert parameters.startswith("a red circle on a white background\n")
    assert "Seed: 7," in parameters
