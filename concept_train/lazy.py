"""Package names imported on first use (PEP 562's module `__getattr__`): `import concept_train`
or a light submodule such as `concept_train.data.read.obs` does not load torch and the model."""

from __future__ import annotations

import sys
from importlib import import_module


def lazy_names(package: str, homes: dict[str, str]):
    """A module `__getattr__` for `package` that imports `name` from its module `homes[name]`
    (relative to the package) when first asked for."""

    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(homes[name], package), name)
        # kept on the package: importing a submodule of the same name (`eval.evaluate`) sets the
        # package's attribute to that module, which must not shadow the function afterwards
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
