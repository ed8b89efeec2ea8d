"""The sections of a wavray run's config tree (everything but ``model``, which is
``models.config``'s): one small typed dataclass per concern, a docstring per field,
``ValueError`` naming the field for a bad value.

``pipeline.config`` assembles them into :class:`pipeline.config.Config` and holds the
presets and the override mechanism; import the sections from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class DataConfig:
    """Where the audio comes from and how it becomes batches."""

    train_uri: str = ""
    """Prepared dataset root (local path or s3://bucket/prefix) written by ``jobs.prepare``."""
    valid_split: bool = False
    """Also read the valid split for validation losses."""
    sample_rate: int = 16000
    max_sample_size: int = 250_000
    """Longer utterances are randomly cropped to this many samples (15.6 s)."""
    min_sample_size: int = 32_000
    """Shorter utterances are dropped (2 s)."""
    max_samples_per_batch: int = 1_400_000
    """Budget of audio samples per batch per worker (87.5 s in BASE)."""
    batch_mode: Literal["crop", "pad"] = "crop"
    """``crop``: crop every item to the batch's shortest; ``pad``: pad with a padding mask."""
    num_buckets: int = 8
    """Length buckets: batches are drawn from one bucket so padding/cropping is small."""
    normalize: bool = False
    """Zero mean, unit variance per utterance (on for LARGE / layer_norm extractors)."""
    shuffle_seed: int = 0
    """Base of the per-epoch shuffle seed (epoch e uses shuffle_seed + e)."""
    decode_cpus: float = 1.0
    """CPUs reserved per decode task."""
    prefetch_batches: int = 2
    language_alpha: float = 0.5
    """XLSR's language-balanced sampling: each epoch draws a language's utterances in
    proportion to (its hours)^alpha rather than its hours (1: as the data is; 0: every
    language equally), by resampling each shard's utterances with a seeded ratio per
    language, so the stream stays deterministic and exactly resumable. Languages are the
    prepared data's ``language`` column; a dataset of one language is read as it is."""
    labelled_ratio: float = 0.0
    """JUST's mix of labelled and unlabelled utterances (a row is labelled when its
    ``transcript`` is not blank). 0: read as the data is. r in (0, 1): each epoch resamples
    the rows, labelled ones by ``r / p`` copies and the others by ``(1 - r) / (1 - p)`` (p:
    the labelled share after language balancing), so that the expected share of labelled
    utterances in the stream is r and an epoch keeps its expected size; seeded like the
    language balancing it multiplies, so the stream stays exactly resumable. A split with
    no labelled or no unlabelled utterance is an error when r > 0."""
    max_epochs: int = 100
    """Epochs the training input streams in one pass (each with its own shuffle); the run
    ends at ``train.max_steps`` or when the stream ends, whichever comes first."""
    shard_size_mb: float = 256.0
    """prepare: target size of one Parquet shard of 16 kHz FLAC (DESIGN.md: 128-512 MB);
    small datasets need small shards, since a shard is the unit of decode parallelism."""
    valid_fraction: float = 0.01
    """prepare: share of utterances in the valid split, chosen by a hash of the id."""
    valid_speakers: list[str] = field(default_factory=list)
    """prepare: speakers (the sidecar's ``speaker`` column) whose every utterance goes to
    the valid split, on top of ``valid_fraction``: a dev set of voices never heard in
    training, as a probe or an evaluation of generalisation needs."""
    prepare_language: str = ""
    """prepare: the language of files the sidecar's ``language`` column leaves without one:
    ``folder`` for the first folder under the input root (``<input>/sw/...`` is ``sw``),
    any other value for that code, empty for none (``jobs.prepare --language``)."""
    prepare_min_seconds: float = 0.1
    """prepare: shorter files are rejected (``too_short``)."""
    prepare_max_seconds: float = 3600.0
    """prepare: longer files are rejected (``too_long``) from their header, before decoding."""
    s3_endpoint: str = ""
    """Endpoint URL for s3:// URIs (``http://127.0.0.1:8333``); empty: ``AWS_ENDPOINT_URL``,
    else AWS itself. Credentials come only from the AWS variables: this config is logged."""
    s3_region: str = ""
    """Region for s3:// URIs; empty: ``AWS_DEFAULT_REGION``, else ``us-east-1``."""
    s3_retry_seconds: float = 300.0
    """How long a running job keeps retrying (with backoff) an object store it cannot
    reach (reads, shard writes, checkpoint uploads, Ray Train's own bookkeeping) before it
    stops with an error naming the endpoint; the same command then resumes. A job still
    fails fast on a store that is unreachable when it starts."""

    def __post_init__(self) -> None:
        if self.sample_rate <= 0:
            raise ValueError(f"data.sample_rate: expected > 0, got {self.sample_rate}")
        if self.min_sample_size < 0:
            raise ValueError(f"data.min_sample_size: expected >= 0, got {self.min_sample_size}")
        if self.max_sample_size < max(1, self.min_sample_size):
            raise ValueError(
                f"data.max_sample_size ({self.max_sample_size}) must be >= "
                f"data.min_sample_size ({self.min_sample_size}) and > 0"
            )
        if self.max_samples_per_batch < self.max_sample_size:
            raise ValueError(
                f"data.max_samples_per_batch ({self.max_samples_per_batch}) must hold at least "
                f"one utterance of data.max_sample_size ({self.max_sample_size})"
            )
        if self.batch_mode not in ("crop", "pad"):
            raise ValueError(f"data.batch_mode: expected 'crop' or 'pad', got {self.batch_mode!r}")
        if self.num_buckets < 1:
            raise ValueError(f"data.num_buckets: expected >= 1, got {self.num_buckets}")
        if self.decode_cpus <= 0:
            raise ValueError(f"data.decode_cpus: expected > 0, got {self.decode_cpus}")
        if self.prefetch_batches < 0:
            raise ValueError(f"data.prefetch_batches: expected >= 0, got {self.prefetch_batches}")
        if not 0.0 <= self.language_alpha <= 1.0:
            raise ValueError(f"data.language_alpha: expected a value in [0, 1], got {self.language_alpha}")
        if not 0.0 <= self.labelled_ratio < 1.0:
            raise ValueError(f"data.labelled_ratio: expected a value in [0, 1), got {self.labelled_ratio}")
        if self.prepare_language != self.prepare_language.strip():
            raise ValueError(f"data.prepare_language: expected a code without surrounding spaces, "
                             f"got {self.prepare_language!r}")
        if self.max_epochs < 1:
            raise ValueError(f"data.max_epochs: expected >= 1, got {self.max_epochs}")
        if self.shard_size_mb <= 0:
            raise ValueError(f"data.shard_size_mb: expected > 0, got {self.shard_size_mb}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"data.valid_fraction: expected a value in [0, 1), got {self.valid_fraction}")
        if any(not isinstance(v, str) or not v for v in self.valid_speakers):
            raise ValueError(f"data.valid_speakers: expected a list of speaker names, got {self.valid_speakers!r}")
        if self.prepare_min_seconds < 0:
            raise ValueError(f"data.prepare_min_seconds: expected >= 0, got {self.prepare_min_seconds}")
        if self.prepare_max_seconds <= self.prepare_min_seconds:
            raise ValueError(
                f"data.prepare_max_seconds ({self.prepare_max_seconds}) must be > "
                f"data.prepare_min_seconds ({self.prepare_min_seconds})"
            )
        if self.s3_retry_seconds < 0:
            raise ValueError(f"data.s3_retry_seconds: expected >= 0, got {self.s3_retry_seconds}")
        if self.s3_endpoint and not self.s3_endpoint.startswith(("http://", "https://")):
            raise ValueError(
                f"data.s3_endpoint: expected a URL starting with http:// or https://, got {self.s3_endpoint!r}"
            )


@dataclass(kw_only=True)
class OptimConfig:
    """Adam as in SPEC.md."""

    lr: float = 5e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    clip_grad_norm: float = 0.0
    """Gradient clipping by global norm; 0 disables it (fairseq's BASE recipe)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr: expected > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas: expected two values in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ValueError(f"optim.eps: expected > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay: expected >= 0, got {self.weight_decay}")
        if self.clip_grad_norm < 0:
            raise ValueError(f"optim.clip_grad_norm: expected >= 0, got {self.clip_grad_norm}")


@dataclass(kw_only=True)
class ScheduleConfig:
    """Learning-rate schedule over optimizer updates."""

    kind: Literal["polynomial", "tri_stage", "noam", "cosine"] = "polynomial"
    """``polynomial``: linear warm-up then polynomial decay (wav2vec 2.0 pretraining);
    ``tri_stage``: warm-up, hold, exponential decay (fine-tuning); ``noam``: linear
    warm-up then decay with the inverse square root of the update (BEST-RQ, Conformers);
    ``cosine``: linear warm-up then half a cosine down to ``end_lr`` (wav2vec 1.0)."""
    warmup_steps: int = 32_000
    power: float = 1.0
    """Exponent of the polynomial decay (1 = linear)."""
    end_lr: float = 0.0
    hold_ratio: float = 0.4
    """tri_stage: fraction of ``train.max_steps`` held at peak."""
    decay_ratio: float = 0.5
    """tri_stage: fraction of ``train.max_steps`` spent decaying."""
    final_lr_scale: float = 0.05
    """tri_stage: lr at the end, as a fraction of the peak."""

    def __post_init__(self) -> None:
        if self.kind not in ("polynomial", "tri_stage", "noam", "cosine"):
            raise ValueError(
                f"schedule.kind: expected 'polynomial', 'tri_stage', 'noam' or 'cosine', got {self.kind!r}"
            )
        if self.kind == "noam" and self.warmup_steps < 1:
            raise ValueError("schedule.warmup_steps: the noam schedule peaks at the end of its warm-up; expected >= 1, got 0")
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps: expected >= 0, got {self.warmup_steps}")
        if self.power <= 0:
            raise ValueError(f"schedule.power: expected > 0, got {self.power}")
        if self.end_lr < 0:
            raise ValueError(f"schedule.end_lr: expected >= 0, got {self.end_lr}")
        if self.kind == "tri_stage":
            if not 0.0 <= self.hold_ratio <= 1.0 or not 0.0 <= self.decay_ratio <= 1.0:
                raise ValueError(
                    f"schedule.hold_ratio / schedule.decay_ratio: expected values in [0, 1], got "
                    f"{self.hold_ratio} / {self.decay_ratio}"
                )
            if self.hold_ratio + self.decay_ratio > 1.0:
                raise ValueError(
                    f"schedule.hold_ratio + schedule.decay_ratio must be <= 1, got "
                    f"{self.hold_ratio} + {self.decay_ratio}"
                )
            if not 0.0 < self.final_lr_scale <= 1.0:
                raise ValueError(f"schedule.final_lr_scale: expected in (0, 1], got {self.final_lr_scale}")

    def check_peak(self, peak_lr: float) -> None:
        """Checks that need the peak learning rate (``optim.lr``), another section."""
        if self.kind in ("polynomial", "cosine") and self.end_lr > peak_lr:
            raise ValueError(f"schedule.end_lr ({self.end_lr}) must be <= optim.lr ({peak_lr})")


@dataclass(kw_only=True)
class TrainConfig:
    """The loop: how long, how often, how precise."""

    max_steps: int = 400_000
    """Optimizer updates."""
    grad_accum: int = 1
    """Micro-batches per update."""
    seed: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on GPU, fp32 on CPU."""
    compile: bool = False
    """``torch.compile`` the feature encoder and each Transformer layer (regions; see
    ``pipeline.train.engine``)."""
    activation_checkpointing: bool = False
    log_every: int = 10
    """Steps between metric reductions/logs (no host sync in between)."""
    max_nonfinite_steps: int = 10
    """Consecutive non-finite losses after which the run stops."""
    max_seconds: float = 0.0
    """A compute budget: the run ends after this many seconds of training (measured by
    ``budget_clock``, start-up and checkpoints excluded, summed over resumes) or at
    ``max_steps``, whichever comes first; 0: no time limit. Objectives that cost more per
    update reach fewer updates in the same budget, which is what comparing them at equal
    compute means."""
    budget_clock: Literal["auto", "cpu", "wall"] = "auto"
    """What ``max_seconds`` counts: ``cpu``, the CPU time of the training process (its
    threads included: CPU-seconds, unmoved by other load on the machine); ``wall``, elapsed
    time (GPU-seconds on an accelerator); ``auto``: ``cpu`` on CPU, ``wall`` on GPU."""
    init_from: str = ""
    """Initialise the model from a trained model: a wavray checkpoint or run folder, a
    Hugging Face directory, local or ``s3://``, or an MLflow model URI
    (``models:/name@alias``); see ``pipeline.model_io``."""
    chance_margin: float = 0.05
    """Alarm (log warning + MLflow tag) when, after warm-up, the contrastive loss per masked
    frame is within this many nats of chance, ln(K + 1): the model learns nothing."""
    min_perplexity: float = 2.0
    """Alarm when, after warm-up, a codebook group's code or prob perplexity falls below
    this: the quantizer has collapsed onto a few codewords."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"train.max_steps: expected >= 1, got {self.max_steps}")
        if self.grad_accum < 1:
            raise ValueError(f"train.grad_accum: expected >= 1, got {self.grad_accum}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision: expected 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self.log_every < 1:
            raise ValueError(f"train.log_every: expected >= 1, got {self.log_every}")
        if self.max_seconds < 0:
            raise ValueError(f"train.max_seconds: expected >= 0, got {self.max_seconds}")
        if self.budget_clock not in ("auto", "cpu", "wall"):
            raise ValueError(f"train.budget_clock: expected 'auto', 'cpu' or 'wall', got {self.budget_clock!r}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"train.max_nonfinite_steps: expected >= 1, got {self.max_nonfinite_steps}")
        if self.chance_margin < 0:
            raise ValueError(f"train.chance_margin: expected >= 0, got {self.chance_margin}")
        if self.min_perplexity < 1:
            raise ValueError(f"train.min_perplexity: expected >= 1, got {self.min_perplexity}")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """The DeepSpeed engine."""

    zero_stage: int = 0
    """ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """ZeRO-Offload of the optimizer state to CPU (stages 1-3)."""
    bucket_size: int = 50_000_000
    """Elements per ZeRO reduce/all-gather/prefetch bucket: larger overlaps better, costs memory."""
    zero3_persistence_threshold: int = 100_000
    """ZeRO-3: parameters with fewer elements stay unpartitioned (saves many tiny gathers)."""
    cpu_shm_comm: bool = False
    """Let DeepSpeed build its CPU shared-memory all-reduce op (about 50 s of compiling on
    first use). Only DeepSpeed's inference all-reduce uses it; training collectives go
    through the torch process group, so it stays off."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1, got 0")
        if self.bucket_size < 1:
            raise ValueError(f"deepspeed.bucket_size: expected >= 1, got {self.bucket_size}")
        if self.zero3_persistence_threshold < 0:
            raise ValueError(
                f"deepspeed.zero3_persistence_threshold: expected >= 0, got {self.zero3_persistence_threshold}"
            )


@dataclass(kw_only=True)
class ScalingConfig:
    """How many training workers and what each takes from the cluster."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    """Keep below the node's CPUs so Ray Data keeps CPUs for decoding (STACK.md)."""
    worker_resources: list[str] = field(default_factory=list)
    """Custom Ray resources each worker asks for besides CPUs (and the GPU of ``use_gpu``),
    as ``name=amount``: workers then run only on nodes that advertise them (a node type's
    own resource, or a multi-node test cluster's stand-in for GPUs)."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"scaling.num_workers: expected >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"scaling.cpus_per_worker: expected > 0, got {self.cpus_per_worker}")
        self.resources()

    def resources(self) -> dict[str, float]:
        """``worker_resources`` as a mapping; ValueError naming a bad entry."""
        out = {}
        for item in self.worker_resources:
            name, _, amount = str(item).partition("=")
            try:
                value = float(amount)
            except ValueError:
                value = -1.0
            if not name.strip() or value <= 0 or name.strip() in ("CPU", "GPU", "memory"):
                raise ValueError(
                    f"scaling.worker_resources: expected entries like 'trainer=1' (a custom resource and a "
                    f"positive amount; CPU and GPU have their own settings), got {item!r}"
                )
            out[name.strip()] = value
        return out


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where and how often the run saves itself."""

    storage_path: str = "runs"
    """Local directory or s3://bucket/prefix holding every run's checkpoints."""
    run_name: str = ""
    """Same name + same storage path = resume. Empty: a name is made from the time."""
    every_steps: int = 1000
    keep_last: int = 3
    max_failures: int = 3
    """Worker failures tolerated; each restarts from the newest checkpoint."""
    local_dir: str = ""
    """Where each worker writes its part of a checkpoint before uploading it (a large local
    disk on the training nodes); empty: the system's temporary directory."""

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps: expected >= 1, got {self.every_steps}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last: expected >= 1, got {self.keep_last}")
        if self.max_failures < -1:
            raise ValueError(f"checkpoint.max_failures: expected >= -1, got {self.max_failures}")


@dataclass(kw_only=True)
class TrackingConfig:
    """MLflow."""

    uri: str = ""
    """Tracking URI; empty: a sqlite store under the checkpoint storage path (local runs)."""
    experiment: str = "wavray"
    register_as: str = ""
    """Register the final model under this name in the model registry; empty: don't."""

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("tracking.experiment: expected a non-empty name")


@dataclass(kw_only=True)
class ProbeConfig:
    """The frozen-encoder CTC probe (``pipeline/probe.py``): a cheap downstream score.

    Pretraining losses cannot rank pretext tasks against each other (SPEC.md, last
    section); the character error rate of a small CTC head trained on frozen features can.
    """

    train_uri: str = ""
    """Prepared dataset with transcripts for the probe's training set; empty: no probe."""
    train_split: Literal["train", "valid", "all"] = "train"
    train_minutes: float = 10.0
    """Labelled audio the head trains on (the first utterances of a seeded shuffle)."""
    dev_uri: str = ""
    """Prepared dataset for the dev CER; empty: ``train_uri``."""
    dev_split: Literal["train", "valid", "all"] = "valid"
    dev_minutes: float = 5.0
    every_steps: int = 0
    """Sweeps: probe the checkpoint of every this many updates (a multiple of
    ``checkpoint.every_steps``); 0: every checkpoint. The trial's driver probes the
    checkpoints as the run writes them; a run outside a sweep does not probe."""
    layer: int = -1
    """Hidden state to read without ``weighted_sum``: 0 = Transformer input, i = output of
    layer i, negative counts from the last."""
    weighted_sum: bool = True
    """Learn a softmax-weighted sum of all hidden states (SUPERB) instead of one layer."""
    head: Literal["bilstm", "conv", "linear"] = "bilstm"
    """``bilstm``: 2-layer BiLSTM; ``conv``: two 1-D convolutions (cheaper); ``linear``."""
    hidden: int = 128
    steps: int = 300
    """Optimizer updates of the head (a fixed budget, so scores are comparable)."""
    batch_size: int = 16
    """Utterances per update."""
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train_minutes", "dev_minutes", "lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"probe.{name}: expected > 0, got {getattr(self, name)}")
        for name in ("hidden", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"probe.{name}: expected >= 1, got {getattr(self, name)}")
        if self.every_steps < 0:
            raise ValueError(f"probe.every_steps: expected >= 0, got {self.every_steps}")
        if self.head not in ("bilstm", "conv", "linear"):
            raise ValueError(f"probe.head: expected 'bilstm', 'conv' or 'linear', got {self.head!r}")
        for name in ("train_split", "dev_split"):
            if getattr(self, name) not in ("train", "valid", "all"):
                raise ValueError(f"probe.{name}: expected 'train', 'valid' or 'all', got {getattr(self, name)!r}")


@dataclass(kw_only=True)
class FinetuneConfig:
    """CTC fine-tuning (``jobs.finetune``); the initial weights come from ``train.init_from``."""

    vocab: str = ""
    """Characters of the CTC vocabulary (blank and the word boundary ``|`` are added);
    empty: English letters and the apostrophe (other letters lose their accents)."""
    vocab_from_data: bool = False
    """Build the vocabulary from the characters of ``data.train_uri``'s transcripts (a joint
    grapheme vocabulary over all its languages, ``pipeline.text.transcript_characters``);
    the run's saved config holds the result in ``vocab``, replacing what ``vocab`` said (with
    a warning: a fine-tuning config may name English letters)."""
    freeze_encoder_steps: int = 0
    """Keep the Transformer (and the feature projection) frozen for this many updates, so
    the fresh head first learns to read the pretrained features."""

    frontend: Literal["wav2vec2", "logmel"] = "wav2vec2"
    """``wav2vec2``: the conv feature encoder; ``logmel``: log-mel filterbanks in its place
    (the baseline: same projection, Transformer and head on classic features)."""
    n_mels: int = 80
    """Filterbank channels of the ``logmel`` frontend."""
    freeze_feature_encoder: bool = True
    """Keep the conv feature encoder fixed (wav2vec 2.0's fine-tuning recipe)."""
    dev_minutes: float = 5.0
    """The dev CER of a run that trains a CTC head (fine-tuning, JUST): at every checkpoint,
    rank 0 transcribes up to this many minutes of ``data.train_uri``'s valid split (its
    transcribed utterances, the languages taken in turn) with greedy CTC and logs
    ``dev/cer``, ``dev/wer`` and, on a multilingual split, ``dev/cer/lang/<code>`` to MLflow
    (``pipeline.train.dev``); 0: off."""

    def __post_init__(self) -> None:
        if not self.dev_minutes >= 0:
            raise ValueError(f"finetune.dev_minutes: expected >= 0 (0: no dev CER), got {self.dev_minutes}")
        if self.frontend not in ("wav2vec2", "logmel"):
            raise ValueError(f"finetune.frontend: expected 'wav2vec2' or 'logmel', got {self.frontend!r}")
        if self.n_mels < 1:
            raise ValueError(f"finetune.n_mels: expected >= 1, got {self.n_mels}")
        if self.freeze_encoder_steps < 0:
            raise ValueError(f"finetune.freeze_encoder_steps: expected >= 0, got {self.freeze_encoder_steps}")


@dataclass(kw_only=True)
class LabelConfig:
    """The labelling job (``jobs.label``, ``pipeline.label``): HuBERT's k-means targets, or
    vq-wav2vec's tokens (``features=tokens``), for every utterance of ``data.train_uri``, written
    next to its shards (``<data.train_uri>/labels/<name>``). The number of classes is the
    model's (``model.hubert.clusters``; vq_bert: ``model.vq_bert.vocab``); a pretraining run of
    objective ``hubert`` or ``vq_bert`` reads the label set these settings name and refuses one
    they did not make."""

    name: str = ""
    """The label set's folder under ``<data.train_uri>/labels/``; empty: named by the settings
    (``mfcc-k100``, ``layer6-k500``)."""
    features: Literal["mfcc", "model", "tokens"] = "mfcc"
    """``mfcc``: 13 MFCCs + deltas + delta-deltas at 100 Hz (Kaldi's recipe; HuBERT's first
    iteration); ``model``: hidden state ``layer`` of the model at ``teacher`` (later iterations);
    ``tokens``: the vq-wav2vec model at ``teacher``'s codeword ids of every frame, one token
    per frame (no k-means: the sample builds the vocabulary; vq_bert's input and targets)."""
    teacher: str = ""
    """``features=model``: the model whose layer is clustered; ``features=tokens``: the
    vq-wav2vec model that tokenises (any location ``train.init_from``
    takes: a run folder stands for its newest checkpoint, pinned when the job starts)."""
    layer: int = 6
    """``features=model``: the hidden state clustered (0: the Transformer's input, i: the output
    of layer i; HuBERT BASE's second iteration clusters layer 6)."""
    sample_fraction: float = 0.1
    """Share of the train split's utterances whose frames fit k-means (HuBERT: 10%)."""
    max_sample_frames: int = 1_000_000
    """At most this many frames of that sample (evenly thinned): bounds the fit's memory."""
    batch_size: int = 10_000
    """Frames per mini-batch of scikit-learn's ``MiniBatchKMeans`` (fairseq's recipe)."""
    n_init: int = 20
    """k-means++ initialisations tried (the best is kept)."""
    max_iter: int = 100
    """Passes over the sample at most."""
    max_no_improvement: int = 100
    """Mini-batches without improvement before the fit stops early."""
    seed: int = 0
    """Seeds the sample and the k-means fit: the same settings give the same labels."""
    max_chunk_seconds: float = 100.0
    """``features=model``: longer utterances run through the teacher in pieces of this length
    (fairseq's 1.6M samples), each seeing a little of the next so no frame is lost."""
    workers: int = 0
    """Labelling workers (each holds the teacher once); 0: one per free GPU when the cluster
    has some and the features come from a model, else one per two CPUs."""
    cpus_per_worker: float = 1.0
    """CPUs of each labelling worker (torch threads included)."""

    def __post_init__(self) -> None:
        if self.features not in ("mfcc", "model", "tokens"):
            raise ValueError(f"label.features: expected 'mfcc', 'model' or 'tokens', got {self.features!r}")
        if self.name and not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"label.name: expected letters, digits, '-', '_' or '.', got {self.name!r}")
        if self.layer < 0:
            raise ValueError(f"label.layer: expected >= 0, got {self.layer}")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError(f"label.sample_fraction: expected in (0, 1], got {self.sample_fraction}")
        for name in ("max_sample_frames", "batch_size", "n_init", "max_iter", "max_no_improvement"):
            if getattr(self, name) < 1:
                raise ValueError(f"label.{name}: expected >= 1, got {getattr(self, name)}")
        if self.max_chunk_seconds <= 0:
            raise ValueError(f"label.max_chunk_seconds: expected > 0, got {self.max_chunk_seconds}")
        if self.workers < 0:
            raise ValueError(f"label.workers: expected >= 0, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"label.cpus_per_worker: expected > 0, got {self.cpus_per_worker}")

    def set_name(self, clusters: int) -> str:
        """The label set's folder name: ``name``, else one the settings give."""
        if self.name:
            return self.name
        source = {"mfcc": "mfcc", "tokens": "tokens"}.get(self.features, f"layer{self.layer}")
        return f"{source}-k{clusters}"
