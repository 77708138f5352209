"""The commands a Markdown file shows a user: its ``bash`` blocks, read as the tests run them."""

from __future__ import annotations

import re
from pathlib import Path


def bash_blocks(path: Path) -> list[list[str]]:
    """The commands of each ``bash`` block of ``path``: continuation lines joined, comments and
    blank lines dropped, runs of spaces made one."""
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
        commands = []
        for line in block.replace("\\\n", " ").splitlines():
            line = "" if line.lstrip().startswith("#") else re.sub(r"\s+#\s.*$", "", line)
            if line.strip():
                commands.append(" ".join(line.split()))
        blocks.append(commands)
    return blocks
