"""docs/own_model.md runs as written: its first Python block is saved as
mymodels.py and each YAML block under the name in its first line; the other
Python blocks run in order, then its shell commands."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_own_model_guide_runs_as_written(tmp_path):
    text = (ROOT / "docs" / "own_model.md").read_text()
    python_blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    bash_blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert python_blocks[0].startswith("# mymodels.py")
    (tmp_path / "mymodels.py").write_text(python_blocks[0])
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):  # files named in their first line
        name = re.match(r"# (\S+\.yaml)", block).group(1)
        (tmp_path / name).write_text(block)
    script = "\n".join(python_blocks[1:])
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "verify passed: True" in done.stdout, done.stdout
    top = re.search(r"each feature's top mechanism: \[(.*)\]", done.stdout).group(1).split(",")
    assert len(set(top)) == 6  # the six known parts are six mechanisms
    apd = Path(sys.executable).parent / "apd"
    for line in (ln for block in bash_blocks for ln in block.splitlines() if ln.startswith("apd ")):
        args = shlex.split(line)
        done = subprocess.run([str(apd), *args[1:]], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, (line, done.stdout[-2000:], done.stderr[-2000:])
