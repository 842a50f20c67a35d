"""Steering: generate text with a direction added to the activations at a hook point.

`scale * direction` is added at every position (prompt and generated tokens) on every forward
pass, through `patch_hook`. With an SAE's decoder row as the direction (on raw activations, as
save_sae writes it), scale is in the feature's own activation units: scale = a adds what the
feature firing at a would add to the reconstruction, so the max activation in features.json is
a natural unit. Generation is greedy (temperature 0) or sampled with a seeded generator, the same
seed for the clean and the steered text; each step reruns the whole sequence (no KV cache), so the
patch sees every position each time and the result does not depend on cache handling.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distributed_sae.models.architectures import arch_spec
from distributed_sae.models.hooks import _forward_kwargs, hook_dim, patch_hook
from distributed_sae.models.registry import LoadedModel
from distributed_sae.sae.serialization import load_sae

log = logging.getLogger(__name__)


@torch.no_grad()
def _generate(loaded: LoadedModel, ids: Tensor, max_new_tokens: int, temperature: float,
              seed: int, eos: int | None) -> Tensor:
    """ids (1, seq) -> (1, seq + new) by greedy decoding or seeded sampling."""
    spec = arch_spec(loaded.arch)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_new_tokens):
        logits = loaded.model(**_forward_kwargs(loaded, spec, ids, None)).logits[0, -1]  # (vocab,)
        logits = logits.float().cpu()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        ids = torch.cat([ids, torch.tensor([[nxt]], dtype=ids.dtype)], dim=1)
        if eos is not None and nxt == eos:
            break
    return ids


def steer(loaded: LoadedModel, tokenizer: Any, hook: str, direction: Tensor, scale: float,
          prompt: str, max_new_tokens: int = 32, *, temperature: float = 0.0,
          seed: int = 0) -> dict[str, Any]:
    """Generate from `prompt` without and with `scale * direction` (d,) added at `hook`.

    Returns {text_clean, text_steered} (the generated continuations, prompt excluded), and
    prompt, hook, scale.
    """
    if not arch_spec(loaded.arch).causal:
        raise ValueError(f"steering needs a causal LM, but {loaded.name} is {loaded.arch!r}")
    d = hook_dim(loaded, hook)
    if direction.dim() != 1 or direction.shape[0] != d:
        raise ValueError(f"direction has shape {tuple(direction.shape)} but {hook} is {d} wide: "
                         f"pass a ({d},) vector (a decoder row of an SAE of this hook)")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    tok = tokenizer if tokenizer is not None else loaded.tokenizer
    if tok is None:
        raise ValueError("no tokenizer: pass one (the model was built without one)")
    ids = torch.tensor([tok.encode(prompt)], dtype=torch.long)  # (1, seq)
    eos = getattr(tok, "eos_token_id", None)
    clean = _generate(loaded, ids, max_new_tokens, temperature, seed, eos)
    shift = (scale * direction.detach().float()).to(loaded.device)  # (d,)
    with patch_hook(loaded, hook, lambda x: x + shift.to(x.dtype)):
        steered = _generate(loaded, ids, max_new_tokens, temperature, seed, eos)
    n = ids.shape[1]
    return {"prompt": prompt, "hook": hook, "scale": scale,
            "text_clean": tok.decode(clean[0, n:].tolist()),
            "text_steered": tok.decode(steered[0, n:].tolist())}


def steer_feature(sae_folder: str | Path, feature: int, scale: float, prompt: str,
                  max_new_tokens: int, loaded: LoadedModel, tokenizer: Any = None, *,
                  temperature: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """`steer` along decoder row `feature` of the SAE saved in `sae_folder` (at its own hook)."""
    sae, cfg = load_sae(sae_folder)
    if not 0 <= feature < sae.d_sae:
        raise ValueError(f"feature={feature} is out of range for {sae_folder} "
                         f"(d_sae={sae.d_sae}: 0..{sae.d_sae - 1})")
    hook = cfg.get("metadata", {}).get("hook_name")
    if not hook:
        raise ValueError(f"{sae_folder}/cfg.json has no metadata.hook_name: cannot tell where "
                         f"to steer")
    out = steer(loaded, tokenizer, hook, sae.W_dec[feature].detach(), scale, prompt,
                max_new_tokens, temperature=temperature, seed=seed)
    out.update(feature=feature, sae=str(sae_folder))
    log.info("steered %s feature %d by %g: %r -> %r", sae_folder, feature, scale,
             out["text_clean"], out["text_steered"])
    return out


def _member_model(cfg: Any, member_cfg: dict[str, Any], folder: Path) -> Any:
    """The model a member steers: model, or model_b for a member of the second model's hook
    ('b/...', model diffing), whose steering must patch that model."""
    from distributed_sae.config import ConfigError
    from distributed_sae.config.checks import is_model_b

    hook = str((member_cfg.get("metadata") or {}).get("hook_name") or "")
    if not is_model_b(hook):
        return cfg.model
    if not cfg.model_b.name:
        stored = (member_cfg.get("metadata") or {}).get("model_b_name")
        raise ConfigError(f"{folder.name} is a member of the second model's {hook}: set "
                          f"model_b.name={stored or '<the second model>'} to steer it")
    return cfg.model_b


def steer_stage(cfg: Any) -> dict[str, Any]:
    """`dsae-steer`: steer with cfg.steer.feature of a trained member (cfg.steer.member, default
    the bank's first) and write out_dir/steer/<member>_f<feature>_x<scale>.json."""
    import json

    from distributed_sae.config import ConfigError
    from distributed_sae.eval.run import trained_members
    from distributed_sae.models import load_model, load_tokenizer

    st = cfg.steer
    folder = Path(st.member) if st.member and Path(st.member).is_dir() else None
    if folder is None:
        members = trained_members(cfg.out_dir)
        names = [m.name for m in members]
        if st.member is not None and st.member not in names:
            raise FileNotFoundError(f"steer.member={st.member!r} is neither a folder nor a member "
                                    f"of {cfg.out_dir}/train (members: {names})")
        folder = members[names.index(st.member)] if st.member else members[0]
    member_cfg = json.loads((folder / "cfg.json").read_text())
    d_sae = int(member_cfg["d_sae"])
    model_cfg = _member_model(cfg, member_cfg, folder)
    if st.feature >= d_sae:  # before the model load: a typo should not cost a minute
        raise ConfigError(f"steer.feature={st.feature} is out of range for {folder.name} "
                          f"(d_sae={d_sae}): use 0..{d_sae - 1}")
    out = steer_feature(folder, st.feature, st.scale, st.prompt, st.max_new_tokens,
                        load_model(model_cfg), load_tokenizer(model_cfg),
                        temperature=st.temperature, seed=cfg.train.seed)
    path = Path(cfg.out_dir) / "steer" / f"{folder.name}_f{st.feature}_x{st.scale:g}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    log.info("clean:   %s%s", st.prompt, out["text_clean"])
    log.info("steered: %s%s", st.prompt, out["text_steered"])
    return out
