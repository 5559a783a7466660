"""The README's quickstart block runs as written (CPU, default backend)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_runs():
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None, "no python block under ## Quickstart"
    exec(compile(block.group(1), "README.md:quickstart", "exec"), {})
