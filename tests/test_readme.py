"""The README's Python example runs as written (on the C backend and on the numpy reference)."""
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.skipif(not README.exists(), reason="README.md is not beside tests/ (tests run from an sdist or wheel)")
@pytest.mark.parametrize("backend", ["c", "numpy"])
def test_readme_python_example_runs(backend, tmp_path, monkeypatch):
    import cnnx
    if backend == "c":
        pytest.importorskip("cnnx._kernels", reason="the C extension is not built")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)  # the example saves model.npz in the working directory
    namespace = {}
    with cnnx.backend(backend):
        exec(compile(blocks[0], str(README), "exec"), namespace)
    assert os.path.exists(tmp_path / "model.npz")
    assert namespace["y"].shape == (64, 4, 14, 14)
