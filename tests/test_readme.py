"""The README's example runs as written."""
import re
from pathlib import Path

import pytest


def test_readme_example_runs():
    pytest.importorskip("transformers")
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
