"""README.md: one screen to a first result, links that lead somewhere, and the "Train on your own data"
lines run as written (offline, in a fresh folder), so the README cannot drift from the commands."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from demo.server import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The jobs the README sends its reader to (the docs issue's list), each a page of its own.
DOCS = ["own-data", "store", "objectives", "orchestration", "report", "grid", "encoders"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _section(text: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section '## {heading}'"
    return match.group(1)


def _bash_block(section: str) -> str:
    match = re.search(r"^```bash\n(.*?)^```", section, re.M | re.S)
    assert match, "the section has no ```bash block"
    return match.group(1)


def test_readme_is_one_screen_to_a_first_result():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: move the detail to docs/"
    # The two commands CI and the project rely on, as they are, near the top.
    commands = [line.split("#")[0].strip() for line in _bash_block(_section(text, "The two commands")).splitlines()]
    assert commands == ["make demo", "make test"]
    assert lines.index("## The two commands") < 20
    assert lines.index("## Train on your own data") < lines.index("## What it does")


def test_readme_links_every_doc_and_every_link_resolves():
    readme_links = LINK.findall(README.read_text())
    for name in DOCS:
        assert f"docs/{name}.md" in readme_links, f"README.md does not link docs/{name}.md"
    for target in ("ARCHITECTURE.md", "BENCHMARKS.md", "CHANGELOG.md"):
        assert target in readme_links, f"README.md does not link {target}"
    for page in [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for link in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", link):  # https:, mailto:
                continue
            path = link.split("#")[0]
            assert (page.parent / path).exists(), f"{page.relative_to(ROOT)} links {link}, which does not exist"


@pytest.mark.slow
def test_readme_own_data_lines_run_offline_in_a_fresh_folder(tmp_path):
    block = _bash_block(_section(README.read_text(), "Train on your own data"))
    # The one change: a free port for the stand-in server, so that two runs of this test never collide.
    assert "--port 8765" in block and "http://127.0.0.1:8765" in block
    block = block.replace("8765", str(free_port()))
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").exists():
        pytest.skip(f"the README's lines activate .venv; this interpreter ({sys.executable}) is not in a venv")
    (tmp_path / ".venv").symlink_to(venv)  # what `make demo` / `make test` leave in a fresh clone
    env = {**os.environ, "ECLIPSE_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # no hub: everything is local
    log = tmp_path / "readme.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-e", "-c", block], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=600)
        finally:
            try:  # a line that failed leaves the background server running: stop our own process group
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    assert rc == 0, log.read_text()[-4000:]

    mine = tmp_path / "runs" / "mine"
    manifest = json.loads((mine / "data" / "store" / "_manifest.json").read_text())
    rows = sum(shard["rows"] for shard in manifest["shards"].values())
    assert rows == 600, f"{rows} rows stored of 600 urls:\n{log.read_text()[-4000:]}"
    assert (mine / "run" / "prior" / "diffusion_pytorch_model.safetensors").exists()
    metrics = json.loads((mine / "eval" / "metrics.json").read_text())
    assert "run" in metrics["models"] and "text-shift" in metrics["models"]
    assert (mine / "eval" / "report.html").stat().st_size > 0
