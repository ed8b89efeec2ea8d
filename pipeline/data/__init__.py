"""The data path: raw audio in object storage -> Parquet shards -> ready training batches.

Modules, in the order data flows through them:

* ``storage``      local paths and s3:// behind one pyarrow filesystem; fail-fast checks at
  start, retries while a running job's store is away, writes that appear whole
* ``objectstore``  a local S3 server (SeaweedFS) for the demo and the tests
* ``demo_corpus``  synthesised speech with transcripts (English, or several languages), made here
* ``listing``      every audio path under the input once, with ids; links, odd names
* ``sidecar``      transcripts, speakers and languages from a TSV as spreadsheets write it
* ``decode``       the samples of a file: libsndfile, helped over what it misreads, then ffmpeg
* ``audio``        one file -> 16 kHz mono FLAC that keeps its signal, or a reject reason;
  crop decoding
* ``verdicts``     every reject reason
* ``prepare``      the prepare job: list, label, group, convert + write shards, commit
* ``schema``       column names and the layout of a prepared dataset
* ``batching``     batches planned on lengths under a sample budget; XLSR language
  resampling; crop/pad assembly
* ``position``     what the training input delivered, for exact resume
* ``loader``       the Ray Data training input (``build_train_dataset``,
  ``iter_train_batches``)
* ``testing``      audio dummies (every bad-input class) for tests and benchmarks
* ``hostile``      the hostile corpus: every kind of file, name and link, with its verdict

Nothing here imports torch or ``models``: decode workers stay light.
"""
