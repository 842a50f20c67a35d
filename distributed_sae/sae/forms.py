"""Member forms: what a dictionary reads and what it writes, orthogonal to its activation kind.

A kind (topk, relu, jumprelu, ...) says how pre-activations become sparse codes; a form says
which activations go in and which come out. Every kind works in every form:

    sae              x -> f -> x_hat ~ x                  one hook in, the same hook out
    transcoder       x_in -> f -> y_hat ~ y_out           e.g. the MLP's input -> its output
    skip_transcoder  y_hat = f W_dec + x_in W_skip^T + b_dec   (Paulo et al. 2025)
    crosscoder       several hooks in, the same hooks out (acausal crosscoder, Lindsey et al.
                     2024): the hooks are concatenated, so the per-hook encoder slices sum into
                     one pre-activation and the decoder is per-hook slices of one row
    clt              cross-layer transcoder (Ameisen et al. 2025): MLP inputs of layers
                     l_1..l_n in, MLP outputs of the same layers out; a latent of layer l_i reads
                     only layer l_i's input and writes only to the outputs of layers >= l_i

Inputs and targets are concatenations of hooks, in order: x = [x_h1 | x_h2 | ...] (batch, d_in)
with d_in = sum of the hooks' widths, likewise y. The reconstruction loss is the MSE over the
concatenation, which is the mean of the per-hook MSEs weighted by width (every hook is scaled to
E||x||^2 = d_hook first, train/norm.py, so no hook dominates by its norm).

The CLT is a crosscoder whose encoder is block-diagonal and whose decoder is block upper
triangular, by latent group: latent i belongs to layer group `latent_group[i]` (a buffer, i mod n
when built, so every Matryoshka prefix and every latent shard holds every layer). The forbidden
blocks are zero at init and their gradients are zeroed before every step (Adam's moments stay 0
there, so they stay exactly 0). Cost: the encoder GEMM runs over all n input blocks, n times the
FLOPs of n separate encoders; a block-sparse kernel would remove that (not written yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMS = ("sae", "transcoder", "skip_transcoder", "crosscoder", "clt")
# Forms whose target is not their input: b_dec lives in the output space, so the encoder does not
# subtract it (SAELens's transcoders: apply_b_dec_to_input=False).
TRANSCODING = ("transcoder", "skip_transcoder", "clt")


@dataclass(frozen=True)
class Form:
    """A member's form and the widths of its input and target hooks, in order."""

    name: str = "sae"
    in_dims: tuple[int, ...] = ()
    out_dims: tuple[int, ...] = ()  # () = in_dims (sae, crosscoder)

    def __post_init__(self) -> None:
        if self.name not in FORMS:
            raise ValueError(f"form={self.name!r} is not one of {', '.join(FORMS)}")
        if not self.in_dims or any(d <= 0 for d in self.in_dims + self.out_dims):
            raise ValueError(f"form {self.name}: input widths {self.in_dims} must be positive")
        n_in, n_out = len(self.in_dims), len(self.targets_dims)
        if self.name == "sae" and (n_in != 1 or self.targets_dims != self.in_dims):
            raise ValueError(f"an sae reads and writes one hook, got widths {self.in_dims} -> "
                             f"{self.targets_dims}")
        if self.name == "crosscoder" and self.targets_dims != self.in_dims:
            raise ValueError(f"a crosscoder writes the hooks it reads, got {self.in_dims} -> "
                             f"{self.targets_dims}")
        if self.name in ("transcoder", "skip_transcoder") and (n_in, n_out) != (1, 1):
            raise ValueError(f"a {self.name} reads one hook and writes one, got {n_in} -> {n_out}")
        if self.name == "clt" and n_in != n_out:
            raise ValueError(f"a clt reads one MLP input per layer and writes one MLP output per "
                             f"layer, got {n_in} inputs and {n_out} targets")

    @classmethod
    def sae(cls, d_in: int) -> Form:
        return cls("sae", (d_in,))

    @property
    def targets_dims(self) -> tuple[int, ...]:
        return self.out_dims or self.in_dims

    @property
    def d_in(self) -> int:
        return sum(self.in_dims)

    @property
    def d_out(self) -> int:
        return sum(self.targets_dims)

    @property
    def apply_b_dec_to_input(self) -> bool:
        """Whether the encoder reads x - b_dec (only where input and output share a space)."""
        return self.name not in TRANSCODING

    @property
    def skip(self) -> bool:
        return self.name == "skip_transcoder"

    @property
    def groups(self) -> int:
        """Latent groups of a CLT (one per layer); 0 for every other form."""
        return len(self.in_dims) if self.name == "clt" else 0

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "in_dims": list(self.in_dims),
                "out_dims": list(self.targets_dims)}

    @classmethod
    def from_json(cls, value: dict[str, object]) -> Form:
        out = tuple(int(d) for d in value.get("out_dims", ()))  # type: ignore[union-attr]
        ins = tuple(int(d) for d in value["in_dims"])  # type: ignore[union-attr]
        return cls(str(value["name"]), ins, () if out == ins else out)


def block_ids(dims: tuple[int, ...]) -> torch.Tensor:
    """(sum(dims),) the index of the hook each coordinate of a concatenation belongs to."""
    return torch.repeat_interleave(torch.arange(len(dims)), torch.tensor(dims))


def clt_masks(form: Form, latent_group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder mask (d_in, d_sae), decoder mask (d_sae, d_out)) of a CLT, bool: latent i may
    read input block g_i only and write output blocks >= g_i."""
    g = latent_group.to(torch.long)  # (d_sae,)
    ins = block_ids(form.in_dims).to(g.device)  # (d_in,)
    outs = block_ids(form.targets_dims).to(g.device)  # (d_out,)
    return ins[:, None] == g[None, :], outs[None, :] >= g[:, None]


def split_hooks(t: torch.Tensor, dims: tuple[int, ...]) -> list[torch.Tensor]:
    """(batch, sum(dims)) -> one (batch, d_h) view per hook."""
    return list(t.split(list(dims), dim=-1))
