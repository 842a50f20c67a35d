"""Evaluation: reconstruction and sparsity metrics on held-out activations, and their report."""

from distributed_sae.eval.metrics import evaluate_sae, evaluate_saes
from distributed_sae.eval.run import evaluate, summary_table, trained_members

__all__ = ["evaluate", "evaluate_sae", "evaluate_saes", "summary_table", "trained_members"]
