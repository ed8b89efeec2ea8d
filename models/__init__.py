"""wav2vec 2.0 in pure PyTorch: config, modules, factory, checkpoints, Hugging Face interop.

Imports torch (and safetensors) only; never ray, deepspeed, mlflow or the pipeline.
"""
