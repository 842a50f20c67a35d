"""De-quantised GGUF weights kept on disk, so a model is de-quantised once per machine.

Every process that loads a GGUF model (each harvest actor, the eval stage, the interp stage's
local LLM) otherwise de-quantises it again. transformers unpacks the quantised blocks tensor by
tensor in Python, and that is slow. SmolLM2-135M's 98 MB Q4_1 file takes 20-40 s on the 2-core
build machine, longer when two actors do it at once. Reading the same weights back as float32
safetensors takes a small part of that (figures: docs/harvest.md, `scripts/bench_model_load.py`).

An entry is keyed by the GGUF file's SHA-256 and the transformers version, since the
de-quantisation and the q/k permutation it applies belong to transformers. It holds the model's
config, its float32 weights and its tokenizer. An entry is written to `<key>.tmp-<host>-<pid>`
and renamed into place, with `complete.json` written last. Two processes that miss together
both write, one rename wins, and a reader never sees half an entry. An entry that cannot be read
back (a disk error) is removed and written again. A cache that cannot be written (read-only,
disk full) is skipped with a warning, and the model loaded from the GGUF is used as it is.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

_MARKER = "complete.json"
_CHUNK = 1 << 22  # 4 MiB reads: the 98 MB file hashes in about 0.2 s on the build machine


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def entry_dir(cache_dir: str, gguf_path: str) -> Path:
    """The cache entry of this GGUF file under this transformers version."""
    import transformers

    key = f"{file_sha256(gguf_path)[:24]}-transformers{transformers.__version__}"
    return Path(os.path.expanduser(cache_dir)) / "gguf" / key


def cached(entry: Path) -> bool:
    return (entry / _MARKER).is_file()


def _save_model(model: Any, folder: Path) -> None:
    """config.json and model.safetensors, as from_pretrained reads them. save_pretrained
    refuses a model loaded from GGUF (it counts as quantised), so the de-quantised float32
    tensors are written directly; save_model keeps one copy of tied tensors (SmolLM2's
    embedding and LM head)."""
    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights written are plain float32
    config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_torn(entry: Path) -> None:
    """Remove the half-written entries of this host's dead writers (a killed actor's): each
    is the size of the model in float32. Other hosts' are left alone, as their pids mean
    nothing here."""
    prefix = f"{entry.name}.tmp-{socket.gethostname()}-"
    for tmp in entry.parent.glob(prefix + "*"):
        pid = tmp.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def write_entry(entry: Path, model: Any, tokenizer: Any, gguf_path: str) -> None:
    """Save model and tokenizer as entry, atomically; warn and go on when it cannot be done."""
    tmp = entry.with_name(f"{entry.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    start = time.perf_counter()
    try:
        if entry.parent.is_dir():
            remove_torn(entry)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _save_model(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"gguf": gguf_path}) + "\n")
        try:
            os.rename(tmp, entry)
        except OSError:
            if not cached(entry):  # not another writer's entry: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process got there first
            return
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("could not cache the de-quantised weights in %s (%s); the next load "
                       "de-quantises again. Set model.cache_dir to a writable folder, or '' to "
                       "turn the cache off", entry.parent, err)
        return
    logger.info("cached the de-quantised weights in %s in %.1f s", entry,
                time.perf_counter() - start)


def load_gguf(
    cache_dir: str,
    directory: str,
    gguf_file: str,
    load: Callable[[str, Optional[str]], Any],
    tokenizer: Callable[[str, Optional[str]], Any],
) -> tuple[Any, Any]:
    """(model, tokenizer) of directory/gguf_file, through the cache when cache_dir is set.

    load(source, gguf_file) and tokenizer(source, gguf_file) do the loading: from the GGUF file
    (gguf_file given) or from a cache entry's folder (gguf_file None)."""
    if not cache_dir:
        return load(directory, gguf_file), tokenizer(directory, gguf_file)
    entry = entry_dir(cache_dir, os.path.join(directory, gguf_file))
    if cached(entry):
        try:
            return load(str(entry), None), tokenizer(str(entry), None)
        except Exception as err:  # noqa: BLE001  (a damaged entry must not stop a run)
            logger.warning("the cached weights in %s cannot be read (%s): de-quantising the "
                           "GGUF again and rewriting them", entry, err)
            shutil.rmtree(entry, ignore_errors=True)
    model, tok = load(directory, gguf_file), tokenizer(directory, gguf_file)
    write_entry(entry, model, tok, os.path.join(directory, gguf_file))
    return model, tok
