"""Text corpora: an iterator of documents (plain strings) for a `DataConfig`.

Three kinds of source, chosen from `cfg.name`:

* ``'cpython'`` (the default): text that ships with every CPython, so it needs neither the network
  nor an extra package: the pydoc help topics plus the docstrings of the standard library.
* a local path: a ``.txt``, ``.jsonl`` or ``.parquet`` file, or a directory holding such files.
* anything else: a Hugging Face dataset name, loaded with the optional ``datasets`` package.

Every source yields its documents in an order fixed by ``cfg.seed``, so the same config always
gives the same contexts (harvest units can then be recomputed or retried anywhere).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator, List, Tuple

from distributed_sae.config.errors import ConfigError
from distributed_sae.config.schema import DataConfig

logger = logging.getLogger(__name__)

CPYTHON = "cpython"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Documents held by the seeded shuffle of local files and streamed hub datasets. Corpora smaller
# than this are shuffled completely; larger ones are mixed within a window of this many documents,
# which bounds memory instead of reading a whole (possibly huge) corpus first.
SHUFFLE_BUFFER = 10_000

# Directories of the standard library that hold tests or third-party code rather than library
# docstrings: test suites are full of fixture strings, site-packages is not the standard library.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Documents of the corpus `cfg.name`, in an order that depends only on `cfg.seed`."""
    if cfg.name == CPYTHON:
        return _iter_cpython(cfg.seed, cfg.cache_dir)
    path = Path(os.path.expanduser(cfg.name))
    if path.exists():
        # The file list is checked now, so a bad directory fails before any tokenising starts.
        files = local_files(path)
        return _seeded_shuffle(_iter_local(files, cfg.text_field), cfg.seed, SHUFFLE_BUFFER)
    if _looks_like_path(cfg.name):
        raise ConfigError(
            f"data.name={cfg.name!r} looks like a local path but does not exist: give an existing "
            f"{'/'.join(LOCAL_SUFFIXES)} file or directory, 'cpython', or a Hugging Face dataset name"
        )
    return _iter_hub(cfg)


# --------------------------------------------------------------------------------------------
# cpython: pydoc topics + standard-library docstrings


def cpython_documents(cache_dir: str = "") -> Tuple[str, ...]:
    """All documents of the 'cpython' corpus, deduplicated, in sorted (seed-free) order.

    Measured on CPython 3.11.7 (2-core machine): 734 stdlib files parsed, 8,333 distinct documents
    (79 pydoc topics + docstrings), 2.23 M characters, 560 k SmolLM2 tokens (568 k with the EOS
    after each document); 3-5 s to build (plus ~0.8 s to tokenise it all), then
    cached for the life of the process. So 2 M tokens of contexts cycle over it about 4 times.
    With `cache_dir` (data.cache_dir) the built corpus is also kept on disk, so other processes
    (each harvest actor, every later run) read it instead of parsing the library again.
    """
    if not cache_dir:
        return _cpython_documents_cached()
    return _cpython_documents_on_disk(os.path.expanduser(cache_dir))


# Bump when the corpus's recipe changes (what is parsed, how documents are picked): old cache
# files then miss instead of serving the old corpus.
_CORPUS_FORMAT = 1


def _cpython_key() -> str:
    """What the corpus is built from: this Python, its pydoc topics and every parsed stdlib
    file's path, size and mtime (one stat each: ~30 ms for the ~750 files)."""
    from pydoc_data import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    h = hashlib.sha256(f"{_CORPUS_FORMAT}|{sys.version}|{root}".encode())
    for path in [Path(topics.__file__), *_stdlib_sources(root)]:
        st = path.stat()
        h.update(f"|{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


@functools.lru_cache(maxsize=4)
def _cpython_documents_on_disk(cache_dir: str) -> Tuple[str, ...]:
    """The corpus from `cache_dir`/corpora/cpython-<key>.json, built and written there if absent
    or unreadable. The file is written whole and renamed into place, so a reader never sees
    half of one; a folder that cannot be written costs a warning, not the run."""
    path = Path(cache_dir) / "corpora" / f"cpython-{_cpython_key()}.json"
    try:
        docs = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(docs, list) and docs and all(isinstance(d, str) for d in docs):
            logger.info("cpython corpus: %d documents from %s", len(docs), path)
            return tuple(docs)
        logger.warning("%s does not hold a list of documents: building the corpus again", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:  # unreadable or torn by hand: rebuild it
        logger.warning("cannot read %s (%s): building the corpus again", path, exc)
    docs = _cpython_documents_cached()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(list(docs), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        logger.warning("cannot keep the cpython corpus in %s (%s): set data.cache_dir to a "
                       "writable folder, or '' to build it every run", cache_dir, exc)
    return docs


@functools.lru_cache(maxsize=1)
def _cpython_documents_cached() -> Tuple[str, ...]:
    from pydoc_data.topics import topics  # text-only module, part of every CPython install

    start = time.perf_counter()
    docs = {text for text in topics.values() if text.strip()}
    n_files = 0
    for path in _stdlib_sources(Path(sysconfig.get_paths()["stdlib"])):
        tree = _parse_or_none(path)
        if tree is None:
            continue
        n_files += 1
        for node in ast.walk(tree):
            if isinstance(node, _DOC_NODES):
                doc = ast.get_docstring(node, clean=True)
                if doc and doc.strip():
                    docs.add(doc)
    # A set drops the many repeated docstrings ('Return self==value.'), which would otherwise be
    # over-represented; sorting makes the canonical order independent of the file-system walk.
    ordered = tuple(sorted(docs))
    logger.info(
        "cpython corpus: %d documents, %d characters from %d stdlib files and %d pydoc topics "
        "in %.1f s", len(ordered), sum(map(len, ordered)), n_files, len(topics),
        time.perf_counter() - start,
    )
    return ordered


def _stdlib_sources(root: Path) -> Iterator[Path]:
    """The .py files of the standard library under `root`, in sorted order, tests skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for filename in sorted(filenames):
            if filename.endswith(".py"):
                yield Path(dirpath) / filename


def _parse_or_none(path: Path) -> ast.Module | None:
    """The AST of `path`, or None when it cannot be read or parsed (we never import the module)."""
    try:
        source = path.read_bytes()
        # Old-style escapes in stdlib strings raise SyntaxWarning on newer Pythons: not our concern.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError) as exc:
        logger.debug("skipping %s: %s", path, exc)
        return None


def _iter_cpython(seed: int, cache_dir: str = "") -> Iterator[str]:
    docs = list(cpython_documents(cache_dir))
    random.Random(seed).shuffle(docs)
    return iter(docs)


# --------------------------------------------------------------------------------------------
# local files


def _looks_like_path(name: str) -> bool:
    """True for names that can only be meant as a local path ('org/name' is a hub dataset)."""
    return (
        os.path.isabs(os.path.expanduser(name))
        or name.startswith((".", "~"))
        or name.lower().endswith(LOCAL_SUFFIXES + (".json", ".csv"))
        or name.count("/") >= 2
        or os.sep != "/" and os.sep in name
    )


def local_files(path: Path) -> List[Path]:
    """The corpus files of `path`: itself, or the supported files under a directory (sorted)."""
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise ConfigError(
                f"data.name={str(path)!r} has an unsupported suffix {path.suffix!r}: use one of "
                f"{', '.join(LOCAL_SUFFIXES)}"
            )
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise ConfigError(
            f"data.name={str(path)!r} is a directory without any {'/'.join(LOCAL_SUFFIXES)} files: "
            "point it at a directory that holds some"
        )
    return files


def _iter_local(files: List[Path], text_field: str) -> Iterator[str]:
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    for file in files:
        yield from readers[file.suffix.lower()](file, text_field)


def _read_txt(path: Path, text_field: str) -> Iterator[str]:
    """A whole .txt file is one document (`text_field` is unused).

    Splitting on blank lines would put an EOS between the paragraphs of one text, which the model
    never sees in its training data; a corpus of many documents belongs in .jsonl or in a directory
    of .txt files.
    """
    del text_field
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.strip():
        yield text


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """One JSON object per line, the text in `text_field`; blank lines and null texts skipped."""
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where} is not valid JSON ({exc}): fix or remove the line") from exc
            if not isinstance(row, dict):
                raise ConfigError(f"{where} holds a {type(row).__name__}, not a JSON object")
            if text_field not in row:
                raise _missing_field(text_field, list(row), where)
            text = row[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise ConfigError(
                    f"{where}: field {text_field!r} holds a {type(text).__name__}, not text: "
                    "set data.text_field to a field holding strings"
                )
            if text.strip():
                yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    """Column `text_field` of a parquet file, read in record batches to bound memory."""
    import pyarrow.parquet as pq  # only needed for parquet corpora

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise _missing_field(text_field, names, str(path))
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def _missing_field(text_field: str, fields: Iterable[str], where: str) -> ConfigError:
    return ConfigError(
        f"data.text_field={text_field!r} is not a field of {where}: set data.text_field to one of "
        f"{sorted(fields)}"
    )


def _seeded_shuffle(items: Iterable[str], seed: int, buffer_size: int) -> Iterator[str]:
    """Shuffle a stream with a window of `buffer_size` items (a full shuffle if it is shorter).

    The same buffer scheme as `datasets`' streaming shuffle: each incoming item swaps with a random
    slot of the full buffer and the evicted item is yielded.
    """
    rng = random.Random(seed)
    buffer: List[str] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = rng.randrange(buffer_size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


# --------------------------------------------------------------------------------------------
# Hugging Face hub


def _iter_hub(cfg: DataConfig) -> Iterator[str]:
    """Rows of a Hugging Face dataset, shuffled with `cfg.seed`, text from `cfg.text_field`."""
    try:
        import datasets  # optional extra: only hub corpora need it
    except ImportError as exc:
        raise ConfigError(
            f"data.name={cfg.name!r} is neither 'cpython' nor an existing local path, so it is taken "
            "as a Hugging Face dataset, which needs the 'datasets' package: "
            "pip install distributed-sae[hub] (or use data.name=cpython or a local file)"
        ) from exc
    dataset = datasets.load_dataset(cfg.name, cfg.subset, split=cfg.split, streaming=cfg.streaming)
    if cfg.streaming:
        dataset = dataset.shuffle(seed=cfg.seed, buffer_size=SHUFFLE_BUFFER)
    else:
        dataset = dataset.shuffle(seed=cfg.seed)
    names = dataset.column_names  # None for some streamed datasets: then check the first row
    if names is not None and cfg.text_field not in names:
        raise _missing_field(cfg.text_field, names, f"dataset {cfg.name!r}")
    return _hub_texts(dataset, cfg)


def _hub_texts(dataset: Iterable[dict], cfg: DataConfig) -> Iterator[str]:
    for row in dataset:
        if cfg.text_field not in row:
            raise _missing_field(cfg.text_field, list(row), f"dataset {cfg.name!r}")
        text = row[cfg.text_field]
        if isinstance(text, str) and text.strip():
            yield text
