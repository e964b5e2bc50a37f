"""The README, as a newcomer follows it: its marked examples run in order in an empty folder and print what
it says they print, and every number it quotes is the rendering of the committed results files.

A block preceded by ``<!-- readme-test -->`` is run: ``bash`` blocks line by line (each ``lora-analysis ...``
command through :func:`lora_analysis.cli.main`, in this process, so the chain takes seconds), ``python``
blocks with ``exec``, all in one temporary folder with a private ``LORA_ANALYSIS_HOME``. A line ``#   text``
under a command is (part of) its expected output; ``…`` stands for anything. Training commands get
``--steps 30 --pretrain-steps 30`` (the README says so) to stay fast.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from benchmarks import readme_numbers
from lora_analysis.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKED = re.compile(r"<!-- readme-test -->\n```(?P<lang>\w+)\n(?P<code>.*?)\n```", re.S)
FAST = {"train": ["--steps", "30", "--pretrain-steps", "30"], "sweep": ["--steps", "30", "--pretrain-steps", "30"]}


def marked_blocks(text: str) -> list[tuple[str, str]]:
    return [(m["lang"], m["code"]) for m in MARKED.finditer(text)]


def commands(code: str) -> list[tuple[str, list[str]]]:
    """(command line, expected output lines) of a shell block; comments that are not ``#   `` lines are prose."""
    out: list[tuple[str, list[str]]] = []
    for line in code.splitlines():
        if line.startswith("#   "):
            assert out, f"an output line with no command above it: {line!r}"
            out[-1][1].append(line[4:].strip())
        elif line.strip() and not line.startswith("#"):
            out.append((line, []))
    return out


def shows(output: str, expected: str) -> bool:
    """Whether ``output`` contains ``expected``, whose ``…`` stands for anything (in order)."""
    pattern = ".*?".join(re.escape(part) for part in expected.split("…"))
    return re.search(pattern, output) is not None


def test_readme_output_lines_are_matched_as_written():
    assert shows("run 2026-abc: completed\n", "run …: completed")
    assert not shows("run 2026-abc: failed\n", "run …: completed")
    assert commands("# prose\nlora-analysis runs list   # note\n#   r32\n") == [("lora-analysis runs list   # note",
                                                                              ["r32"])]


def test_readme_examples_run_in_order_and_print_what_it_says(lora_home, tmp_path, monkeypatch, capsys):
    blocks = marked_blocks(README.read_text())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr("sys.argv", ["lora-analysis"])         # commands print their follow-ups as the README shows
    ran = []
    for lang, code in blocks:
        if lang == "python":
            stdout = io.StringIO()
            namespace: dict = {}
            with contextlib.redirect_stdout(stdout):
                exec(compile(code, "README.md", "exec"), namespace)      # noqa: S102 - the README's own snippet
            from lora_analysis.lora.model import lora_layers
            assert stdout.getvalue().split() == ["4096"]                  # the count its comment states
            assert not lora_layers(namespace["plain"]) and len(lora_layers(namespace["mlp"])) == 2
            assert (work / "my-adapter" / "adapter_config.json").is_file()
            ran.append("python")
            continue
        assert lang == "bash", lang
        for line, expected in commands(code):
            argv = shlex.split(line, comments=True)
            assert argv[0] == "lora-analysis", line
            argv = argv[1:] + FAST.get(argv[1], [])
            code_ = main(argv)
            captured = capsys.readouterr()
            output = captured.out + captured.err
            assert code_ == 0, f"{line}\n{output}"
            for want in expected:
                assert shows(output, want), f"{line}: expected {want!r} in\n{output}"
            ran.append(argv[0])
    # the chain a newcomer needs is there: counting, training, the store, analyses, a report, the library
    assert {"params", "train", "sweep", "runs", "spectra", "similarity", "report", "python"} <= set(ran), ran
    assert (work / "report.html").is_file() and (work / "shared" / "report.html").is_file()


def test_readme_quotes_exactly_the_committed_numbers():
    """The README's numbers blocks are the rendering of benchmarks/results/*.json (refresh them with
    ``python -m benchmarks.readme_numbers --render-only --write-readme``)."""
    blocks = readme_numbers.readme_blocks(README.read_text())
    assert set(blocks) == {"results", "benchmarks", "ray"}
    rendered = readme_numbers.render()
    for name, body in rendered.items():
        assert blocks[name] == body, (f"README block {name!r} differs from benchmarks/results: run python -m "
                                      "benchmarks.readme_numbers --render-only --write-readme")


def test_a_changed_number_changes_the_rendering(tmp_path):
    """The check above can fail: one accuracy changed in the JSON gives another block, and writing it
    replaces only the blocks' bodies."""
    import json

    numbers = json.loads(readme_numbers.JSON_PATH.read_text())
    before = readme_numbers.render_results(numbers)
    numbers["mlp_digits"]["runs"][0]["val_accuracy"] += 0.1
    after = readme_numbers.render_results(numbers)
    assert before != after
    copy = tmp_path / "README.md"
    copy.write_text("intro\n<!-- readme-numbers:results:start -->\nold\n<!-- readme-numbers:results:end -->\nend\n")
    readme_numbers.write_readme({"results": after}, copy)
    assert copy.read_text() == f"intro\n<!-- readme-numbers:results:start -->\n{after}<!-- readme-numbers:results:end -->\nend\n"
    with pytest.raises(ValueError, match="no block"):
        readme_numbers.write_readme({"ray": "x\n"}, copy)
