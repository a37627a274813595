"""The package's lazy exports: what ``import fastnoise`` gives at run time (``_EXPORTS``) is what
static tools (type checkers, the docs' griffe) read from its ``TYPE_CHECKING`` imports."""

import ast
import os

import fastnoise

INIT = os.path.join(os.path.dirname(fastnoise.__file__), "__init__.py")


def _static_names() -> set:
    tree = ast.parse(open(INIT).read())
    block = next(n for n in tree.body
                 if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    return {a.asname or a.name for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names}


def test_type_checking_imports_name_every_lazy_export():
    assert _static_names() == set(fastnoise._EXPORTS)


def test_every_lazy_export_resolves_to_what_its_module_defines():
    for name, where in fastnoise._EXPORTS.items():
        value = getattr(fastnoise, name)
        if where is None:
            assert value.__name__ == f"fastnoise.{name}"
        else:
            assert value is getattr(__import__(f"fastnoise.{where}", fromlist=[name]), name), name
