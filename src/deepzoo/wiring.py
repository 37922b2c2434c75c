"""Which of deepzoo's files each DVC stage runs, read from the import graph: the code `deps` of `dvc.yaml`.

A stage runs `python -m deepzoo COMMAND TARGET`: the modules the CLI imports by name for it
(`registry.entry_modules`) and everything they import, transitively, at module level or inside functions.
DVC cannot template lists, so each family's files beyond those its stage templates list already are
`vars` entries indexed `${item.code[0]}`, `${item.code[1]}`, …: `python -m deepzoo.wiring` writes the
`vars` that the registry and this graph call for into `dvc.yaml` (`--check` only compares), and the tests
hold `dvc.yaml` to them.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

from deepzoo import registry

SRC = Path(__file__).resolve().parents[1]  # the folder holding the `deepzoo` package
CLI_MODULES = ("deepzoo.__main__", "deepzoo.cli")
COMMAND = re.compile(r"-m (deepzoo[\w.]*)(?: (\w+) (\w+))?")  # `-m deepzoo train cnn` or `-m deepzoo.summary`


def module_file(name: str) -> Path | None:
    """The source file of deepzoo module `name`, or None when it is not one."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(name: str) -> set[str]:
    """The deepzoo modules that module `name` imports anywhere in its file, with the packages that hold them."""
    path = module_file(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # `from a import b` imports module a.b when b is one, else a name defined in a
            found |= {f"{base}.{alias.name}" if module_file(f"{base}.{alias.name}") else base for alias in node.names}
    modules = {m for m in found if m.split(".")[0] == "deepzoo" and module_file(m)}
    return modules | {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}


def closure(roots: Iterable[str]) -> set[str]:
    """`roots` and every deepzoo module they import, transitively."""
    seen: set[str] = set()
    todo = [".".join(root.split(".")[:i]) for root in roots for i in range(1, root.count(".") + 2)]  # with packages
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported_modules(name) - seen)
    return seen


def stage_files(command: str, target: str) -> list[str]:
    """The repository paths of every deepzoo file `deepzoo COMMAND TARGET` may run, sorted."""
    return _paths(closure([*CLI_MODULES, *registry.entry_modules(command, target)]))


def command_files(cmd: str) -> list[str]:
    """The repository paths of every deepzoo file a stage's command may run: `python -m deepzoo COMMAND TARGET`
    or `python -m deepzoo.MODULE`."""
    module, command, target = COMMAND.search(cmd).groups()
    return stage_files(command, target) if module == "deepzoo" else _paths(closure([module]))


def _paths(modules: Iterable[str]) -> list[str]:
    return sorted(str(module_file(m).relative_to(SRC.parent)) for m in modules)


def collapse(paths: list[str]) -> list[str]:
    """`paths` with the files of a package replaced by its folder when every file of the package is there."""
    chosen = set(paths)
    for package in sorted({str(Path(p).parent) for p in paths}, key=len):
        files = {str(f.relative_to(SRC.parent)) for f in (SRC.parent / package).rglob("*.py")}
        if files <= chosen:
            chosen = (chosen - files) | {package}
    return sorted(chosen)


def covered(path: str, deps: Iterable[str]) -> bool:
    """Whether `path` is one of `deps` or inside one of them (a folder dependency)."""
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def fixed_deps(dvc_yaml: dict, stage: str) -> list[str]:
    """The deps of a foreach stage template that name no item field."""
    return [d for d in dvc_yaml["stages"][stage]["do"]["deps"] if "${" not in d]


def fill_slots(dvc_yaml: dict, stage: str, field: str, values: list[str], padding: str) -> list[str]:
    """`values` padded with `padding` to the number of `${item.FIELD[i]}` deps of the stage template.

    DVC accepts a dependency listed twice, so unused slots repeat one the stage has anyway."""
    slots = sum(f"${{item.{field}[" in d for d in dvc_yaml["stages"][stage]["do"]["deps"])
    if len(values) > slots:
        raise ValueError(f"{stage}: {len(values)} {field} paths but the template has {slots} `${{item.{field}[i]}}` "
                         f"deps: add them up to ${{item.{field}[{len(values) - 1}]}} in dvc.yaml")
    return values + [padding] * (slots - len(values))


def family_vars(dvc_yaml: dict) -> dict[str, dict[str, dict]]:
    """`vars.families` and `vars.generators` as the registry and the import graph call for them."""
    fixed = fixed_deps(dvc_yaml, "train")
    families = {}
    for name, family in registry.FAMILIES.items():
        own = f"src/deepzoo/families/{name}.py"
        code = [own, *(p for p in collapse(stage_files("train", name)) if p != own and not covered(p, fixed))]
        families[name] = {"data": family.data, "code": fill_slots(dvc_yaml, "train", "code", code, own),
                          "train_reads": fill_slots(dvc_yaml, "train", "train_reads", list(family.training_reads),
                                                    f"data/processed/{family.data}"),
                          "reads": fill_slots(dvc_yaml, "evaluate", "reads", list(family.evaluation_reads),
                                              f"models/{name}")}
    generators = {name: {k: families[name][k] for k in ("data", "code")}
                  for name, family in registry.FAMILIES.items() if family.generates}
    return {"families": families, "generators": generators}


BEGIN, END = "  # >>> generated by `python -m deepzoo.wiring`\n", "  # <<< generated\n"


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: object) -> bool:  # the same list twice is written twice, not as &id001/*id001
        return True


def render(dvc_text: str) -> str:
    """`dvc.yaml`'s text with the generated `vars` entries replaced by what the registry and imports call for."""
    if BEGIN not in dvc_text or END not in dvc_text:
        raise ValueError(f"dvc.yaml has no generated block: its vars need the lines {BEGIN.strip()!r} and "
                         f"{END.strip()!r}")
    entries = [{key: value} for key, value in family_vars(yaml.safe_load(dvc_text)).items()]
    block = yaml.dump(entries, Dumper=_Dumper, sort_keys=False, width=400, default_flow_style=None)
    head, rest = dvc_text.split(BEGIN, 1)
    return head + BEGIN + "".join(f"  {line}\n" for line in block.splitlines()) + END + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    path = Path("dvc.yaml")
    text = path.read_text()
    wanted = render(text)
    if "--check" in (argv if argv is not None else sys.argv[1:]):
        print("dvc.yaml is up to date" if wanted == text else "dvc.yaml's vars are out of date: run `make wiring`")
        return int(wanted != text)
    path.write_text(wanted)
    print("dvc.yaml: vars written" if wanted != text else "dvc.yaml: vars already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
