"""On-disk artefacts: one module per file format, each with its schema, reader and writer."""
