"""Every fenced code block of README.md and docs/ is run or checked by a test, so that none can
drift from what the programs accept. CHECKS names each block (its file and first line) and how:

- run:       executed here as written (Python blocks), paths replaced by a sharded example project.
- compose:   each command line, split as the shell splits it (variables it sets expanded), goes to
             the program's own main() with `--cfg job --resolve`: its argument parser, then every key
             and value through the schema, every interpolation resolved. A `sbatch SCRIPT ARGS` line:
             the script exists, its options parse, and ARGS compose as the script hands them on.
             The config files a block names are written first from the YAML blocks (README's split
             file, docs/config.md's data module; the walk-through's two files from its heredocs).
- usage:     every option a usage line names is in that program's --help.
- elsewhere: run as written by the named test, which names the block.
- tree:      every path of a layout drawing exists in a built project, a run or the repository.
- modules:   every module the design's map names exists, and each module of the data path is named.
- make:      the make targets named exist, and .ci/run runs `make test`.

A block not in CHECKS fails the first test: a new block must say how it is checked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from doc_blocks import ROOT, block, blocks, layout_paths, missing_paths, replaced

CHECKS = {
    ("README.md", "make demo"): ("make",),
    ("README.md", "make install"): ("make",),
    ("README.md", "# 1. A project directory"): (
        "elsewhere",
        "tests/e2e/test_readme.py::test_the_readme_walkthrough_runs_as_written",
        "# 1. A project directory",
    ),
    ("README.md", "export S3_ENDPOINT_URL=https://s3.example.org"): ("compose",),
    ("README.md", "PROJECT_PATH/"): ("tree",),
    ("README.md", "# conf/datamodule/split_<source>_<species>/<name>.yaml"): ("compose",),
    ("README.md", "concept-shard build /data/project --config-dir ~/my_conf"): ("compose",),
    ("README.md", "concept-shard build  PROJECT_PATH"): ("usage",),
    ("README.md", "concept-shard gene-vectors /data/project"): ("compose",),
    ("README.md", "sbatch --array=0-63"): ("compose",),
    ("README.md", "cd /path/to/project && lamin init"): ("compose",),
    ("README.md", "import lamindb as ln\n\nshards"): (
        "elsewhere",
        "tests/e2e/test_lamin.py::test_concept_shard_build_registers_lineage_and_reads_lamindb_keys",
        "shards = ln.Artifact.get(",
    ),
    ("README.md", "export S3_ENDPOINT_URL=http://minio"): ("compose",),
    ("README.md", "from streaming import StreamingDataset"): ("run",),
    ("README.md", "from concept_shard.config import compose_config"): ("run",),
    ("README.md", "concept-train PROJECT_PATH"): ("usage",),
    ("README.md", "concept-train P initialize.run_id=r1"): ("compose",),
    ("README.md", "import lamindb as ln\n\nckpt"): (
        "elsewhere",
        "tests/e2e/test_lamin.py::test_training_run_is_tracked_with_shard_inputs_and_checkpoint_outputs",
        "ckpt = ln.Artifact.get(",
    ),
    ("README.md", "concept-embed PROJECT"): ("usage",),
    ("README.md", "concept-eval PROJECT"): ("usage",),
    ("README.md", "import anndata as ad"): (
        "elsewhere",
        "tests/e2e/test_readme.py::test_the_readme_walkthrough_runs_as_written",
        'load_model("PROJECT',
    ),
    ("docs/config.md", "conf/config.yaml"): ("tree",),
    ("docs/config.md", "# ~/my_conf/datamodule/MyModule.yaml"): ("compose",),
    ("docs/config.md", "from omegaconf import OmegaConf"): ("run",),
    ("docs/design.md", "PROJECT_PATH/"): ("tree",),
    ("docs/design.md", "split YAMLs (conf/)"): ("modules",),
    ("docs/design.md", "SHARDS/<species>"): ("tree",),
    ("docs/design.md", "PATH.CHECKPOINT_ROOT/<run_id>/"): (
        "elsewhere",
        "tests/e2e/test_readme.py::test_the_readme_walkthrough_runs_as_written",
        "PATH.CHECKPOINT_ROOT/<run_id>/",
    ),
}


def _key(b) -> tuple[str, str]:
    matches = [k for k in CHECKS if k[0] == b.file and b.text.lstrip().startswith(k[1])]
    assert len(matches) == 1, f"{b}: {len(matches)} entries of CHECKS match it; give it one (tests/e2e/test_docs.py)"
    return matches[0]


def _blocks(kind: str):
    return [b for b in blocks() if CHECKS[_key(b)][0] == kind]


def test_every_block_says_how_it_is_checked():
    found = {_key(b) for b in blocks()}
    assert found == set(CHECKS), f"CHECKS names blocks the docs no longer hold: {set(CHECKS) - found}"


def test_blocks_run_elsewhere_are_named_by_their_tests():
    for b in blocks():
        kind, *where = CHECKS[_key(b)]
        if kind != "elsewhere":
            continue
        test, marker = where
        path, name = test.split("::")
        source = (ROOT / path).read_text()
        assert f"def {name}(" in source, f"{b}: {test} is gone"
        assert marker in b.text and marker in source, f"{b}: {path} no longer names it by {marker!r}"


# --- compose: the command lines, as the programs parse them ---------------------------------------

PROGRAMS = ("concept-shard", "concept-train")
SCRIPTS = {"tools/slurm/shard_array.sbatch": ["concept-shard", "build"], "tools/slurm/train.sbatch": ["concept-train"]}
SBATCH_OPTIONS = re.compile(r"--(array=\d+-\d+(%\d+)?|nodes=\d+)$")
EXTERNAL = {"aws", "cd"}  # the AWS CLI (not a dependency of ours); cd


def _main(program: str):
    if program == "concept-shard":
        from concept_shard.cli import main
    else:
        from concept_train.cli import main
    return main


def _shell_commands(text: str, env: dict) -> list[list[str]]:
    """The block's commands (continuation lines joined, comments dropped, `&&` split), their
    $VARIABLES expanded from `env`, which `export` and `VAR=value` lines update."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        for command in line.split("&&"):
            expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], command)
            words = shlex.split(expanded, comments=True)
            if not words:
                continue
            if words[0] == "export" or all(re.match(r"\w+=", w) for w in words):
                env.update(w.split("=", 1) for w in words if "=" in w)
                continue
            out.append(words)
    return out


@pytest.fixture(scope="module")
def places(sharded_example, tmp_path_factory):
    """A sharded example project whose conf/ holds the walk-through's two files (taken from its
    heredocs) and a config directory `~/my_conf` holding docs/config.md's data module and the
    README's split file; what the placeholders of the docs stand for."""
    base = tmp_path_factory.mktemp("docs")
    project = base / "project"
    shutil.copytree(sharded_example, project, symlinks=True)
    walkthrough = block("README.md", "# 1. A project directory").text
    written = re.findall(r"cat > \$P/(\S+) <<'EOF'\n(.*?)\nEOF", walkthrough, flags=re.S)
    assert len(written) == 2, "the walk-through no longer writes its split and data module with heredocs"
    for name, text in written:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text + "\n")
    my_conf = base / "my_conf"
    module = block("docs/config.md", "# ~/my_conf/datamodule/MyModule.yaml")
    split = block("README.md", "# conf/datamodule/split_<source>_<species>/<name>.yaml")
    (my_conf / "datamodule/split_atlas_hsapiens").mkdir(parents=True)
    (my_conf / "datamodule/MyModule.yaml").write_text(module.text)
    (my_conf / "datamodule/split_atlas_hsapiens/atlas_v1.yaml").write_text(split.text)
    return {"project": project, "my_conf": my_conf}


def _placed(words: list[str], places) -> list[str]:
    project = str(places["project"])
    out = []
    for w in words:
        w = w.replace("~/my_conf", str(places["my_conf"]))
        w = re.sub(r"(^|=)(/data/project|/path/to/project|P)(?=/|$)", lambda m: m.group(1) + project, w)
        out.append(w)
    return out


def _compose(words: list[str], where, capsys) -> None:
    program, args = words[0], words[1:]
    rc = _main(program)([*args, "--cfg", "job", "--resolve"])
    captured = capsys.readouterr()
    assert rc == 0, f"{where}: `{shlex.join(words)}` does not compose:\n{captured.err}"
    assert "${" not in captured.out, f"{where}: unresolved interpolation in the composed config"


@pytest.mark.parametrize("b", _blocks("compose"), ids=str)
def test_compose_blocks_are_accepted_by_the_programs(b, places, capsys):
    if b.lang == "yaml":  # config files: composed by the command lines that name them
        users = [u for u in _blocks("compose") if u.lang == "bash" and "~/my_conf" in u.text]
        assert users, f"{b}: no command line of the docs composes it"
        return
    env = {"P": str(places["project"]), "USER": "me"}
    commands = _shell_commands(b.text, env)
    assert commands, f"{b}: no command"
    for words in commands:
        words = _placed(words, places)
        if words[0] in PROGRAMS:
            _compose(words, b, capsys)
        elif words[0] == "sbatch":
            script = next(i for i, w in enumerate(words) if w.endswith(".sbatch"))
            for option in words[1:script]:
                assert SBATCH_OPTIONS.match(option), f"{b}: sbatch option {option!r} (the test knows --array, --nodes)"
            assert (ROOT / words[script]).is_file() and words[script] in SCRIPTS, f"{b}: no {words[script]}"
            _compose([*SCRIPTS[words[script]], *words[script + 1 :]], b, capsys)
        elif words[0] == "lamin":  # lamindb's CLI, from the lamindb extra
            assert (Path(sys.executable).parent / "lamin").is_file(), f"{b}: `lamin` is not installed"
        else:
            assert words[0] in EXTERNAL, f"{b}: the test does not know the command {words[0]!r}"


# --- usage lines: every option named is one the program takes -----------------------------------


def _help(argv: list[str], capsys) -> str:
    if argv[0] in PROGRAMS:
        main = _main(argv[0])
    elif argv[0] == "concept-embed":
        from concept_train.embedding import main
    else:
        from concept_train.eval.cli import main
    with pytest.raises(SystemExit) as stop:
        main([*argv[1:], "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("b", _blocks("usage"), ids=str)
def test_usage_lines_name_only_options_the_programs_take(b, capsys):
    # a line that starts with `[` continues the line above (the same program's options)
    for line in re.sub(r"\n\s+\[", " [", b.text).splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "torchrun":
            assert "-m concept_train.cli" in line and (ROOT / "concept_train/cli.py").is_file()
            continue
        argv = words[:2] if words[0] == "concept-shard" else words[:1]
        helped = _help(argv, capsys)
        named = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*|-[a-z])\b", line))
        for option in sorted(named):
            assert re.search(rf"(?<![\w-]){re.escape(option)}\b", helped), f"{b}: `{' '.join(argv)}` has no {option}"


# --- the Python blocks that run here -------------------------------------------------------------


def _run_python(code: str, where, cwd: Path, capsys) -> str:
    here = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(code, str(where), "exec"), {"__name__": "__docs__"})
    finally:
        os.chdir(here)
    return capsys.readouterr().out


def test_the_streaming_block_reads_a_dataset_as_written(places, tmp_path, capsys):
    b = block("README.md", "from streaming import StreamingDataset")
    project = places["project"]
    code = replaced(b.text, [("/path/to/project", str(project)), ("/tmp/mds-cache", str(tmp_path / "cache"))])
    out = _run_python(code + "\nprint(sorted(cell), len(ds))\n", b, tmp_path, capsys)
    dataset = project / "shards/hsapiens/synth_hsapiens/hs_blood_a"
    cells = json.loads((dataset / "dataset.json").read_text())["cells_written"]
    keys, n = out.strip().splitlines()[-1].rsplit(" ", 1)
    assert int(n) == cells and all(f"'{k}'" in keys for k in ("genes", "counts", "n_counts", "cell_id")), out
    assert (tmp_path / "cache").is_dir()  # its own cache, as the block advises


def test_the_data_module_block_gives_a_packed_batch_and_a_state(places, tmp_path, capsys):
    b = block("README.md", "from concept_shard.config import compose_config")
    code = replaced(b.text, [('"example_project"', repr(str(places["project"])))])
    code += "\nprint(batch.tokens.shape[0] > 0, batch.cu_seqlens[-1].item() == batch.tokens.shape[0], type(state))\n"
    out = _run_python(code, b, tmp_path, capsys)
    assert out.strip().splitlines()[-1] == "True True <class 'dict'>", out


def test_the_config_block_prints_the_tree_as_written_then_resolved(places, tmp_path, capsys):
    b = block("docs/config.md", "from omegaconf import OmegaConf")
    out = _run_python(replaced(b.text, [("/path/to/project", str(places["project"]))]), b, tmp_path, capsys)
    written, resolved = re.split(r"^PATH:$", out, flags=re.M)[1:3]
    assert "${" in written and "${" not in resolved, out[:2000]
    assert out.strip().splitlines()[-1] == "1500 96", out[-500:]  # +experiment=demo's values, typed


# --- layouts, the module map, make ---------------------------------------------------------------


@pytest.mark.parametrize("b", _blocks("tree"), ids=str)
def test_layout_drawings_match_what_is_built(b, places):
    base = ROOT if b.file == "docs/config.md" else places["project"]
    paths = layout_paths(b.text, {"PROJECT_PATH/": "", "SHARDS/": "shards/"})
    assert len(paths) >= 3, f"{b}: the drawing's paths were not found: {paths}"
    missing = missing_paths(paths, base)
    assert not missing, f"{b}: the drawing names paths that {base} does not have: {missing}"


def test_the_module_map_names_modules_that_exist_and_every_one_of_the_data_path():
    b = block("docs/design.md", "split YAMLs (conf/)")
    named = re.findall(r"(?<![\w/])((?:concept_\w+/)?[\w/]*\w\.py)\b", b.text)
    homes = [ROOT, *(p.parent for p in ROOT.glob("concept_*/**/__init__.py"))]  # a name is relative to a package
    gone = [n for n in named if not any((h / n).is_file() for h in homes)]
    assert not gone, f"{b}: names modules that do not exist: {gone}"
    data = ROOT / "concept_train/data"
    unnamed = [str(p.relative_to(data)) for p in sorted(data.rglob("*.py")) if p.name != "__init__.py"]
    unnamed = [m for m in unnamed if m not in named and f"read/{m}" not in named]
    assert not unnamed, f"{b}: the data path's modules {unnamed} are not on the map"


@pytest.mark.parametrize("b", _blocks("make"), ids=str)
def test_make_lines_name_targets_that_exist(b):
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"\bmake (\w+)", b.text):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"{b}: the Makefile has no target {target}"
    if "source .venv/bin/activate" in b.text:
        assert "VENV ?= $(or $(CONCEPT_VENV),.venv)" in makefile
    assert "make test" in (ROOT / ".ci/run").read_text()
