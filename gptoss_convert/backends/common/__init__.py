"""Forward parts every model family shares as they are: norms, rotation, masks and packing,
embedding and the untied head (`layers`), the MoE dispatch and its three strategies (`moe`),
the KV-cache decoding loop (`decode`), the streamed forward's reads (`streamed`) and the
sharding from leaf tables (`sharding`). A family's folder imports these and nothing from another
family (tests/test_layers.py checks)."""
