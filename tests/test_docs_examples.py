"""Every ```python block of README.md and of docs/**/*.md runs as written, offline.

A reader copies a page's blocks in order into one session, so each page's blocks run in order in
one fresh Python process (its working directory a new empty folder; a block that writes
``runs/mine`` writes there). The network is refused inside that process (``socket`` connections
to anything but a local socket raise), so a block that downloads weights or data fails here.

A block that must not run (it needs a GPU, a dataset, several processes) is preceded by
``<!-- no-run: why -->`` on the line before its fence; each such block is one skipped test whose
reason names the page, the line and the why (``-ra`` lists them). Use it sparingly.

Pages are discovered here (README.md, then docs/ recursively), so a page added later is covered.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
NO_RUN = re.compile(r"^\s*<!--\s*no-run:\s*(?P<why>.*?)\s*-->\s*$")
PAGE_TIMEOUT_S = 600

# runs inside the page's process: the blocks come as JSON on stdin, run in one namespace
DRIVER = r'''
import json, os, socket, sys, traceback

def _offline(*args, **kwargs):
    raise OSError("the docs examples run offline: a block tried to open a network connection")

_connect = socket.socket.connect
def _guarded_connect(self, address):
    if self.family == getattr(socket, "AF_UNIX", None):
        return _connect(self, address)
    _offline()
socket.socket.connect = _guarded_connect
socket.socket.connect_ex = lambda self, address: _guarded_connect(self, address) or 0
socket.create_connection = _offline
socket.getaddrinfo = _offline

os.environ.setdefault("MPLBACKEND", "Agg")
blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for i, (name, source) in enumerate(blocks):
    print(f"=== block {i}: {name}", file=sys.stderr, flush=True)
    try:
        exec(compile(source, name, "exec"), namespace)
    except SystemExit as e:
        if e.code not in (None, 0):
            traceback.print_exc()
            print(f"FAILED BLOCK {i}", file=sys.stderr)
            sys.exit(1)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED BLOCK {i}", file=sys.stderr)
        sys.exit(1)
'''


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    source: str
    no_run: str | None  # the marker's reason, or None

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def blocks_of(text: str, page: str) -> list[Block]:
    """The ```python blocks of a Markdown text, with the line of each fence and its marker."""
    lines = text.splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if NO_RUN.match(lines[i]):
                nxt = next((j for j in range(i + 1, len(lines)) if lines[j].strip()), None)
                fm = FENCE.match(lines[nxt]) if nxt is not None else None
                if fm is None or fm.group("info").split()[:1] not in (["python"], ["py"]):
                    raise ValueError(f"{page}:{i + 1}: a no-run marker must come right before a "
                                     f"```python block")
            i += 1
            continue
        fence, indent = m.group("fence"), m.group("indent")
        lang = (m.group("info").split() or [""])[0].lower()
        end = i + 1
        while end < len(lines) and not (lines[end].strip().startswith(fence[0] * len(fence))
                                         and lines[end].strip().strip(fence[0]) == ""):
            end += 1
        if end == len(lines):
            raise ValueError(f"{page}:{i + 1}: a code block that is never closed")
        if lang in ("python", "py"):
            body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:end]]
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = NO_RUN.match(prev)
            if marker and not marker.group("why"):
                raise ValueError(f"{page}:{i}: a no-run marker needs its reason: <!-- no-run: why -->")
            out.append(Block(page, i + 1, textwrap.dedent("\n".join(body)) + "\n",
                             marker.group("why") if marker else None))
        i = end + 1
    return out


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown page under docs/ (the site's own folders included)."""
    found = [root / "README.md"] if (root / "README.md").exists() else []
    found += sorted(p for p in (root / "docs").rglob("*.md") if p.is_file())
    return found


def run_blocks(blocks: list[Block], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread is as fast, and kinder to a busy CI
    payload = json.dumps([(b.name, b.source) for b in blocks])
    return subprocess.run([sys.executable, "-c", DRIVER], input=payload, capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=PAGE_TIMEOUT_S)


def failure_report(blocks: list[Block], proc: subprocess.CompletedProcess) -> str:
    failed = re.findall(r"^FAILED BLOCK (\d+)$", proc.stderr, flags=re.M)
    block = blocks[int(failed[-1])] if failed else None
    where = (f"the block at {block.name} failed:\n\n{block.source}" if block is not None
             else f"the page's process exited with status {proc.returncode}")
    return f"{where}\n--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-6000:]}"


def _collect():
    runnable, skipped = [], []
    for path in pages():
        page = path.relative_to(ROOT).as_posix()
        blocks = blocks_of(path.read_text(encoding="utf-8"), page)
        run = [b for b in blocks if b.no_run is None]
        if run:
            runnable.append(pytest.param(run, id=page))
        skipped += [pytest.param(b, id=b.name) for b in blocks if b.no_run is not None]
    return runnable, skipped


RUNNABLE, NOT_RUN = _collect()


@pytest.mark.slow
@pytest.mark.parametrize("blocks", RUNNABLE)
def test_page_runs_as_written(blocks, tmp_path):
    proc = run_blocks(blocks, tmp_path)
    if proc.returncode != 0:
        pytest.fail(failure_report(blocks, proc), pytrace=False)


@pytest.mark.parametrize("block", NOT_RUN or [pytest.param(None, id="none")])
def test_blocks_marked_no_run(block):
    if block is None:
        pytest.skip("no block is marked no-run")
    pytest.skip(f"no-run {block.name}: {block.no_run}")


def test_discovery_finds_the_readme_and_the_docs():
    found = {p.relative_to(ROOT).as_posix() for p in pages()}
    assert {"README.md", "docs/index.md", "docs/quickstart.md"} <= found
    ids = [p.id for p in RUNNABLE]
    assert "README.md" in ids and "docs/quickstart.md" in ids, ids


def test_the_readmes_links_resolve():
    """The README links into docs/ (mkdocs checks the links between pages; nothing else checks these)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    assert local, "the README links to no page of the docs"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_blocks_of_reads_fences_markers_and_lines():
    text = textwrap.dedent("""\
        # t
        ```bash
        echo no
        ```
        ```python
        a = 1
        ```

        <!-- no-run: needs a GPU -->

        ```python
        b = 2
        ```
        - a list item:

          ```python
          c = a + 1
          ```
        """)
    got = blocks_of(text, "p.md")
    assert [(b.line, b.source, b.no_run) for b in got] == [
        (5, "a = 1\n", None), (11, "b = 2\n", "needs a GPU"), (16, "c = a + 1\n", None)]
    with pytest.raises(ValueError, match="must come right before"):
        blocks_of("<!-- no-run: x -->\n```bash\nls\n```\n", "p.md")
    with pytest.raises(ValueError, match="needs its reason"):
        blocks_of("<!-- no-run: -->\n```python\nx\n```\n", "p.md")
    with pytest.raises(ValueError, match="never closed"):
        blocks_of("```python\nx = 1\n", "p.md")


def test_a_failing_block_is_reported_with_its_text_and_stderr(tmp_path):
    blocks = blocks_of("```python\nx = 41\n```\n\n```python\nassert x == 42, 'x is not 42'\n```\n", "p.md")
    proc = run_blocks(blocks, tmp_path)
    assert proc.returncode == 1
    report = failure_report(blocks, proc)
    assert "the block at p.md:5 failed" in report
    assert "assert x == 42" in report and "AssertionError: x is not 42" in report


def test_blocks_share_one_process_per_page_and_run_offline(tmp_path):
    source = ("```python\nimport socket\nopen('here.txt', 'w').write('1')\n```\n"
              "```python\nsocket.create_connection(('192.0.2.1', 80), timeout=1)\n```\n")
    blocks = blocks_of(source, "p.md")
    proc = run_blocks(blocks, tmp_path)
    assert (tmp_path / "here.txt").read_text() == "1"  # the page's folder is its working directory
    assert proc.returncode == 1 and "the docs examples run offline" in proc.stderr
    assert "the block at p.md:5 failed" in failure_report(blocks, proc)
