"""The doc commands (scripts/check_docs.py runs them all; too slow for CI): every fenced block of README.md and
docs/*.md names its language, every shell block runs on a CPU or is marked `<!-- not-run: REASON -->` with a
known reason, and every jaxmoe command in them (marked ones included) passes its own argument parser, run as
`python -m ...` would run it but stopped right after parsing."""
from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import check_docs  # noqa: E402

BLOCKS, PROBLEMS = check_docs.shell_blocks()


def test_every_shell_block_runs_or_says_why():
    assert PROBLEMS == []
    runnable = {b.where for b in BLOCKS if b.skip is None}
    assert "README.md:17" in runnable  # the quick start's training run
    for b in BLOCKS:
        if b.skip is None:  # a runnable block holds no placeholder for the user's own paths or flags
            assert not any(t in ("...", "path/to/") or "path/to/" in t for cmd in check_docs.commands(b)
                           for t in cmd), b.where


def test_marks_and_fences_are_checked(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("<!-- not-run: gpu -->\n```bash\nnvidia-smi\n```\n\n```\nls\n```\n")
    (tmp_path / "docs" / "a.md").write_text("<!-- not-run: someday -->\n```bash\nls\n```\n<!-- not-run: gpu -->\n\n"
                                            "text\n```python\nx = 1\n```\n```bash\nunclosed\n")
    blocks, problems = check_docs.shell_blocks(tmp_path)
    assert [(b.where, b.skip) for b in blocks] == [("README.md:2", "gpu"), ("docs/a.md:2", "someday")]
    assert problems == [
        "README.md:6: fence language '': name one of bash, sh, shell, python, json, yaml, text",
        "docs/a.md:1: unknown not-run reason 'someday'; use one of " + ", ".join(check_docs.REASONS),
        "docs/a.md:5: not-run mark not directly before a fence",
        "docs/a.md:11: fence never closed"]


def test_commands_are_split_like_the_shell():
    b = check_docs.Block("x.md", 1, "bash", "export A=1\nfor i in 0 1; do\n  X=2 python -m m --a 1 \\\n    --id $i &\n"
                         "done; wait -n && wait -n  # both\npython - <<'EOF'\nimport os\nEOF\nsrun python s.py 'a b'\n",
                         None)
    assert check_docs.commands(b) == [["export", "A=1"], ["for", "i", "in", "0", "1"], ["do"],
                                      ["python", "-m", "m", "--a", "1", "--id", "0"], ["done"], ["wait", "-n"],
                                      ["wait", "-n"], ["python", "-"], ["srun", "python", "s.py", "a b"]]


def _entry_points():
    """argv of python for each `python -m jaxmoe...` / `python scripts/x.py` command (not pytest, pip, `-c`, or
    `...` templates)."""
    out = []
    for b in BLOCKS:
        for i, cmd in enumerate(check_docs.commands(b)):
            cmd = cmd[1:] if cmd[:1] == ["srun"] else cmd
            if not cmd or os.path.basename(cmd[0]) not in ("python", "python3") or "..." in cmd or len(cmd) < 2:
                continue
            if (cmd[1] == "-m" and cmd[2].startswith("jaxmoe")) or cmd[1].startswith("scripts/"):
                out.append(pytest.param(cmd[1:], id=f"{b.where}#{i}"))
    return out


class _Parsed(BaseException):
    """Raised right after an entry point's parser accepted its argv: nothing of the job runs."""


@pytest.mark.parametrize("argv", _entry_points())
def test_command_flags_parse(argv, monkeypatch, capsys):
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # bench scripts set XLA_FLAGS before parsing
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(ROOT)
    module = argv[1] if argv[0] == "-m" else None
    monkeypatch.setattr(sys, "argv", [module or argv[0], *argv[2 if module else 1:]])
    with pytest.raises((_Parsed, SystemExit)) as e:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
    if isinstance(e.value, SystemExit):  # argparse rejected the command, or --help printed and exited 0
        assert e.value.code == 0 and "--help" in argv, capsys.readouterr().err[-2000:]
