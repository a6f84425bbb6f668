"""The package's layers: a module imports only from its own package or from lower layers.

Low to high (docs/design.md, "Layers"): the leaves (errors, console, consistency) -> runtime ->
config -> data, models -> engine -> selftrain, baseline, deploy, report -> stages -> the entry
points (cli, ...). Packages of one layer do not import each other either (baseline and
selftrain are two recipes side by side), but for the entry points, which are one program.
Imports are read with `ast`, at the top of a module and inside functions alike: a lazy import
still ties the two layers together.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"

# A unit is a subpackage or a top-level module of pipeline/; `__version__` is the version
# string of pipeline/__init__.py, which any layer may read.
LAYERS: list[set[str]] = [
    {"errors", "console", "consistency", "__version__"},  # leaves: nothing of the pipeline below
    {"runtime"},  # processes, files, signals
    {"config"},  # the typed config and its checks
    {"data", "models"},
    {"engine"},  # Lightning
    {"selftrain", "baseline", "deploy", "report"},  # the recipes
    {"stages"},  # stage name -> recipe
    # The entry points: one program (`python -m pipeline`, its --help, its DDP ranks), so the
    # only layer whose units import each other.
    {"cli", "command_line", "usage", "rank", "__main__", "__init__"},
]

# Imports that point up or sideways today, each with the module and the unit it imports. The
# list only shrinks: the test also fails when one of these is gone, so that it is removed here.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """`pipeline.engine.fit` -> `engine`; `pipeline` (its __init__) -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path) -> set[str]:
    """Every pipeline module `path` imports, anywhere in the file (`from pipeline import x`
    names the submodule x when there is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import; the pipeline imports absolutely"
            found.add(node.module)
            if node.module == "pipeline":
                found.update(f"pipeline.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == "pipeline" and m != "pipeline"}


def layer_of(unit: str) -> int:
    for level, units in enumerate(LAYERS):
        if unit in units:
            return level
    raise AssertionError(
        f"pipeline/{unit} has no layer: add it to LAYERS in tests/test_layers.py "
        "and to the Layers section of docs/design.md"
    )


def upward_imports() -> set[tuple[str, str]]:
    """(module, unit) for each import of a unit on the same layer or above the module's."""
    bad = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        unit = unit_of(module)
        for target in imported_modules(path):
            other = unit_of(target)
            up = layer_of(other) > layer_of(unit)
            sideways = layer_of(other) == layer_of(unit) and unit not in LAYERS[-1]
            if other != unit and (up or sideways):
                bad.add((module, other))
    return bad


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    for unit in units:
        layer_of(unit)
    assert {"runtime", "config", "engine", "selftrain", "cli"} <= units


def test_imports_point_down_the_layers() -> None:
    new = upward_imports() - KNOWN_VIOLATIONS
    assert not new, "imports that point up or sideways (see docs/design.md, Layers): " + ", ".join(
        f"{module} -> pipeline.{unit}" for module, unit in sorted(new)
    )


def test_known_violations_are_still_there() -> None:
    """An entry of KNOWN_VIOLATIONS that no longer happens is removed from the list."""
    gone = KNOWN_VIOLATIONS - upward_imports()
    assert not gone, "fixed, remove from KNOWN_VIOLATIONS: " + ", ".join(
        f"{module} -> pipeline.{unit}" for module, unit in sorted(gone)
    )


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    """An import inside a function counts as much as one at the top of the file."""
    source = tmp_path / "lazy.py"
    source.write_text(
        "import os\n\ndef f():\n    from pipeline.cli import main\n    import pipeline.engine.fit\n"
        "from pipeline import errors, __version__\n"
    )
    assert imported_modules(source) == {
        "pipeline.cli",
        "pipeline.engine.fit",
        "pipeline.errors",
        "pipeline.__version__",
    }


# --- no `.get(key, default)` for a key the schema types ----------------------------------------

# What the whole composed config is called where a function reads it.
ROOT_NAMES = {"cfg", "config"}


def typed_fields() -> dict[str, set[str]]:
    """Section name ("" for the root) -> the fields its dataclass declares (Hydra fills them)."""
    import dataclasses

    from pipeline.config.schema import TYPED_SECTIONS

    return {
        p.rstrip("."): {f.name for f in dataclasses.fields(s)} for p, s in TYPED_SECTIONS.items()
    }


def typed_gets(source: str) -> list[str]:
    """The `.get("field")` calls of a module on a typed section: `<...>.<section>.get(...)`,
    `pl.get(...)` after `pl = <...>.<section>`, and `cfg.get("<root field>")`. Such a key is
    always in the composed config, so the fallback is dead code or, worse, a second default."""
    fields = typed_fields()
    tree = ast.parse(source)
    aliases = {
        target.id: node.value.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr in fields
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    found = []
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            continue
        owner, key = node.func.value, node.args[0].value
        if isinstance(owner, ast.Attribute) and owner.attr in fields:
            section = owner.attr
        elif isinstance(owner, ast.Name) and owner.id in aliases:
            section = aliases[owner.id]
        elif isinstance(owner, ast.Name) and owner.id in ROOT_NAMES:
            section = ""
        else:
            continue
        if section and key in fields[section] or not section and key in fields[""]:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_get_with_a_default_for_a_typed_key() -> None:
    """Typed keys are read as attributes: their one default is the schema's."""
    found = {
        str(path.relative_to(PACKAGE)): hits
        for path in sorted(PACKAGE.rglob("*.py"))
        if (hits := typed_gets(path.read_text()))
    }
    assert not found, f"read these typed keys as attributes (cfg.train.select): {found}"


def test_the_get_checker_sees_sections_aliases_and_root_keys() -> None:
    source = (
        "def f(cfg, data):\n"
        "    pl = cfg.pseudo_label\n"
        "    a = cfg.train.get('select', 'last')\n"
        "    b = pl.get('tta_views', 0)\n"
        "    c = cfg.get('objective')\n"
        "    d = cfg.data.get('val_dir')\n"  # a free-form group: options may lack the key
        "    e = cfg.train.get('no_such_key')\n"
        "    g = job.config.get('objective')\n"  # a flattened dict read from a file
        "    return data.get('shard')\n"
    )
    assert typed_gets(source) == [
        "3: cfg.train.get('select', 'last')",
        "4: pl.get('tta_views', 0)",
        "5: cfg.get('objective')",
    ]


# --- no module over MAX_LINES lines -------------------------------------------------------------

# A module a reader can take in at one sitting; past it, split it by concern (docs/design.md,
# "Layout": each new module stays in its package, so in its layer).
MAX_LINES = 400


def long_modules(package: Path = PACKAGE, limit: int = MAX_LINES) -> dict[str, int]:
    """The modules under `package` longer than `limit` lines, with their line counts."""
    counts = {
        path.relative_to(package).as_posix(): len(path.read_text().splitlines())
        for path in sorted(package.rglob("*.py"))
    }
    return {name: n for name, n in counts.items() if n > limit}


def test_no_module_is_over_400_lines() -> None:
    long = long_modules()
    assert not long, f"modules over {MAX_LINES} lines, split them by concern: " + ", ".join(
        f"pipeline/{name} ({n})" for name, n in long.items()
    )


def test_the_size_checker_counts_every_module(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "at_limit.py").write_text("x = 1\n" * 400)
    (tmp_path / "over.py").write_text("x = 1\n" * 401)
    (tmp_path / "sub" / "nested.py").write_text("\n" * 450)
    (tmp_path / "notes.txt").write_text("x\n" * 900)  # not a module
    assert long_modules(tmp_path) == {"over.py": 401, "sub/nested.py": 450}


# --- the composed config stays at the top: specs below the stage entry points ------------------

# Where the Hydra config (omegaconf, DictConfig) may appear: the entry points, which compose it,
# and config/, which checks it and turns it into the typed specs (config/specs.py) that every
# layer below the stages takes. Modules still to convert would be listed here, each failing the
# test once it is converted; none is.
CONFIG_UNITS = {"cli", "command_line", "usage", "rank", "__main__", "stages", "config"}
KNOWN_CONFIG_USERS: set[str] = set()


def config_users(package: Path = PACKAGE) -> set[str]:
    """The modules that import omegaconf or name DictConfig (in code, annotations or strings)."""
    found = set()
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            imported = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            named = (
                isinstance(node, ast.Name)
                and node.id in ("DictConfig", "ListConfig", "OmegaConf")
                or isinstance(node, ast.Attribute)
                and node.attr in ("DictConfig", "ListConfig")
                or isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and "DictConfig" in node.value  # a string annotation (or a docstring naming it)
            )
            if named or any(m.split(".")[0] == "omegaconf" for m in imported):
                found.add(module_name(path) if package == PACKAGE else path.stem)
                break
    return found


def config_users_below_the_stages() -> set[str]:
    return {m for m in config_users() if unit_of(m) not in CONFIG_UNITS}


def test_no_hydra_config_below_the_stage_entry_points() -> None:
    new = config_users_below_the_stages() - KNOWN_CONFIG_USERS
    assert not new, (
        "these modules take or import the Hydra config; give them a spec of "
        "pipeline/config/specs.py instead: " + ", ".join(sorted(new))
    )


def test_known_config_users_are_still_there() -> None:
    gone = KNOWN_CONFIG_USERS - config_users_below_the_stages()
    assert not gone, "converted, remove from KNOWN_CONFIG_USERS: " + ", ".join(sorted(gone))


def test_the_config_checker_sees_imports_and_annotations(tmp_path: Path) -> None:
    (tmp_path / "lazy.py").write_text("def f():\n    from omegaconf import OmegaConf\n")
    (tmp_path / "typed.py").write_text("def f(cfg: 'DictConfig') -> None:\n    pass\n")
    (tmp_path / "plain.py").write_text("def f(spec: 'RunSpec') -> dict:\n    return {}\n")
    (tmp_path / "aliased.py").write_text("import omegaconf as oc\n")
    assert config_users(tmp_path) == {"lazy", "typed", "aliased"}
