"""The labelling job: HuBERT's k-means targets for a prepared dataset, on Ray Data.

- :mod:`pipeline.label.mfcc`: Kaldi's MFCCs with deltas (the first iteration's features);
- :mod:`pipeline.label.features`: a frame's features from MFCC or a layer of a model;
- :mod:`pipeline.label.kmeans`: the fit (scikit-learn) and the assignment;
- :mod:`pipeline.label.purity`: cluster usage and phone-free purity against transcripts;
- :mod:`pipeline.label.job`: the job (sample, fit, label every shard, commit) and what
  pretraining asks of it.

It lives outside ``pipeline/data`` because it runs models (torch); the label files and
their join with training batches are :mod:`pipeline.data.labels`.
"""
