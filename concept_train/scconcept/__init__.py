"""scConcept's published models and API names (docs/migrating.md).

`scConcept` and `load_config_and_model` (api.py) are scConcept's Python API over ours; `model_dir`
reads its model directories as our models, `weights` maps its state-dict names and architecture keys
to ours, `continued` starts a run from one of its models, `export` writes ours in its layout.
"""


def __getattr__(name):  # the API loads on first use: the trainer imports model_dir, not the API
    if name in ("scConcept", "load_config_and_model"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["scConcept", "load_config_and_model"]
