"""README.md is the front door: its set-up and test command are what ``.ci/run`` executes, and every Python
block in it runs as written on the bundled fixtures.

A block that cannot run in the suite is preceded by ``<!-- not-run: REASON -->``; the count of such blocks is
pinned here, so adding one is a visible decision. The Serving client block runs against a real server started
with the README's own ``tokenprune serve`` command; the only change made to the block is the port (a free one
instead of 8000, which another process on the machine may hold)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from server_process import serve_process

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.+?)\s*-->")
NOT_RUN_BLOCKS = 1  # README Python blocks marked not-run (keep at the minimum; each needs a reason): vLLM (#20)
SERVER_URL = "http://127.0.0.1:8000/v1"


@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    section: str  # the nearest heading above
    code: str
    not_run: str | None  # the reason given in a preceding <!-- not-run: ... --> comment


def blocks(text: str) -> list[Block]:
    """Fenced code blocks of a markdown text, with their section and not-run marker."""
    out, lines, i, section = [], text.splitlines(), 0, ""
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.startswith("```") and len(line) > 3:
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = NOT_RUN.search(prev)
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            out.append(Block(line[3:].strip(), i + 1, section, "\n".join(lines[i + 1: j]) + "\n",
                             marker.group(1) if marker else None))
            i = j
        i += 1
    return out


def commands(script: str) -> list[str]:
    """Shell commands (continued lines joined) without blank lines, comment lines and trailing ``  # comments``."""
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in script.replace("\\\n", " ").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


README_BLOCKS = blocks(README.read_text())
PYTHON = [b for b in README_BLOCKS if b.lang == "python"]


def setup_and_test_commands() -> tuple[list[str], str]:
    """The README's "Set up" block and its test command."""
    setup = [b for b in README_BLOCKS if b.lang == "bash" and b.section == "Set up"]
    assert setup, "README.md has no bash block under '## Set up'"
    tests = [c for b in setup for c in commands(b.code) if c.startswith("python3 -m pytest")]
    assert len(tests) == 1, f"README's Set up section should name one test command, found {tests}"
    return commands(setup[0].code), tests[0]


def test_ci_runs_the_readme_setup_then_its_test_command():
    setup, test_cmd = setup_and_test_commands()
    ci = commands(CI.read_text())
    starts = [i for i in range(len(ci)) if ci[i: i + len(setup)] == setup]
    assert starts, f".ci/run does not run the README's set-up lines {setup} in order; it runs {ci}"
    assert test_cmd in ci[starts[0] + len(setup):], f".ci/run does not run {test_cmd!r} after the set-up"
    assert "torch==" in setup[0], "the CPU torch pin must be installed first"
    assert not re.search(r"(^|\s)-q+(\s|$)", test_cmd), "a -q on top of addopts' -q hides pytest's summary line"


def test_readme_blocks_are_parsed():
    assert len(PYTHON) >= 4  # intro, quickstart, early exit, serving client
    marked = [b for b in PYTHON if b.not_run]
    assert len(marked) == NOT_RUN_BLOCKS, (
        f"README Python blocks marked <!-- not-run: ... -->: {[(b.line, b.not_run) for b in marked]}; a block that "
        f"cannot run on the bundled fixtures needs that marker and NOT_RUN_BLOCKS in tests/test_readme.py updated")


def test_readme_eval_command_has_no_failing_cell(tmp_path):
    """The README's ``tokenprune-eval`` example, on 4 questions without timing: every cell is measured."""
    from evals.cli import main

    cmd = next(c for b in README_BLOCKS if b.lang == "bash" for c in commands(b.code)
               if c.startswith("tokenprune-eval"))
    quick = ["--limit", "4", "--latency-samples", "0", "--overlays", "0", "--no-progress", "--out", str(tmp_path)]
    assert main([*shlex.split(cmd)[1:], *quick]) == 0
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert len(cells) > 6 and all(c["status"] == "ok" for c in cells), [(c["method"], c["budget"], c.get("error"))
                                                                        for c in cells if c["status"] != "ok"]


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory):
    """The README's ``tokenprune serve`` command (optional [..] parts dropped) on a free port."""
    pytest.importorskip("openai")
    serve = next(c for b in README_BLOCKS if b.lang == "bash" for c in commands(b.code)
                 if c.startswith("tokenprune serve"))
    args = shlex.split(re.sub(r"\[[^\]]*\]", "", serve))[2:]
    with serve_process([*args, "--threads", "1"], tmp_path_factory.mktemp("readme_serve") / "server.log") as srv:
        yield srv


@pytest.mark.parametrize("block", [b for b in PYTHON if not b.not_run], ids=lambda b: f"README.md:{b.line}")
def test_readme_python_block_runs(block, request):
    code = block.code
    if SERVER_URL in code:
        code = code.replace(SERVER_URL, request.getfixturevalue("readme_server")["base"] + "/v1")
    exec(compile(code, f"README.md:{block.line}", "exec"), {"__name__": "__readme__"})
