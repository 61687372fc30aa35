"""Data: sources -> prepared ArrayRecord shards (prepare) -> rows read per process (reader, mixture) ->
grain batches (corpus)."""
