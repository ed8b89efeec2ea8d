"""The data path: raw audio in object storage -> Parquet shards -> ready training batches.

Modules, in the order data flows through them:

* ``storage``      local paths and s3:// behind one pyarrow filesystem; fail-fast checks
* ``objectstore``  a local S3 server (SeaweedFS) for the demo and the tests
* ``demo_corpus``  synthesised English speech with transcripts, made on this machine
* ``audio``        one file -> 16 kHz mono FLAC or a reject reason; crop decoding
* ``prepare``      the prepare job: list, label, group, convert + write shards, commit
* ``schema``       column names and the layout of a prepared dataset
* ``batching``     batches planned on lengths under a sample budget; crop/pad assembly
* ``position``     what the training input delivered, for exact resume
* ``loader``       the Ray Data training input (``build_train_dataset``,
  ``iter_train_batches``)
* ``testing``      audio dummies (every bad-input class) for tests and benchmarks

Nothing here imports torch or ``models``: decode workers stay light.
"""
