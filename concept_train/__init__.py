"""Training side: the data pipeline (data/), the model (model/), the loop (trainer/), embeddings.

Python API (see the README): `load_model(run_or_checkpoint)`, `embed(adata, model)`,
`embed_file(run, path, out)`, `train(inputs, work_dir, ...)`, `estimate_mutual_information(z1, z2)`,
`evaluate(run, inputs, out_dir)` (scIB metrics, kNN and recall against PCA; `concept-eval`).

The names are imported on first use (PEP 562): importing a submodule, e.g. `concept_train.data.read.obs`,
does not load torch and the model.
"""

from .lazy import lazy_names

_HOMES = {
    "train": ".adapt",
    "embed": ".embedding",
    "embed_file": ".embedding",
    "embed_source": ".embedding",
    "evaluate": ".eval",
    "estimate_mutual_information": ".model",
    "load_model": ".trainer.checkpoint",
}
__all__ = sorted(_HOMES)

__getattr__ = lazy_names(__name__, _HOMES)
