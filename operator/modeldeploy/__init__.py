"""modeldeploy: a Kubernetes operator that serves Hugging Face and Gitee AI models."""

__version__ = "0.1.0"
