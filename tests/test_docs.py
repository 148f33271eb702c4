"""The documentation against the project: README.md and docs/*.md.

* every relative link and image exists (resolved against the file that holds it; http(s) links and anchors are
  not followed);
* every script that the documents run (examples/*.py, bench/*.py) starts and prints its --help, and every --option
  the documents give it is one it has;
* every test (test_x.py::name) and every minidiff function (module.name) the equation map names exists, and each
  test mentions a function its row names (the test tests what its row says); every `module.name` of minidiff that
  any document names exists;
* no placeholder is left where a measurement belongs;
* no path outside the repository appears in the documents, the code, the examples or the tests.

Scripts run in a subprocess from a temporary folder, so they import the installed minidiff, as a user's would.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
COMMAND = re.compile(r"python (examples|bench)/(\w+\.py)((?:\\\n|[^\n`])*)")   # to the end of the command


def prose(path):
    """The file's text without fenced code blocks (a link there is an example, not a link)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def relative_links(path):
    """(target as written, resolved path) of every relative link and image in a Markdown file."""
    for target in LINK.findall(prose(path)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue                            # http(s), mailto...; anchors within the file
        yield target, (path.parent / target.split("#", 1)[0]).resolve()


def test_documents_exist():
    assert (ROOT / "README.md").is_file() and len(DOCS) > 1, DOCS


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_and_images_exist(path):
    broken = [target for target, resolved in relative_links(path) if not resolved.exists()]
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_no_placeholders_left(path):
    left = re.findall(r"TODO\([^)\n]*", path.read_text(encoding="utf-8"))
    assert not left, f"{path.relative_to(ROOT)}: placeholders {left}"


# What only the machines this project was developed on have: a folder beside the checkout, and its files.
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "/" + "work/", "REFERENCE" + "_RUNS", "STYLE" + r"\.md",
                               "development " + "(machine|setup|VM|copy)"]))
SOURCES = (["README.md", "CONTRIBUTING.md", "pyproject.toml", "CMakeLists.txt"]
           + [f"{d}/**/*{ext}" for d in ("minidiff", "examples", "bench", "tests", "csrc", "docs")
              for ext in (".py", ".md", ".sh", ".h", ".cpp", ".cu")])


def test_no_path_outside_the_repository():
    """README, docs, code, examples, benchmarks and tests speak of a user's machine: no path outside the repository,
    no file a user does not have (.ci/run alone may point at the data copy of the machine it runs on)."""
    found = []
    for pattern in SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if OUTSIDE.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not found, "\n".join(found)


def documented_commands():
    """{script path: [options]} of every `python examples/...` and `python bench/...` command in the documents."""
    found = {}
    for path in DOCS:
        for folder, name, args in COMMAND.findall(path.read_text(encoding="utf-8")):
            found.setdefault(ROOT / folder / name, set()).update(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", args))
    return found


SCRIPTS = sorted((ROOT / "examples").glob("*.py")) + sorted(
    {p for p in documented_commands() if p.parent.name == "bench"})


@pytest.fixture(scope="module")
def help_texts(tmp_path_factory):
    """--help of every script, run from a temporary folder (the installed minidiff, not the source tree)."""
    cwd = tmp_path_factory.mktemp("help")
    texts = {}
    for script in SCRIPTS:
        res = subprocess.run([sys.executable, str(script), "--help"], cwd=cwd, capture_output=True, text=True,
                             timeout=120)
        texts[script] = (res.returncode, res.stdout + res.stderr)
    return texts


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_help_runs(script, help_texts):
    rc, text = help_texts[script]
    assert rc == 0 and "usage:" in text, f"{script.name} --help failed:\n{text[-2000:]}"


def test_documented_commands_use_existing_scripts_and_options(help_texts):
    problems = []
    for script, options in sorted(documented_commands().items()):
        if script not in help_texts:
            problems.append(f"{script.relative_to(ROOT)} does not exist")
            continue
        text = help_texts[script][1]
        problems += [f"{script.name} has no option {o}" for o in sorted(options) if not re.search(
            rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)]
    assert not problems, problems


def equation_map():
    """The rows of README's equation map: (function cell, test cell)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Equation map", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 4 and not set(cells[0]) <= set("- "):
            rows.append((cells[2], cells[3]))
    return rows[1:]                             # without the header


def test_equation_map_has_rows():
    assert len(equation_map()) >= 40


def _defined(name, source):
    return re.search(rf"(def|class)\s+{name}\b|\b{name}\s*(:[^=\n]*)?=|self\.{name}\b", source) is not None


def _source(ref):
    """(file, names) for a dotted name under minidiff/: "utils.philox.philox_normal" -> (minidiff/utils/philox.py,
    ["philox_normal"]), "fast.reference" -> (minidiff/fast/__init__.py, ["reference"]); (None, []) if no module."""
    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT / "minidiff" / Path(*parts[:i])
        for src in (base.with_suffix(".py"), base / "__init__.py"):
            if src.is_file():
                return src, parts[i:]
    return None, []


def test_equation_map_functions_and_tests_exist():
    missing = []
    for functions, tests in equation_map():
        for ref in re.findall(r"`([^`]+)`", functions):
            if "/" in ref:                                      # a source file: csrc/step_math.h
                if not (ROOT / ref.split(" ")[0]).exists():
                    missing.append(ref)
            elif re.fullmatch(r"[a-z_]+(\.\w+)*", ref):          # [package.]module[.Class].name
                src, names = _source(ref)
                if src is None or (names and not _defined(names[-1], src.read_text(encoding="utf-8"))):
                    missing.append(ref)
        current = None                                          # "::name" continues the last test file
        for ref in re.findall(r"`([^`]+)`", tests):
            file, _, name = ref.partition("::")
            file = file.removeprefix("tests/")
            if file:
                current = ROOT / "tests" / file
                if not current.exists():
                    missing.append(ref)
                    continue
            if name and (current is None or not re.search(rf"(def|class)\s+{re.escape(name.split('[')[0])}\b",
                                                          current.read_text(encoding="utf-8"))):
                missing.append(ref)
    assert not missing, f"the equation map names what does not exist: {missing}"


FILE_SUFFIXES = {"py", "md", "npz", "npy", "png", "json", "jsonl", "txt", "gz", "bin", "h", "cpp", "cu", "sh", "toml"}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_minidiff_name_the_documents_use_exists(path):
    """`module.name` in a document's text, where module is one of minidiff's (step.timesteps, utils.data.load_dataset,
    fast.gpu.STEP_PARAMS, layers.Conv2d.forward(...)), names something that module defines: a renamed or deleted
    function leaves no stale reference behind."""
    stale = []
    for ref in re.findall(r"`([a-z_]+(?:\.\w+)+)[`(\[ ]", path.read_text(encoding="utf-8")):
        if ref.rsplit(".", 1)[-1] in FILE_SUFFIXES:
            continue
        src, names = _source(ref)
        if src is not None and names and not _defined(names[-1], src.read_text(encoding="utf-8")):
            stale.append(ref)
    assert not stale, f"{path.relative_to(ROOT)} names what minidiff does not define: {sorted(set(stale))}"


def _test_source(file, name):
    """The source of test `name` in tests/`file`: from its def to the next top-level statement."""
    text = (ROOT / "tests" / file).read_text(encoding="utf-8")
    m = re.search(rf"^def {re.escape(name)}\b.*?(?=^\S)", text + "\n#", re.S | re.M)
    return m.group(0) if m else ""


def test_each_equation_map_test_mentions_a_function_of_its_row():
    vague = []
    for functions, tests in equation_map():
        names = {ref.split(" ")[0].split(".")[-1] for ref in re.findall(r"`([^`]+)`", functions) if "/" not in ref}
        names |= {ref.split("/")[-1].split(".")[0] for ref in re.findall(r"`([^`]+)`", functions) if "/" in ref}
        current = None
        for ref in re.findall(r"`([^`]+)`", tests):
            file, _, name = ref.partition("::")
            current = file.removeprefix("tests/") or current
            source = (_test_source(current, name.split("[")[0]) if name else
                      (ROOT / "tests" / current).read_text(encoding="utf-8"))
            if not any(re.search(rf"\b{re.escape(n)}\b", source) for n in names):
                vague.append(f"{ref} mentions none of {sorted(names)}")
    assert not vague, vague


def test_gpu_check_script_is_valid_and_says_when_there_is_no_gpu(tmp_path):
    """bench/gpu_check.sh parses, and on a machine without nvidia-smi it says so and stops (exit status 1)."""
    import shutil
    script = ROOT / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("nvidia-smi", path="/usr/bin:/bin"):
        pytest.skip("this machine has nvidia-smi: the script would run the whole check")
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "HOME": str(tmp_path)})
    assert res.returncode == 1 and "nvidia-smi not found" in res.stdout
    assert "nvidia-smi not found" in (tmp_path / "gpu_check.log").read_text()
