"""What the documentation shows runs as written.

Every shell command shown in README.md, docs/*.md and benchmarks/README.md (fenced bash/sh/shell/console blocks,
unmarked blocks of commands, and inline `...` spans that start with a program) goes through the parser of the
program it names: `decd-search` and `decd-convert` (their entry points), `python examples/*.py`, `app.py`,
`scripts/*.py` and `benchmarks/*.py` (their argparse / HfArgumentParser parsing), `accelerate launch` and
`torchrun` (the launcher's own parser, then the command it launches), `make` (the Makefile's targets and
variables), `pip install` (the extras setup.cfg declares) and `milvus-server` (its parser). The usage lines of the command-line modules'
docstrings are parsed the same way. The README's `decd-search` commands for the tiny model and its Python
examples run against a tiny model saved here; the "without this package" example runs in a process that cannot
import `decd`.

Placeholders (`$CLIP`, INDEX, /data/...) are fine: a command is parsed, not run. An inline span is a fragment: it
may leave out what the program requires (positional arguments, examples/train.py's recipe), but every option and
value it shows must be accepted. A value in capitals given to an option that wants a number (`--machine_rank R`)
is read as 1, and a GPU recipe (bf16) is parsed as on a GPU that supports it.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import contextlib
import importlib
import importlib.util
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from .helpers import BLOCK_REPOSITORY_MODULES, save_tiny_model

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *(path.relative_to(REPO).as_posix() for path in sorted((REPO / "docs").glob("*.md"))),
             "benchmarks/README.md"]
# Modules whose docstring shows their command line (indented usage lines).
USAGE_DOCSTRINGS = ["decd/cli.py", "decd/convert.py", "app.py", *sorted(
    path.relative_to(REPO).as_posix() for pattern in ("examples/*.py", "scripts/*.py", "benchmarks/*.py")
    for path in REPO.glob(pattern))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
SETUP = configparser.ConfigParser()
SETUP.read(REPO / "setup.cfg")
CONSOLE_SCRIPTS = dict(line.replace(" ", "").split("=", 1)
                       for line in SETUP["options.entry_points"]["console_scripts"].strip().splitlines())
EXTRAS = set(SETUP["options.extras_require"])
SCRIPT = re.compile(r"(?:examples|scripts|benchmarks)/\w+\.py|app\.py")
PROGRAMS = {"python", "python3", "accelerate", "torchrun", "make", "pip", "milvus-server", *CONSOLE_SCRIPTS}
OPERATORS = {";", "&&", "||", "|", "&"}
# What an inline fragment may leave out: argparse's required arguments, examples/train.py's recipe or dataset.
FRAGMENT_LEAVES_OUT = r"arguments are required|one of the arguments .* is required|no dataset: give a recipe"
TINY_MODEL = "outputs/decd-tiny-synthetic"  # the README's model folder; a tiny random model stands in for it
GALLERY_ON_DISK = {"/data/my_crops": "my_crops"}  # the README's gallery folder -> a generated one in the workspace


# ---------------------------------------------------------------------------------------------
# Finding the commands
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shown:
    where: str  # file:line
    text: str  # the command as shown (continuation lines joined, comments dropped)
    fragment: bool  # an inline span: it may leave out required arguments

    def __str__(self) -> str:
        return self.where


def _fences(lines: list[str]):
    """(language, number of the first body line, body lines) of each fenced block."""
    blocks, opened = [], None
    for number, line in enumerate(lines, start=1):
        match = re.match(r"\s*```\s*([\w+-]*)", line)
        if not match:
            if opened is not None:
                opened[2].append(line)
            continue
        if opened is None:
            opened = (match.group(1).lower(), number + 1, [])
        else:
            blocks.append(opened)
            opened = None
    return blocks


def _is_command(text: str) -> bool:
    words = text.split()
    return len(words) > 1 and (words[0] in PROGRAMS or SCRIPT.fullmatch(words[0]) is not None)


def _block_commands(body: list[str], language: str) -> list[tuple[int, str]]:
    """(offset, command) for each command of a shell block; continuation lines joined, comments kept."""
    commands, pending, start = [], "", 0
    for offset, line in enumerate(body):
        if language == "console":
            if not pending and not line.startswith("$ "):
                continue  # output
            line = line[2:] if not pending else line
        if not pending:
            start = offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        command, pending = (pending + line).strip(), ""
        if command and not command.startswith("#"):
            commands.append((start, command))
    return commands


def shown_commands(document: str) -> list[Shown]:
    lines = (REPO / document).read_text(encoding="utf-8").splitlines()
    found = []
    fenced_lines = set()
    for language, first, body in _fences(lines):
        fenced_lines.update(range(first - 1, first + len(body) + 1))
        commands = _block_commands(body, language)
        if language in SHELL_LANGUAGES or (language == "" and commands and all(
                _is_command(command) or "=" in command.split()[0] for _, command in commands)):
            found += [Shown(f"{document}:{first + offset}", command, False) for offset, command in commands]
    prose = "\n".join("" if number in fenced_lines else line for number, line in enumerate(lines, start=1))
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        text = " ".join(match.group(1).split())
        if _is_command(text):
            found.append(Shown(f"{document}:{prose.count(chr(10), 0, match.start()) + 1}", text, True))
    return found


def usage_lines(module: str) -> list[Shown]:
    """The usage lines of a module's docstring: indented lines that start with a program, with their indented
    continuation lines; each optional `[...]` group is taken once included (first alternative of a|b) and once
    left out, and a trailing `(...)` remark is dropped."""
    tree = ast.parse((REPO / module).read_text(encoding="utf-8"))
    docstring = ast.get_docstring(tree, clean=False) or ""
    commands, current = [], None
    for number, line in enumerate(docstring.splitlines(), start=2):
        stripped = line.strip()
        indented = line.startswith("    ")
        if indented and current is not None and (current[1].endswith("\\") or stripped.startswith("[")):
            current[1] = current[1].removesuffix("\\") + " " + stripped
        elif indented and _is_command(stripped):
            current = [number, stripped]
            commands.append(current)
        else:
            current = None
    found = []
    for number, text in commands:
        text = re.sub(r"\s{2,}(\(.*\)|#.*)$", "", text)
        included = _with_optional_groups(text, lambda group: re.sub(r"(\S+?)\|\S+", r"\1", group))
        left_out = _with_optional_groups(text, lambda group: "")
        found += [Shown(f"{module}:{number} ({which})", variant, False)
                  for which, variant in (("options included", included), ("options left out", left_out))]
    return found


def _with_optional_groups(text: str, replace) -> str:
    """`text` with each optional group of a synopsis (`[--top_k 10]`: brackets that open a word, outside quotes)
    replaced by `replace(its contents)`."""
    pieces, quote, start, depth, opened = [], None, 0, 0, 0
    for position, character in enumerate(text):
        if quote:
            quote = None if character == quote else quote
        elif character in "'\"":
            quote = character
        elif character == "[" and (depth or position == 0 or text[position - 1] == " "):
            if depth == 0:
                opened = position
            depth += 1
        elif character == "]" and depth:
            depth -= 1
            if depth == 0:
                inner = _with_optional_groups(text[opened + 1:position], replace)
                pieces += [text[start:opened], "" if inner == "..." else replace(inner)]  # [...]: "and so on"
                start = position + 1
    return "".join(pieces) + text[start:]


def _optional_groups(shown: Shown) -> list[Shown]:
    """An inline synopsis `cmd A [--x X]`: checked with and without its optional groups."""
    variants = {_with_optional_groups(shown.text, lambda group: group), _with_optional_groups(shown.text, lambda _: "")}
    return [Shown(shown.where, " ".join(variant.split()), shown.fragment) for variant in sorted(variants)]


ALL_SHOWN = [variant for document in DOCUMENTS for shown in shown_commands(document)
             for variant in _optional_groups(shown)]


# ---------------------------------------------------------------------------------------------
# Parsing a command with the program's own parser
# ---------------------------------------------------------------------------------------------


class _Parsed(Exception):
    """The script's parser accepted its arguments; raised there so that nothing after the parsing runs."""


class Refused(AssertionError):
    """The program's parser refused the command."""


@contextlib.contextmanager
def _stop_after_parsing():
    """Within: the outermost argparse / HfArgumentParser call raises _Parsed once it has parsed its arguments."""
    from transformers import HfArgumentParser

    depth = [0]

    def stopping(original):
        def parse(self, *args, **kwargs):
            depth[0] += 1
            try:
                result = original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise _Parsed(result)
            return result
        return parse

    names = [(argparse.ArgumentParser, name) for name in
             ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args")]
    names.append((HfArgumentParser, "parse_args_into_dataclasses"))
    with contextlib.ExitStack() as patches:
        for owner, name in names:
            patches.enter_context(mock.patch.object(owner, name, stopping(getattr(owner, name))))
        yield


def _load(relative: str):
    name = "shown_" + re.sub(r"\W", "_", relative)
    if name not in sys.modules:  # registered first: dataclasses look their module up while the file runs
        spec = importlib.util.spec_from_file_location(name, REPO / relative)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(sys.modules[name])
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _parse_pretrain_clip(argv):
    from transformers import HfArgumentParser

    return HfArgumentParser(_load("examples/pretrain_clip.py").PretrainArguments).parse_args_into_dataclasses(args=argv)


def _parse_train(argv):
    from decd.training.recipe import parse_arguments

    here = os.getcwd()
    os.chdir(REPO)  # the docs' recipe paths are relative to the checkout
    try:
        return parse_arguments(argv)
    finally:
        os.chdir(here)


# Entry points that expose their parsing; every other script is run until its parser has parsed (_Parsed).
PARSERS = {
    "decd.cli": lambda argv: importlib.import_module("decd.cli").parse_arguments(argv),
    "decd.convert": lambda argv: importlib.import_module("decd.convert")._build_parser().parse_args(argv),
    "examples/train.py": _parse_train,
    "examples/evaluate.py": lambda argv: _load("examples/evaluate.py").parse_args(argv),
    "examples/push_to_hub.py": lambda argv: _load("examples/push_to_hub.py").parse_args(argv),
    "examples/pretrain_clip.py": _parse_pretrain_clip,
    "app.py": lambda argv: _load("app.py")._parse_args(argv),
}
# Modules that take no arguments: run (they only print).
NO_ARGUMENTS = {"decd.hub.results"}


def _parse(name: str, argv: list[str], parse) -> None:
    """Raise Refused with the parser's message if `parse` refuses `argv`."""
    import transformers.training_args

    stderr = io.StringIO()
    try:
        # A GPU recipe (bf16) is parsed as on a GPU that supports it: the machine's check, not the command's.
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), \
                mock.patch.object(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True):
            parse(argv)
    except _Parsed:
        return
    except SystemExit as stopped:
        if stopped.code in (0, None):  # --help
            return
        message = stderr.getvalue().strip().splitlines()
        raise Refused(f"{name} {shlex.join(argv)}: {message[-1] if message else stopped.code}") from None
    except Exception as error:  # a parser's own check (a recipe, a dataclass's __post_init__)
        raise Refused(f"{name} {shlex.join(argv)}: {type(error).__name__}: {error}") from None


def _run_script_until_parsed(path: str, argv: list[str]):
    def parse(argv):
        with _stop_after_parsing(), mock.patch.object(sys, "argv", [str(REPO / path), *argv]):
            runpy.run_path(str(REPO / path), run_name="__main__")
        raise AssertionError(f"{path} finished without parsing its arguments: add its parser to PARSERS")
    return parse


def check_python(target: list[str]) -> str:
    """`python -m MODULE ARGS` or `python SCRIPT ARGS` (target = the words after `python`)."""
    if target[0] == "-m":
        module, argv = target[1], target[2:]
        if module in NO_ARGUMENTS:
            assert not argv, f"python -m {module} takes no arguments, got {argv}"
            # warnings: the package imports the module before runpy runs it again as __main__ (harmless here)
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                runpy.run_module(module, run_name="__main__")
            return module
        assert module in PARSERS, f"no parser is known for python -m {module}: add it to PARSERS"
        _parse(f"python -m {module}", argv, PARSERS[module])
        return module
    script, argv = target[0], target[1:]
    assert (REPO / script).is_file(), f"{script} does not exist"
    _parse(f"python {script}", argv, PARSERS.get(script) or _run_script_until_parsed(script, argv))
    return script


def check_accelerate(argv: list[str]) -> str:
    from accelerate.commands.launch import launch_command_parser

    assert argv[:1] == ["launch"], f"accelerate {argv[:1]}: only `accelerate launch` is checked"
    parsed = []
    _parse("accelerate launch", argv[1:], lambda argv: parsed.append(launch_command_parser().parse_args(argv)))
    launched = parsed[0]
    inner = (["-m"] if launched.module else []) + [launched.training_script, *launched.training_script_args]
    return "accelerate launch " + check_python(inner)


def check_torchrun(argv: list[str]) -> str:
    from torch.distributed.run import get_args_parser

    parsed = []
    _parse("torchrun", argv, lambda argv: parsed.append(get_args_parser().parse_args(argv)))
    launched = parsed[0]
    assert not launched.no_python, "torchrun --no-python: only Python programs are checked"
    inner = (["-m"] if launched.module else []) + [launched.training_script, *launched.training_script_args]
    return "torchrun " + check_python(inner)


def _makefile() -> tuple[set[str], set[str]]:
    text = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z_][\w.-]*)\s*:(?!=)", text, flags=re.MULTILINE))
    variables = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*[?:+]?=", text, flags=re.MULTILINE))
    return targets, variables


def check_make(argv: list[str]) -> str:
    targets, variables = _makefile()
    for word in argv:
        if "=" in word:
            name = word.split("=", 1)[0]
            assert name in variables, f"make {word}: the Makefile has no variable {name} ({sorted(variables)})"
        else:
            assert word in targets, f"make {word}: the Makefile has no target {word} ({sorted(targets)})"
    return "make"


def check_pip(argv: list[str]) -> str:
    from packaging.requirements import Requirement

    assert argv[:1] == ["install"], f"pip {argv[:1]}: only `pip install` is checked"
    for word in argv[1:]:
        if word.startswith("-"):
            assert word in ("-e", "--editable", "-q", "-U", "--upgrade"), f"pip install {word}: unexpected option"
            continue
        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", word)
        if match:  # this checkout
            extras = set(match.group(1).split(",")) if match.group(1) else set()
            assert extras <= EXTRAS, f"pip install {word}: setup.cfg declares no extra {sorted(extras - EXTRAS)}"
            continue
        requirement = Requirement(word)  # another package, or this one's extras where it is installed
        if requirement.name == SETUP["metadata"]["name"]:
            missing = requirement.extras - EXTRAS
            assert not missing, f"pip install {word}: setup.cfg declares no extra {sorted(missing)}"
    return "pip"


def check_milvus_server(argv: list[str]) -> str:
    import milvus

    def parse(argv):
        with _stop_after_parsing(), mock.patch.object(sys, "argv", ["milvus-server", *argv]):
            milvus.main()
        raise AssertionError("milvus-server finished without parsing its arguments")

    _parse("milvus-server", argv, parse)
    return "milvus-server"


def check_words(words: list[str]) -> str:
    """Check one simple command (its words); returns what it was checked as."""
    program, argv = words[0], words[1:]
    assert not [word for word in words if word.startswith("[")], f"an optional group left in {shlex.join(words)}"
    if SCRIPT.fullmatch(program):  # an inline span naming the script alone: python implied
        program, argv = "python", words
    if program in ("python", "python3"):
        return check_python(argv)
    if program in CONSOLE_SCRIPTS:
        module = CONSOLE_SCRIPTS[program].split(":")[0]
        _parse(program, argv, PARSERS[module])
        return program
    checks = {"accelerate": check_accelerate, "torchrun": check_torchrun, "make": check_make, "pip": check_pip,
              "milvus-server": check_milvus_server}
    assert program in checks, f"no parser is known for {program!r}: add one to tests/test_docs_run.py"
    return checks[program](argv)


def simple_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell line: each `$(...)` is a command of its own (a `for ...; do echo ...; done`
    word list is expanded by bash instead), leading VAR=value assignments are dropped, and ;, &&, ||, | split."""
    nested = []

    def substitute(match: re.Match) -> str:
        inner = match.group(1).strip()
        if re.fullmatch(r"for \w+ in [^;]*; do echo [^;]*; done", inner):
            return subprocess.run(["bash", "-c", inner], capture_output=True, text=True, check=True).stdout
        nested.append(inner)
        return "OUTPUT_OF_THE_COMMAND"

    text = re.sub(r"\$\(([^()]*)\)", substitute, text)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for word in list(lexer) + [";"]:
        if word in OPERATORS:
            while current and re.match(r"[A-Za-z_]\w*=", current[0]):
                current.pop(0)
            if current:
                commands.append(current)
            current = []
        else:
            current.append(word)
    return [command for inner in nested for command in simple_commands(inner)] + commands


def check(shown: Shown) -> list[str]:
    """Parse every simple command of `shown`; returns what each was checked as, raises Refused / AssertionError."""
    checked = []
    for words in simple_commands(shown.text):
        while True:
            try:
                checked.append(check_words(words))
                break
            except Refused as refusal:
                message = str(refusal)
                if shown.fragment and re.search(FRAGMENT_LEAVES_OUT, message):
                    checked.append(words[0])
                    break
                placeholder = re.search(r"invalid (?:int|float) value: '([A-Z][A-Z0-9_]*)'", message)
                if placeholder is None or placeholder.group(1) not in words:
                    raise
                words = ["1" if word == placeholder.group(1) else word for word in words]
    return checked


@pytest.mark.parametrize("shown", ALL_SHOWN, ids=str)
def test_every_command_the_docs_show_parses(shown):
    assert check(shown), shown.text


@pytest.mark.parametrize("shown", [shown for module in USAGE_DOCSTRINGS for shown in usage_lines(module)], ids=str)
def test_every_usage_line_of_a_docstring_parses(shown):
    assert check(shown), shown.text


def test_the_docs_show_each_program_and_the_search_synopsis_in_both_orders():
    checked = set()
    for shown in ALL_SHOWN:
        with contextlib.suppress(AssertionError):  # reported by the test above
            checked.update(check(shown))
    assert {"decd-search", "decd-convert", "examples/train.py", "examples/evaluate.py", "examples/pretrain_clip.py",
            "app.py", "make", "pip", "accelerate launch decd.cli", "accelerate launch examples/train.py",
            "torchrun decd.cli", "torchrun examples/train.py",
            "scripts/push_space.py", "milvus-server"} <= checked, checked
    assert len(ALL_SHOWN) > 40
    usage = [shown.text for shown in usage_lines("decd/cli.py")]
    assert any(re.search(r"query URI --collection NAME \"", text) for text in usage), usage  # the order


@pytest.mark.parametrize("command, message", [
    ('decd-search query URI "a woman" --topk 3', "unrecognized arguments: --topk"),
    ("decd-search index /data/crops --model M", "one of the arguments --output --store is required"),
    ("python examples/train.py recipes/synthetic.json --no_such_flag 1", "--no_such_flag"),
    ("python examples/train.py recipes/no-such-recipe.json", "no-such-recipe"),
    ("python examples/evaluate.py outputs/m --dataset_name synthetic --split train", "invalid choice: 'train'"),
    ("accelerate launch --num_processes 2 -m decd.cli query INDEX --top_k ten", "invalid int value: 'ten'"),
    ("accelerate launch --no_such_option examples/train.py", "--no_such_option"),
    ("torchrun --nproc_per_node 2 -m decd.cli index G --model M --output I --batch_size many", "invalid int value"),
    ("torchrun --no_such_option 2 examples/train.py", "--no_such_option"),
    ("decd-convert best.pth out --dtype float8", "invalid choice: 'float8'"),
    ("python app.py --port high", "invalid int value: 'high'"),
    ("python scripts/push_space.py --model org/m", "required: --space"),
    ("python benchmarks/sweep.py --seeds one", "invalid int value: 'one'"),
    ("make no-such-target", "no target no-such-target"),
    ("make train NO_SUCH_VARIABLE=1", "no variable NO_SUCH_VARIABLE"),
    ('pip install -e ".[no-such-extra]"', "no extra"),
    ('pip install "decd[milvus,no-such-extra]"', "no extra"),
    ("milvus-server --proxy-port many", "invalid int value: 'many'"),
    ("python -m decd.hub.results --flag", "takes no arguments"),
    ("no-such-program --flag", "no parser is known"),
])
def test_a_command_its_parser_refuses_fails_the_check(command, message):
    with pytest.raises(AssertionError, match=re.escape(message)):
        check(Shown("test", command, False))


def test_an_inline_fragment_may_leave_out_required_arguments_but_not_show_wrong_ones():
    assert check(Shown("test", "decd-search query", True)) == ["decd-search"]
    with pytest.raises(Refused, match="required"):
        check(Shown("test", "decd-search query", False))
    with pytest.raises(Refused, match="unrecognized arguments: --topk"):
        check(Shown("test", "decd-search query INDEX --topk 3", True))


def test_shell_lines_are_split_into_the_commands_they_run():
    assert simple_commands('CLIP=$(python examples/pretrain_clip.py --print_path_only)   # stage 1') == [
        ["python", "examples/pretrain_clip.py", "--print_path_only"]]
    assert simple_commands("make setup && decd-search query I 'a b' | head") == [
        ["make", "setup"], ["decd-search", "query", "I", "a b"], ["head"]]
    assert simple_commands("milvus-server $(for c in a b; do echo --x $c.ip=1; done)") == [
        ["milvus-server", "--x", "a.ip=1", "--x", "b.ip=1"]]
    synopsis = """q URI [--collection NAME] "a" [--filter 'c in ["x"]'] [--backend exact|faiss] [...]"""
    assert shlex.split(_with_optional_groups(synopsis, lambda group: group)) == [
        "q", "URI", "--collection", "NAME", "a", "--filter", 'c in ["x"]', "--backend", "exact|faiss"]
    assert shlex.split(_with_optional_groups(synopsis, lambda group: "")) == ["q", "URI", "a"]
    blocks = _block_commands(["$ decd-search query I \\", "    'a b'", "output line", "# a comment"], "console")
    assert blocks == [(0, "decd-search query I     'a b'")]


# ---------------------------------------------------------------------------------------------
# The README's examples, run against a tiny model
# ---------------------------------------------------------------------------------------------


def _python_blocks() -> list[tuple[str, str, bool]]:
    """(where, code, without_package) for each Python block of the README; without_package: the paragraph
    before it says it runs without this package installed."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    blocks = []
    for language, first, body in _fences(lines):
        if language == "python":
            before = "\n".join(lines[max(0, first - 5):first - 1])
            blocks.append((f"README.md:{first}", "\n".join(body), "without this package" in before.lower()))
    return blocks


def _readme_search_commands() -> list[Shown]:
    """The README's fenced `decd-search` commands that use the tiny model's folder or the index it builds."""
    runnable = []
    for shown in shown_commands("README.md"):
        words = shlex.split(shown.text, comments=True)
        if shown.fragment or words[0] != "decd-search":
            continue
        model = words[words.index("--model") + 1] if "--model" in words else None
        if model == TINY_MODEL or (model is None and words[1] == "query" and words[2].endswith(".index")):
            runnable.append(shown)
    return runnable


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(96, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def readme_workspace(tmp_path_factory):
    """A folder laid out as the README's examples expect: the tiny model in outputs/decd-tiny-synthetic, the
    images they name, a gallery for /data/my_crops; then the README's decd-search commands run there."""
    from decd.cli import main

    root = tmp_path_factory.mktemp("readme")
    save_tiny_model(root / TINY_MODEL)
    for number in range(12):
        _image(root / GALLERY_ON_DISK["/data/my_crops"] / f"person_{number:02d}.png", number)
    named = {node.value for _, code, _ in _python_blocks() for node in ast.walk(ast.parse(code))
             if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and re.fullmatch(r"[\w-]+\.(?:jpg|jpeg|png)", node.value)}
    runs = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for shown in _readme_search_commands():
            words = [GALLERY_ON_DISK.get(word, word) for word in shlex.split(shown.text, comments=True)]
            named.update(words[position + 1] for position, word in enumerate(words) if word == "--image")
            for number, name in enumerate(sorted(named)):
                if not (root / name).exists():
                    _image(root / name, 100 + number)
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = main(words[1:])
            runs.append((shown, code, stdout.getvalue(), stderr.getvalue()))
    return dict(root=root, runs=runs, images=named)


def test_the_readme_search_commands_run_against_a_tiny_model(readme_workspace):
    runs = readme_workspace["runs"]
    assert [words.split()[1] for words in (shown.text for shown, *_ in runs)][:1] == ["index"], runs
    assert len(runs) >= 3
    for shown, code, stdout, stderr in runs:
        assert code == 0, f"{shown.where}: {shown.text}\n{stderr}"
        if " query " in f" {shown.text} ":
            assert "Query:" in stdout and "person_" in stdout, stdout
    root = readme_workspace["root"]
    assert (root / "my_crops.index").is_dir()
    assert any(word.endswith(".png") and (root / word).is_file()
               for shown, *_ in runs for word in shown.text.split() if "--grid" in shown.text), "no grid drawn"


def test_the_readme_python_examples_run_against_a_tiny_model(readme_workspace, monkeypatch):
    monkeypatch.chdir(readme_workspace["root"])
    ran = 0
    for where, code, without_package in _python_blocks():
        if without_package:
            continue
        namespace = {"__name__": "readme_example"}
        exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the README's own example
        ran += 1
        if "scores" in namespace:  # the API example: the shapes and norms its comments state
            gallery, query = namespace["gallery"], namespace["query"]
            assert gallery.dtype == torch.float32 and gallery.shape[0] == 2 and query.shape == (1, gallery.shape[1])
            assert torch.allclose(gallery.norm(dim=-1), torch.ones(2), atol=1e-5)
            assert namespace["scores"].shape == (1, 2)
        if "search" in namespace:  # the search pipeline: each result has the keys the example's comment lists
            listed = re.search(r"# \[\{([^}]*)\}", code)
            assert listed, f"{where}: no comment listing a result's keys"
            found = namespace["search"]("a man in a blue jacket with a backpack", top_k=5)
            assert len(found) == 5 and set(found[0]) == set(re.findall(r'"(\w+)"', listed.group(1))), found
    assert ran >= 2


def test_the_readme_example_without_this_package_runs_where_decd_cannot_be_imported(readme_workspace):
    examples = [(where, code) for where, code, without_package in _python_blocks() if without_package]
    assert examples, "the README's example without this package is gone"
    root = readme_workspace["root"]
    for where, code in examples:
        script = root / "without_package.py"
        script.write_text("REPO = %r\n" % str(REPO) + BLOCK_REPOSITORY_MODULES + f"\n# --- {where}\n" + code
                          + "\nassert type(model).__module__.startswith('transformers_modules'), type(model)\n")
        env = dict(os.environ, PYTHONPATH="", HF_HOME=str(root / "hf-home"), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_VERBOSITY="error")
        result = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{where}:\n{result.stdout}\n{result.stderr}"


def test_every_python_example_in_the_docs_is_valid_python():
    for document in DOCUMENTS:
        lines = (REPO / document).read_text(encoding="utf-8").splitlines()
        for language, first, body in _fences(lines):
            if language == "python":
                compile(textwrap.dedent("\n".join(body)), f"{document}:{first}", "exec")
