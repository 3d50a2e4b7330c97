"""Reading cells from the shards: a loader's split list -> usable datasets (catalog), random
access to samples (store), a batch's samples decoded at once (decode), obs columns in bulk (obs),
streaming's shared memory (shm)."""
