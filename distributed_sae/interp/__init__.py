"""Autointerpretability: explain and score features (and, as the baseline, neurons) with an LLM.

    examples  held-out activations -> per-unit example windows (explain / score splits)
    llm       one client over backends (local transformers model, any OpenAI-compatible
              server), with an on-disk cache, concurrency, retries and token accounting
    prompts   the explainer's and the scorers' prompts, and parsing their answers
    scoring   detection, fuzzing (balanced accuracy) and simulation (correlation)
    stage     `dsae-interp`: every member's sampled features and the layer's neurons
"""
