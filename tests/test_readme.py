"""The README's Python example runs as written (on the default model)."""

import re
from pathlib import Path

import pytest


@pytest.mark.extended
@pytest.mark.slow
def test_readme_python_example_runs(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = re.search(r"## Use it from Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split("\n")
    assert "bytes of KV cache" in printed[0] and "bytes allocated" in printed[1]
    logical, allocated = (int(line.split()[0]) for line in printed[:2])
    assert 0 < logical <= allocated  # the simulation's tensors hold at least what the plan counts
    assert 10 < float(printed[2]) < 100  # held-out PPL of the default model at K4V2
