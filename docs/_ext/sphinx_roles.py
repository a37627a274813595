"""A griffe extension for the docs site: the docstrings' Sphinx roles (:func:`fit`,
:class:`~fastnoise.train.trainer.TrainResult`, ...) become code that links to the object's
reference entry where the site has one (an optional cross-reference: no warning when the object
is not rendered, e.g. a private module).

mkdocs.yml loads it (``extensions: [docs/_ext/sphinx_roles.py]``); nothing in the package imports it.
"""

from __future__ import annotations

import html
import re

import griffe

ROLE = re.compile(r":(?:py:)?(func|class|meth|attr|mod|data|exc|obj):`(~?)([^`]+)`")


def _lookup(collection, path: str):
    """The griffe object at ``path`` (aliases followed), or None."""
    parts = path.split(".")
    if not all(parts):  # a relative name (".base"): not resolved, shown as code
        return None
    try:
        obj = collection[parts[0]]
        for part in parts[1:]:
            obj = obj.members[part]
            if obj.is_alias:
                obj = obj.final_target
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    return obj


def _resolve(collection, scope, role: str, name: str):
    """The rendered path of ``name`` as seen from ``scope`` (a griffe object), or None."""
    candidates = [name]
    here = scope
    while here is not None:  # relative names: the scope, then its parents (class, module, package)
        candidates.append(f"{here.path}.{name}")
        here = here.parent
    for path in candidates:
        obj = _lookup(collection, path)
        if obj is None:
            continue
        if obj.is_module and role != "mod":
            # ``fastnoise.convert`` names the function that the package re-exports over its module
            leaf = obj.members.get(obj.name)
            if leaf is not None:
                return leaf.path
        return obj.path
    for path in candidates:  # a package's lazy export (``fastnoise.train.fit``): its one submodule member
        prefix, _, leaf = path.rpartition(".")
        package = _lookup(collection, prefix) if prefix else None
        if package is None or not package.is_module or not package.modules:
            continue
        found = [sub.members[leaf] for sub in package.modules.values()
                 if leaf in sub.members and not sub.members[leaf].is_alias]
        if len(found) == 1:
            return found[0].path
    return None


def _rewrite(text: str, collection, scope) -> str:
    def one(m: re.Match) -> str:
        role, tilde, name = m.groups()
        shown = name.rsplit(".", 1)[-1] if tilde else name
        if role in ("func", "meth"):
            shown = shown if shown.endswith(")") else shown + "()"
        code = f"<code>{html.escape(shown)}</code>"
        target = _resolve(collection, scope, role, name.rstrip("()"))
        if target is None:
            return code
        return f'<autoref identifier="{html.escape(target)}" optional>{code}</autoref>'

    return ROLE.sub(one, text)


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring of the loaded package once it is fully loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        seen: set[int] = set()
        stack = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj.docstring.value, loader.modules_collection, obj)
            stack.extend(m for m in obj.members.values() if not m.is_alias)
