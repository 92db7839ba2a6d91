"""The README's commands that take a run path, run as printed on folders the framework really makes.

A sweep made as the README makes it (`python train.py -m fusion=square,none ...` in a fresh folder:
`multirun/<date>/<time>/<job>/`), its eval folders, and a sweep of token-cache runs made as the
fusion study makes it (`hydra.sweep.dir=$E/sweep`). The README's placeholders are replaced by those
real folders, nothing is quoted, and each `for ckpt in ...; do ...; done` loop runs word for word: its
glob expanded, `$ckpt` put in, each `python SCRIPT ARGS` of its body run as the shell would split it.
"""

from __future__ import annotations

import re
import runpy
import shlex
import shutil
from pathlib import Path

import pytest
from helpers.configs import tiny_overrides
from helpers.scripts import REPO, run_script
from hydra.core.override_parser.overrides_parser import OverridesParser

from squarefuse.report.app import make_report

pytestmark = pytest.mark.slow

# `for ckpt in <glob>; do <command> [&& <command>]; done`, over one or more lines.
LOOP = re.compile(r"^for ckpt in (\S+); do\s*\n?\s*(.+?); done$", re.M | re.S)
# Placeholders the README writes for folders the framework makes, longest first.
SWEEP_PLACEHOLDER = "multirun/<date>/<time>"
TOKEN_SWEEP_PLACEHOLDER = "$E/sweep"
RUN_PLACEHOLDERS = ("runs/<date>/<time>", "runs/...", "<run>")


def documented_code() -> str:
    """Every fenced code block of the README and of docs/*.md, one after the other, a command a line."""
    lines, language = [], None  # language: None outside a fence, else the fence's tag
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in page.read_text().splitlines():
            if line.lstrip().startswith("```"):
                language = line.strip().strip("`") if language is None else None
            elif language in ("bash", "sh", "shell", ""):
                lines.append(line)
    return "\n".join(lines).replace("\\\n", " ")  # a command continued on the next line is one line


def documented_loops() -> list[tuple[str, str]]:
    """(glob, body) of every eval loop the docs show, each once."""
    return sorted(set(LOOP.findall(documented_code())))


def run_loop(glob: str, body: str, cwd: Path) -> list[Path]:
    """The loop as bash runs it in `cwd`; the checkpoints it went over."""
    checkpoints = sorted(cwd.glob(glob))
    assert checkpoints, f"{glob} matches nothing in {cwd}"
    for ckpt in checkpoints:
        for command in body.split("&&"):
            words = shlex.split(command.replace("$ckpt", str(ckpt.relative_to(cwd))))
            assert words[0] == "python", command
            out = run_script(words[1], *words[2:], cwd=cwd)
            assert out.returncode == 0, f"{' '.join(words)}\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
    return checkpoints


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, str]:
    """A folder in which the README's sweep ran: (that folder, `multirun/<date>/<time>` as made)."""
    cwd = tmp_path_factory.mktemp("readme")
    tiny = [o for o in tiny_overrides(cwd / "data") if not o.startswith("fusion.")]  # fusion=none has no K
    out = run_script("train.py", "-m", "fusion=square,none", *tiny, "trainer.epochs=1", cwd=cwd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (made,) = (cwd / "multirun").glob("*/*")
    return cwd, str(made.relative_to(cwd))


@pytest.fixture(scope="module")
def token_sweep(sweep) -> Path:
    """The fusion study's `$E/sweep`: runs on a token cache of one of the sweep's checkpoints."""
    cwd, made = sweep
    ckpt = next(iter(sorted((cwd / made).glob("*/checkpoints/last.pt")))).relative_to(cwd)
    for split in ("train", "val"):
        out = run_script("scripts/cache_tokens.py", f"ckpt={ckpt}", f"split={split}", "out=E/cache", cwd=cwd)
        assert out.returncode == 0, out.stderr[-3000:]
    args = ["-m", "dataset=tokens", "dataset.root=E/cache", "fusion=square,none", "trainer.epochs=1"]
    args += ["trainer.num_workers=0", "trainer.device=cpu", "trainer.precision=fp32", "hydra.sweep.dir=E/sweep"]
    out = run_script("train.py", *args, cwd=cwd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return cwd / "E" / "sweep"


def test_the_docs_show_the_eval_loop_on_both_kinds_of_sweep():
    globs = {glob for glob, _ in documented_loops()}
    assert f"{SWEEP_PLACEHOLDER}/*/checkpoints/best.pt" in globs
    assert f"{TOKEN_SWEEP_PLACEHOLDER}/*/checkpoints/best.pt" in globs


def test_eval_loops_run_as_printed_on_a_real_sweep_and_the_report_reads_them(sweep, token_sweep):
    cwd, made = sweep
    evaluated = []
    for glob, body in documented_loops():
        real = glob.replace(SWEEP_PLACEHOLDER, made).replace(TOKEN_SWEEP_PLACEHOLDER, "E/sweep")
        assert "<" not in real and "$" not in real, f"a placeholder this test does not know: {glob}"
        evaluated += run_loop(real, body, cwd)
    assert {p.parents[1].parent for p in evaluated} == {cwd / made, token_sweep}
    for ckpt in evaluated:  # in order and reversed, as the loop's two commands
        orders = sorted(p.parent.name.endswith("reversed") for p in ckpt.parents[1].glob("eval/*/results.json"))
        assert orders == [False, True], ckpt
    # `python scripts/report.py multirun/<date>/<time>/` groups the runs by their overrides.
    for folder in (made, "E/sweep"):
        out = run_script("scripts/report.py", f"{folder}/", cwd=cwd)
        assert out.returncode == 0, out.stderr[-3000:]
    labels = {s.label for s in make_report([cwd / made], cwd / "report_check").summaries}
    assert labels == {"fusion=square", "fusion=none"}


def test_every_documented_run_path_parses_unquoted_with_real_folders(sweep):
    """Each `key=<run path>` the docs show, with a real run and sweep folder put in, is one plain value."""
    cwd, made = sweep
    run = sorted((cwd / made).glob("*"))[0].relative_to(cwd)
    parser = OverridesParser.create()
    checked = 0
    for line in documented_code().splitlines():
        for word in shlex.split(line, comments=True):
            if "=" not in word or not any(p in word for p in (SWEEP_PLACEHOLDER, *RUN_PLACEHOLDERS)):
                continue
            real = word.replace(SWEEP_PLACEHOLDER, made)
            for placeholder in RUN_PLACEHOLDERS:
                real = real.replace(placeholder, str(run))
            (override,) = parser.parse_overrides([real])
            assert override.value() == real.split("=", 1)[1], word
            checked += 1
    assert checked >= 5


def test_a_path_hydra_cannot_read_unquoted_gets_how_to_quote_it(sweep):
    cwd, made = sweep
    source = sorted((cwd / made).glob("*/checkpoints/best.pt"))[0]
    odd = cwd / "runs" / "0_fusion=none,trainer.seed=0" / "checkpoints"  # a folder named as before
    odd.mkdir(parents=True)
    shutil.copy(source, odd / "best.pt")
    path = (odd / "best.pt").relative_to(cwd)
    out = run_script("eval.py", f"ckpt={path}", cwd=cwd)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "mismatched input" not in out.stderr
    suggested = f"\"ckpt='{path}'\""
    assert "quote it" in out.stderr and suggested in out.stderr, out.stderr
    assert not (odd.parent / "eval").exists()  # nothing was made
    out = run_script("eval.py", *shlex.split(suggested), cwd=cwd)  # and the suggestion works
    assert out.returncode == 0, out.stderr[-2000:]


# The apps whose arguments are Hydra overrides; every other documented script takes argparse flags.
HYDRA_APPS = {"train.py", "eval.py", *(f"scripts/{s}.py" for s in ("predict", "extract", "export", "cache_tokens"))}
COMMAND = re.compile(
    r"(?:^|&&|;|\bdo\b)\s*(?:[A-Z_]+=\S+\s+)*(?:python|torchrun(?:\s+--\S+)*)\s+(\S+\.py)\b(.*?)(?=&&|;|$)"
)


def documented_commands() -> list[tuple[str, list[str]]]:
    """(script, arguments) of every `python SCRIPT ...` / `torchrun ... SCRIPT ...` in the docs' code
    blocks, shell variables the blocks set (`E=...`, `D="..."`) put in, as the shell would split them."""
    code = documented_code()
    variables = dict(re.findall(r"(?:^|;\s*)([A-Z])=([^\s;'\"]+|'[^']*'|\"[^\"]*\")(?=;|\s*$)", code, re.M))
    variables = {name: " ".join(shlex.split(value)) for name, value in variables.items()} | {"ckpt": "x/best.pt"}
    commands = []
    for line in code.splitlines():
        line = line.split(" #", 1)[0]
        for name, value in variables.items():  # "$B" stays one word, $D splits
            line = line.replace(f'"${name}"', shlex.quote(value)).replace(f"${name}", value)
        line = re.sub(r"<(\w+)>", r"\1", line)  # placeholders: runs/<date>/<time> -> runs/date/time
        for match in COMMAND.finditer(line):
            commands.append((match.group(1), shlex.split(match.group(2))))
    return commands


class _Parsed(Exception):
    """Raised once a script's argparse parser accepted its arguments: nothing else runs."""


def test_every_documented_command_parses(monkeypatch, tmp_path):
    """Hydra overrides parse (and train.py's compose); argparse scripts accept their flags."""
    import argparse  # noqa: PLC0415 - only this test patches it

    from helpers.configs import compose_config  # noqa: PLC0415

    commands = documented_commands()
    scripts = {script for script, _ in commands}
    assert {"train.py", "eval.py", "scripts/report.py", "scripts/temporal_benchmark.py"} <= scripts, scripts
    parse_known_args = argparse.ArgumentParser.parse_known_args

    def parse_then_stop(self, args=None, namespace=None):
        parse_known_args(self, args, namespace)  # exits 2 on a flag it does not know
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_then_stop)
    parser = OverridesParser.create()
    for script, args in commands:
        where = f"{script} {shlex.join(args)}"
        assert (REPO / script).is_file(), where
        if script in HYDRA_APPS:
            overrides = [a for a in args if not a.startswith("-")]
            parsed = parser.parse_overrides(overrides)
            if script == "train.py" and "-m" not in args:
                compose_config("train", [o.input_line for o in parsed if not o.key_or_group.startswith("hydra")])
            continue
        monkeypatch.setattr("sys.argv", [script, *args])
        monkeypatch.syspath_prepend(str((REPO / script).parent))  # as `python scripts/x.py` puts scripts/ first
        monkeypatch.chdir(tmp_path)
        with pytest.raises(_Parsed):
            runpy.run_path(str(REPO / script), run_name="__main__")
