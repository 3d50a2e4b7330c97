"""Training side: the data pipeline (data/), the model (model/), the loop (trainer/), embeddings.

Python API (see the README): `load_model(run_or_checkpoint)`, `embed(adata, model)`,
`embed_file(run, path, out)`, `train(inputs, work_dir, ...)`, `estimate_mutual_information(z1, z2)`,
`evaluate(run, inputs, out_dir)` (scIB metrics, kNN and recall against PCA; `concept-eval`).
"""

from .adapt import train
from .embedding import embed, embed_file, embed_source
from .eval import evaluate
from .model import estimate_mutual_information
from .trainer.checkpoint import load_model

__all__ = ["embed", "embed_file", "embed_source", "estimate_mutual_information", "evaluate", "load_model", "train"]
