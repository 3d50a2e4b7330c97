"""Which cells form global batch g: groups of cells that may share a batch (groups), the
batch plan (plan) and the keyed permutations behind the `mixed` order (permutation)."""
