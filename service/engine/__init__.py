"""The engine: collections of vectors, durable in SQLite, searched through QINCo codes.

  registry     the data directory's collections (Store)
  collection   a collection and the parts it composes
  space        a vector space: model, index, originals, training state
  index        the index protocol: QINCo codes, or exact search before the first model
  record       points.sqlite, the record of truth
  snapshots    snapshots of the index and recovery
  refine       fast ingest's background re-encoding
  lifecycle    training jobs: start, cancel, resume, swap
  search       one search call; query: planning a request's searches
  reads        reads of stored points
  filters      payload filters over field indexes; ids: client ids <-> internal ids
  concurrency  the locks, their order, the background threads
  config       CollectionConfig
"""
