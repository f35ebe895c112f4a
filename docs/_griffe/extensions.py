"""Griffe extensions for the API pages (configured in ``mkdocs.yml``: ``plugins: mkdocstrings: handlers: python:
options: extensions``). Build code, not a page: ``exclude_docs`` keeps it out of the site.

:class:`PackageDir`: ``pyproject.toml`` ships ``strategies/`` as ``lightning_fed.strategies``
(``[tool.setuptools.package-dir]``). Python finds it through the editable install's finder, but griffe reads the
source tree and only looks for ``lightning_fed/strategies/``. This extension reads the mapping from
``pyproject.toml`` and, when griffe has loaded the parent package, loads each mapped folder (with its subpackages)
as that package's member, so ``::: lightning_fed.strategies.fedavg`` and cross-references to
``lightning_fed.strategies...`` resolve.

:class:`SplitParameterNames`: the code documents parameters that share a description on one line
(``site_cpus, site_gpus: what each simulated site needs``), which Google-style parsing reads as one parameter named
``"site_cpus, site_gpus"`` that is not in the signature (two warnings, and a strict build fails). The extension
rewrites such an item as one item per name with the same description before griffe parses the docstring, so each
name gets its own row with its type from the signature, and a parameter documented under a wrong name still warns.

:class:`SphinxRoles`: the docstrings cross-reference with Sphinx roles (``:class:`~lightning_fed.config.Placement```);
they become mkdocs-autorefs references, links where the target is documented and plain code where it is not.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[2]


def _mapped_packages(root: Path) -> dict[str, Path]:
    """``{"lightning_fed.strategies": <root>/strategies}``: the package-dir entries whose folder is not the default."""
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    if tomllib is not None:
        package_dir = tomllib.loads(text).get("tool", {}).get("setuptools", {}).get("package-dir", {})
    else:  # the table's '"name" = "folder"' lines
        table = re.search(r"^\[tool\.setuptools\.package-dir\]\n(.*?)(?:^\[|\Z)", text, re.M | re.S)
        package_dir = dict(re.findall(r'^"([^"]+)"\s*=\s*"([^"]+)"', table.group(1), re.M)) if table else {}
    return {
        name: root / folder
        for name, folder in package_dir.items()
        if "." in name and Path(folder) != Path(*name.split("."))
    }


class PackageDir(griffe.Extension):
    """Attach each ``package-dir`` folder to its parent package once griffe has loaded the parent."""

    def __init__(self, root: str | None = None) -> None:
        super().__init__()
        self.mapped = _mapped_packages(Path(root).resolve() if root else ROOT)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for name, folder in sorted(self.mapped.items(), key=lambda item: item[0].count(".")):
            parent_path, _, child = name.rpartition(".")
            if parent_path.split(".", 1)[0] != pkg.name:
                continue
            parent = pkg if parent_path == pkg.name else pkg.get_member(parent_path.split(".", 1)[1])
            if child in parent.members or not (folder / "__init__.py").is_file():
                continue  # an installed (non-editable) copy already has it in place
            # the loader's own module loading (a private griffe method, griffe 2.x), so the docstring style, the other
            # extensions, line numbers and submodules are as for the rest of the package
            module = loader._load_module(child, folder / "__init__.py", submodules=True, parent=parent)
            parent.set_member(child, module)


_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params|Other Parameters|Keyword Args|Keyword Arguments):\s*$")
_SHARED = re.compile(r"^(\s*)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+):(.*)$")


def split_shared_names(text: str) -> str:
    """``a, b: text`` items of a Google-style parameters section as ``a: text`` and ``b: text`` (continuation lines
    copied with each)."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        header = _SECTION.match(lines[i])
        i += 1
        if not header:
            continue
        header_indent = len(header.group(1))
        item_indent = None
        while i < len(lines):
            line = lines[i]
            indent = len(line) - len(line.lstrip())
            if line.strip() and indent <= header_indent:
                break  # the section ended
            if line.strip() and item_indent is None:
                item_indent = indent
            shared = _SHARED.match(line) if line.strip() and indent == item_indent else None
            if not shared:
                out.append(line)
                i += 1
                continue
            # the item's continuation lines: blank, or indented deeper than the item
            end = i + 1
            while end < len(lines) and (
                not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > item_indent
            ):
                end += 1
            while end > i + 1 and not lines[end - 1].strip():
                end -= 1  # trailing blank lines stay after the last copy
            for name in (n.strip() for n in shared.group(2).split(",")):
                out.append(f"{shared.group(1)}{name}:{shared.group(3)}")
                out.extend(lines[i + 1 : end])
            i = end
    return "\n".join(out)


class SplitParameterNames(griffe.Extension):
    """Apply :func:`split_shared_names` to every docstring as griffe reads it (before it is parsed)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and "," in obj.docstring.value:
            obj.docstring.value = split_shared_names(obj.docstring.value)


_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|const):`(~?)([A-Za-z_][\w.]*)(\(\))?`")


_GOOGLE_SECTION = re.compile(r"^[A-Z][A-Za-z ]*:\s*$")


def sphinx_roles_to_autorefs(text: str) -> str:
    """``:class:`~lightning_fed.config.Placement``` as an optional cross-reference: a link where the target is on an
    API page, plain code where it is not (a name relative to the module, or an object the pages leave out). Inside an
    indented code block (indented text outside a Google-style section) the role becomes its bare name."""

    def link(match: re.Match) -> str:
        tilde, target, call = match.groups()
        return f'<autoref identifier="{target}" optional><code>{shown(match)}</code></autoref>'

    def shown(match: re.Match) -> str:
        tilde, target, call = match.groups()
        return (target.rsplit(".", 1)[-1] if tilde else target) + (call or "")

    out, in_section = [], False
    for line in text.split("\n"):
        indent = len(line) - len(line.lstrip())
        if line.strip() and indent == 0:
            in_section = bool(_GOOGLE_SECTION.match(line))
        code = indent >= 4 and not in_section
        out.append(_ROLE.sub(shown if code else link, line))
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """The code's docstrings cross-reference with Sphinx roles (``:class:`...```), which Markdown shows as they are;
    turn them into mkdocs-autorefs references (optional: a missing target is plain code, never a warning)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":`" in obj.docstring.value:
            obj.docstring.value = sphinx_roles_to_autorefs(obj.docstring.value)
