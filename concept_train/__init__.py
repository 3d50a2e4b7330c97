"""Training side: the data pipeline (data/), the model (model/), the loop (trainer/), embeddings (embed.py).

Python API: `load_model(run_or_checkpoint)`, `embed_source(model, path)`, `estimate_mutual_information(z1, z2)`.
"""

from .embed import embed_file, embed_source, load_model
from .model import estimate_mutual_information

__all__ = ["embed_file", "embed_source", "estimate_mutual_information", "load_model"]
