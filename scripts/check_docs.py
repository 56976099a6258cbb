"""Run every shell command block of README.md and docs/*.md as written, in order, in a fresh copy of the repo,
and report each block as passed, failed or skipped with its file:line.

The copy holds the files git tracks (or would track: new files not ignored), so `runs/`, `data/` and other
outputs start empty, as on a fresh clone. `.venv` in the copy links to the venv this script runs in, `python`
on the PATH is that venv's, and PYTHONPATH points at the copy. Blocks run one after another with `bash -e`, so
a later block may use what an earlier one made (README's training run makes runs/tiny).

A block that cannot run on a CPU-only machine from a fresh clone is marked by an HTML comment on the line
before its fence, naming one of REASONS, e.g. `<!-- not-run: gpu -->`; it is listed as skipped.

    .venv/bin/python scripts/check_docs.py                    # all blocks (53 minutes on 2 busy CPU cores)
    .venv/bin/python scripts/check_docs.py --list             # the blocks and their marks; nothing runs
    .venv/bin/python scripts/check_docs.py --only docs/data.md --keep   # one file's blocks; keep the copy
    .venv/bin/python scripts/check_docs.py --reuse /tmp/jaxmoe-docs-XXXX --only docs/lora.md:83   # rerun one
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL = ("bash", "sh", "shell")
LANGUAGES = (*SHELL, "python", "json", "yaml", "text")  # every fence names one, so no command hides untagged
REASONS = {
    "gpu": "needs an NVIDIA GPU",
    "cuda-venv": "needs the CUDA-wheel venv (bash scripts/setup_cuda_venv.sh, a ~4 GB download)",
    "checkpoint": "needs a real GLM-4.5 / GLM-4.5-Air checkpoint or your own files",
    "cluster": "needs several hosts (SLURM or a second machine)",
    "external": "needs a tool outside this repo (ms-swift)",
    "install": "installs packages (network); this check runs in the venv it was started from",
    "suite": "the whole test suite, or this check itself (40-55 minutes each)",
    "template": "a template: `...` stands for your own flags",
}
FENCE = re.compile(r"^```(\S*)\s*$")
MARK = re.compile(r"^<!--\s*not-run:\s*(\S+)\s*-->\s*$")


@dataclass
class Block:
    file: str  # relative to the repo root
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None  # the not-run reason, or None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files(root: Path = ROOT) -> list[str]:
    return ["README.md", *sorted(f"docs/{p.name}" for p in (root / "docs").glob("*.md"))]


def parse_blocks(path: str, root: Path = ROOT) -> tuple[list[Block], list[str]]:
    """-> (every fenced block of the file, problems: unclosed fences, unknown languages or marks, marks that
    stand before no fence)."""
    lines = (root / path).read_text(encoding="utf-8").splitlines()
    blocks, problems, i = [], [], 0
    while i < len(lines):
        if k := MARK.match(lines[i]):
            if k.group(1) not in REASONS:
                problems.append(f"{path}:{i + 1}: unknown not-run reason {k.group(1)!r}; use one of "
                                f"{', '.join(REASONS)}")
            if i + 1 == len(lines) or not FENCE.match(lines[i + 1]):
                problems.append(f"{path}:{i + 1}: not-run mark not directly before a fence")
        elif m := FENCE.match(lines[i]):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                problems.append(f"{path}:{i + 1}: fence never closed")
                break
            lang, mark = m.group(1), MARK.match(lines[i - 1]) if i else None
            if lang not in LANGUAGES:
                problems.append(f"{path}:{i + 1}: fence language {lang!r}: name one of {', '.join(LANGUAGES)}")
            if mark and lang not in SHELL:
                problems.append(f"{path}:{i}: not-run mark before a {lang or 'untagged'} block")
            blocks.append(Block(path, i + 1, lang, "\n".join(lines[i + 1:end]) + "\n", mark and mark.group(1)))
            i = end
        i += 1
    return blocks, problems


def shell_blocks(root: Path = ROOT) -> tuple[list[Block], list[str]]:
    blocks, problems = [], []
    for f in doc_files(root):
        b, p = parse_blocks(f, root)
        blocks += [x for x in b if x.lang in SHELL]
        problems += p
    return blocks, problems


def commands(block: Block) -> list[list[str]]:
    """The simple commands of a block as argv lists (continuations joined, comments dropped, split at ; && ||
    | &, leading VAR=value assignments and heredoc bodies dropped); `$i`-style loop variables become 0."""
    text = re.sub(r"\\\n", " ", block.text)
    out, heredoc = [], None
    for line in text.splitlines():
        if heredoc is not None:  # the body of `cmd <<'EOF'` is input, not commands
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if m := re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line):
            heredoc, line = m.group(1), line[:m.start()]
        lex = shlex.shlex(re.sub(r"\$\{?\w+\}?", "0", line), posix=True, punctuation_chars=";&|<>")
        lex.whitespace_split, lex.commenters = True, "#"
        cmd: list[str] = []
        for tok in [*lex, ";"]:
            if tok and set(tok) <= set(";&|<>"):
                out += [cmd] if cmd else []
                cmd = []
            elif cmd or not re.match(r"^\w+=", tok):
                cmd.append(tok)
    return out


def fresh_copy(dst: Path) -> None:
    """The repo as a fresh clone would hold it (tracked + new unignored files), .venv linked to this venv."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    (dst / ".venv").symlink_to(sys.prefix)


def run_block(b: Block, repo: Path, logs: Path, timeout: int) -> tuple[bool, float, str]:
    env = {**os.environ, "PATH": f"{repo / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(repo)}
    env.pop("XLA_FLAGS", None)  # a block sets its own fake devices
    log = logs / f"{b.file.replace('/', '_')}_{b.line}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", b.text], cwd=repo, env=env, stdout=f,
                                stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"timed out after {timeout} s"
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    return rc == 0, time.perf_counter() - t0, f"exit {rc}; last lines of {log}:\n{tail}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the blocks and their marks; run nothing")
    p.add_argument("--only", nargs="+", default=None, metavar="FILE[:LINE]",
                   help="run only these files' blocks (or the block whose fence is on LINE); the blocks they "
                        "depend on (e.g. README's training run) must be included")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per block (default 1800)")
    p.add_argument("--keep", action="store_true", help="keep the repo copy (its path is printed)")
    p.add_argument("--reuse", default=None, metavar="DIR",
                   help="run in the copy a --keep run left (DIR/repo), with what its blocks made, e.g. to rerun "
                        "a failed block with --only")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    blocks, problems = shell_blocks()
    for msg in problems:
        print(f"error: {msg}", file=sys.stderr)
    if problems:
        return 2
    if a.only:
        blocks = [b for b in blocks if b.file in a.only or b.where in a.only]
    if a.list:
        for b in blocks:
            print(f"{b.where:<28} {'skip: ' + b.skip if b.skip else 'run'}")
        return 0
    tmp = Path(a.reuse) if a.reuse else Path(tempfile.mkdtemp(prefix="jaxmoe-docs-"))
    repo, logs = tmp / "repo", tmp / "logs"
    if not a.reuse:
        repo.mkdir()
        logs.mkdir()
        fresh_copy(repo)
    elif not repo.is_dir():
        print(f"error: --reuse {a.reuse}: no repo/ there; pass the directory a --keep run printed", file=sys.stderr)
        return 2
    print(f"repo copy: {repo}; logs: {logs}", flush=True)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for b in blocks:
        if b.skip:
            counts["skipped"] += 1
            print(f"SKIP {b.where} ({b.skip}: {REASONS[b.skip]})", flush=True)
            continue
        ok, dt, detail = run_block(b, repo, logs, a.timeout)
        counts["passed" if ok else "failed"] += 1
        print(f"{'PASS' if ok else 'FAIL'} {b.where} ({dt:.0f} s)" + ("" if ok else f"\n{detail}"), flush=True)
    print(", ".join(f"{v} {k}" for k, v in counts.items()))
    if not (a.keep or a.reuse):
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
