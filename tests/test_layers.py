"""The import layers: every module of the package imports only its own layer or the layers below.

    0  utilities      errors, registry, config, utils.*
    1  models, data   (models.* and data.* do not import each other)
    2  distillers     (stand on models)
    3  assembler      engine.build; detection.* (its own group); results.* (its own group)
    4  trainer        engine.trainer, bench.*; cluster.* (a study's runs: processes, Slurm jobs)
    5  commands       cli.*, __main__, plugin, integrations.*

Imports are read with ``ast`` (module level and inside functions alike). A new module must
be given a layer in LAYERS below; the test names any module that has none.
"""

import ast
from pathlib import Path

PKG = "mdistiller_blockkd"
ROOT = Path(__file__).resolve().parents[1]
PKG_DIR = ROOT / PKG

#: (module prefix, layer, group); the longest matching prefix wins. Modules of one group
#: may import each other; otherwise only strictly lower layers may be imported.
LAYERS = [
    (PKG, 0, "base"),  # the package's __init__
    (f"{PKG}.errors", 0, "base"),
    (f"{PKG}.registry", 0, "base"),
    (f"{PKG}.config", 0, "base"),
    (f"{PKG}.utils", 0, "base"),
    (f"{PKG}.models", 1, "models"),
    (f"{PKG}.data", 1, "data"),
    (f"{PKG}.distillers", 2, "distillers"),
    (f"{PKG}.engine", 3, "engine"),  # the package's __init__ (empty)
    (f"{PKG}.engine.build", 3, "assembler"),
    (f"{PKG}.engine.task", 3, "assembler"),  # the task interface (classification; detection's is detection.task)
    (f"{PKG}.engine.optim", 3, "assembler"),  # the optimizer factory and the one training step
    (f"{PKG}.detection", 3, "detection"),  # detection task: data, models, distillers, COCO mAP (beside the assembler)
    (f"{PKG}.results", 3, "results"),  # runs read from their folders, labels (from the registry), statistics, tables, plots; the demo's stages
    (f"{PKG}.engine.trainer", 4, "trainer"),
    (f"{PKG}.bench", 4, "trainer"),  # benchmark library: step profiles (times the trainer's pieces)
    (f"{PKG}.cluster", 4, "cluster"),  # a study's runs as local processes or Slurm jobs (submitit); runs train commands, imports no trainer
    (f"{PKG}.cli", 5, "commands"),
    (f"{PKG}.__main__", 5, "commands"),
    (f"{PKG}.plugin", 5, "commands"),
    (f"{PKG}.integrations", 5, "commands"),  # bridges to other toolboxes, like plugin
]


def module_names():
    for path in sorted(PKG_DIR.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


MODULES = dict(module_names())


def layer_of(module):
    best = None
    for prefix, layer, group in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer, group)
    return None if best is None else best[1:]


def imported_modules(module, path):
    """Package modules imported by ``module`` (relative imports resolved), with line numbers."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PKG or alias.name.startswith(PKG + "."):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - (node.level - 1)]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == PKG or target.startswith(PKG + ".")):
                continue
            for alias in node.names:  # "from . import dist" imports the module pkg.dist
                sub = f"{target}.{alias.name}"
                yield (sub if sub in MODULES else target), node.lineno


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if layer_of(m) is None]
    assert not missing, f"give these modules a layer in tests/test_layers.py LAYERS: {missing}"


def test_imports_only_go_down():
    upward = []
    for module, path in MODULES.items():
        src = layer_of(module)
        for target, line in imported_modules(module, path):
            dst = layer_of(target)
            if dst is None:
                continue  # reported by test_every_module_has_a_layer
            same_group = dst[1] == src[1]
            if not (dst[0] < src[0] or same_group):
                upward.append(f"{path.relative_to(ROOT)}:{line}: {module} (layer {src[0]} {src[1]}) imports "
                              f"{target} (layer {dst[0]} {dst[1]})")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The parser resolves relative imports, so an upward one cannot slip through."""
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from ..engine.trainer import Trainer\nfrom . import losses\n")
    found = dict(imported_modules(f"{PKG}.distillers.fake", fake))
    assert found == {f"{PKG}.engine.trainer": 2, f"{PKG}.distillers.losses": 3}
    assert layer_of(f"{PKG}.engine.trainer")[0] > layer_of(f"{PKG}.distillers.fake")[0]


def test_tools_are_thin_wrappers_of_the_public_commands():
    """tools/*.py: no sys.path edits, no loading by file path, each imports one command's cli."""
    tools = sorted((ROOT / "tools").glob("*.py"))
    assert tools
    for path in tools:
        text = path.read_text(encoding="utf-8")
        assert "sys.path" not in text and "spec_from_file_location" not in text, path
        mods = [m for m, _ in imported_modules("tools." + path.stem, path)]
        assert mods == [f"{PKG}.cli.{path.stem}"], (path, mods)
    for module, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        assert "sys.path.insert" not in text or module == f"{PKG}.plugin", module  # plugin runs mdistiller's script
        assert "spec_from_file_location" not in text, module


def test_fileio_is_torch_free():
    """The bottom layer's file I/O imports neither torch nor numpy, so the report command starts fast."""
    tree = ast.parse(MODULES[f"{PKG}.utils.fileio"].read_text(encoding="utf-8"))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names and not any(str(n).startswith(("torch", "numpy")) for n in names)
