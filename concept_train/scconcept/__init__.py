"""scConcept's published models and API names (docs/migrating.md): `model_dir` reads its model
directories as our models, `weights` maps its state-dict names and architecture keys to ours."""
