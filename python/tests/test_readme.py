"""The README's Python example runs as written (from the repository root)."""

import csv
import os
import re

from conftest import ROOT


def test_readme_folder_example_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- python-example -->\n```python\n(.*?)```", readme, re.S)
    assert m, "README.md lost its marked Python example"
    (ROOT / "build").mkdir(exist_ok=True)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(m.group(1), "README.md example", "exec"), {})
    finally:
        os.chdir(cwd)
    rows = list(csv.reader(open(ROOT / "build/answers.csv")))
    assert rows[0] == ["image", "answer", "decode_tokens_per_s"] and len(rows) == 11
    assert all(r[1] for r in rows[1:]), "every picture got an answer"
