"""Cluster deployment: an offline kustomize renderer for manifests/ and the multi-node
pretraining PyTorchJob (Kubeflow Training Operator)."""

from vidops.deploy.kustomize import KustomizeError, render, render_yaml

__all__ = ["KustomizeError", "render", "render_yaml"]
