"""Atomic checkpoints without pickle: Equinox-serialised leaves plus one JSON header.

A checkpoint is a folder:

```
path/
  checkpoint.json   # format, model class + hyperparameters, which files, metadata
  model.eqx         # eqx.tree_serialise_leaves(model)
  opt_state.eqx     # optional: the optimizer state
  best_model.eqx    # optional (written by `fit`): the best model so far
```

It is written to a temporary sibling folder, every file flushed to disk, and then
moved into place with `os.replace`. The previous checkpoint is first renamed to
`path.old` and deleted only once the new one is in place, so a crash at any moment
leaves one complete checkpoint: `path` or, between the two renames, `path.old`, which
`load_checkpoint` falls back to.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax

FORMAT = "ctmodels-checkpoint"
VERSION = 1
HEADER = "checkpoint.json"
# the folder `fit` writes inside its `checkpoint_dir`
FIT_SUBDIR = "checkpoint"


# ------------------------------------------------------------------ JSON helpers


def jsonable(x: Any, where: str) -> Any:
    """Tuples to lists, NumPy/JAX scalars to Python; raise on anything else."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (tuple, list)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise ValueError(
                    f"{where} has a non-string key {k!r}; checkpoint metadata must be "
                    "JSON: use string keys."
                )
            out[k] = jsonable(v, f"{where}[{k!r}]")
        return out
    if hasattr(x, "dtype") and getattr(x, "shape", None) == ():  # numpy/jax scalar
        return x.item()
    if hasattr(x, "dtype") and hasattr(x, "tolist"):  # small numpy/jax array
        return jsonable(x.tolist(), where)
    raise ValueError(
        f"{where} = {x!r} (type {type(x).__name__}) is not JSON-serialisable. "
        "Checkpoints store metadata and model hyperparameters as JSON (no pickle): "
        "use numbers, strings, booleans, None, lists/tuples and string-keyed dicts."
    )


def _tuplify(x: Any) -> Any:
    """Undo JSON's tuple -> list (static fields must stay hashable)."""
    if isinstance(x, list):
        return tuple(_tuplify(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuplify(v) for k, v in x.items()}
    return x


def model_description(model: Any) -> dict[str, Any]:
    """Class name, module and JSON hyperparameters (None if the model has none)."""
    cls = type(model)
    hp = getattr(model, "hyperparameters", None)
    if hp is not None:
        try:
            hp = dict(hp)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{cls.__name__}.hyperparameters must be a tuple of (name, value) "
                f"pairs, got {hp!r}."
            ) from e
        hp = [
            [k, v] for k, v in jsonable(hp, f"{cls.__name__}.hyperparameters").items()
        ]
    return {
        "model_class": cls.__name__,
        "model_module": cls.__module__,
        "hyperparameters": hp,
    }


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True, allow_nan=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically (temporary file + `os.replace`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


# ------------------------------------------------------------------ writing


def write_checkpoint(
    path: str | os.PathLike,
    trees: Mapping[str, Any],
    header: dict[str, Any],
) -> Path:
    """Atomically write `trees` (name -> pytree, None entries skipped) and `header`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # leftovers of an earlier crash mid-write
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        files = {}
        for name, tree in trees.items():
            if tree is None:
                continue
            fname = f"{name}.eqx"
            with open(tmp / fname, "wb") as f:
                eqx.tree_serialise_leaves(f, tree)
                f.flush()
                os.fsync(f.fileno())
            files[name] = fname
        _write_json(
            tmp / HEADER,
            {"format": FORMAT, "version": VERSION, "files": files, **header},
        )
        _fsync_dir(tmp)
        old = _old(path)
        if (path / HEADER).exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        elif path.exists():  # an incomplete folder that is not a checkpoint
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(_old(path), ignore_errors=True)
    _fsync_dir(path.parent)
    return path


def save_checkpoint(
    path: str | os.PathLike,
    model: eqx.Module,
    *,
    opt_state: Any = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save a model (and optionally an optimizer state) to a checkpoint folder.

    Arrays are written with `equinox.tree_serialise_leaves`; the model's class name,
    its `hyperparameters` (the JSON-serialisable constructor arguments that models
    keep as a static field, if it has one) and `metadata` go to `checkpoint.json`. No
    pickle is used. The write is atomic: a crash leaves either the previous
    checkpoint or the new one, never a mix.

    **Arguments:**

    - `path`: the checkpoint folder (created; an existing checkpoint there is
      replaced).
    - `model`: an `equinox.Module`.
    - `opt_state`: an optimizer state to store with it (load it back with
      `load_checkpoint(..., which="opt_state", like=optimizer.init(...))`).
    - `metadata`: a JSON-serialisable dict (e.g. normalisation statistics).

    **Returns:** the checkpoint folder as a `pathlib.Path`.
    """
    header = {
        **model_description(model),
        "default": "model",
        "metadata": jsonable(metadata or {}, "metadata"),
    }
    return write_checkpoint(path, {"model": model, "opt_state": opt_state}, header)


# ------------------------------------------------------------------ reading


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """The complete checkpoint folder at `path` (or in `path/checkpoint`, the folder
    `fit` writes), falling back to the `.old` copy left by a crash mid-replace."""
    path = Path(path)
    for cand in (path, path / FIT_SUBDIR):
        if (cand / HEADER).is_file():
            return cand
        if (_old(cand) / HEADER).is_file():
            return _old(cand)
    return None


def read_header(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    where = resolve_checkpoint(path)
    if where is None:
        raise FileNotFoundError(
            f"No checkpoint at {os.fspath(path)!r} (expected a folder with "
            f"{HEADER}, written by `ctmodels fit --out`, save_checkpoint or "
            "fit(checkpoint_dir=...))."
        )
    try:
        with open(where / HEADER, encoding="utf-8") as f:
            header = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{where / HEADER} is damaged (not valid JSON: {e}); it was cut short "
            "or edited. Use another copy of the checkpoint."
        ) from e
    if header.get("format") != FORMAT:
        raise ValueError(f"{where / HEADER} is not a ctmodels checkpoint.")
    if header.get("version", 0) > VERSION:
        raise ValueError(
            f"Checkpoint {where} has format version {header['version']}; this "
            f"ctmodels reads up to version {VERSION}. Upgrade ctmodels."
        )
    return where, header


def read_tree(where: Path, header: dict, name: str, like: Any) -> Any:
    files = header.get("files", {})
    if name not in files:
        raise ValueError(
            f"Checkpoint {where} has no {name!r} (it holds {sorted(files)})."
        )
    try:
        return eqx.tree_deserialise_leaves(where / files[name], like)
    except Exception as e:  # structure / shape / dtype mismatch, or a damaged file
        raise ValueError(
            f"Could not load {name!r} from checkpoint {where} "
            f"({files[name]}): it does not match the structure given, or the file is "
            f"damaged ({type(e).__name__}: {e}). If the file is intact, build the "
            "model with the same class and hyperparameters as the saved one; if it "
            "was cut short (e.g. copied while being written), use another copy."
        ) from e


def _model_class(
    header: dict,
    model_class: type | None,
    model_classes: Mapping[str, type] | None,
) -> type:
    name = header.get("model_class")
    if model_class is not None:
        if model_class.__name__ != name:
            raise ValueError(
                f"The checkpoint holds a {name!r} model, not a "
                f"{model_class.__name__!r}. Pass the right model_class (or like=)."
            )
        return model_class
    mapping: dict[str, type] = dict(model_classes or {})
    if name not in mapping:  # the model catalogue (ctmodels' models and users')
        from .._catalog import registered

        mapping.update({k: v for k, v in registered().items() if k not in mapping})
    if name not in mapping:
        raise ValueError(
            f"The checkpoint holds a model of class {name!r} (module "
            f"{header.get('model_module')!r}), which is not in the model catalogue. "
            f"Register it (ctmodels.models.register({name})), or pass "
            f"model_class={name}, model_classes={{{name!r}: {name}}}, or "
            "like=<a model of the same structure>."
        )
    return mapping[name]


def load_checkpoint(
    path: str | os.PathLike,
    *,
    like: Any = None,
    model_class: type | None = None,
    model_classes: Mapping[str, type] | None = None,
    which: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Load a model saved by `save_checkpoint` or by `fit(checkpoint_dir=...)`.

    Without `like`, the model is rebuilt as
    `cls(**hyperparameters, key=jax.random.key(0))` from the hyperparameters stored in
    the checkpoint and then filled with the saved arrays; the class is looked up by
    name in `model_class`, `model_classes`, or the model catalogue
    (`ctmodels.models.register`: ctmodels' models and those users registered).

    **Arguments:**

    - `path`: a checkpoint folder, or a `fit` `checkpoint_dir` (its `checkpoint/`
      subfolder is used).
    - `like`: a pytree of the same structure, shapes and dtypes as the saved one (for
      example a freshly built model, or `optimizer.init(params)` with
      `which="opt_state"`); it is filled with the saved arrays.
    - `model_class`: the class to rebuild (must match the saved class name).
    - `model_classes`: a mapping name -> class to look the saved class name up in.
    - `which`: what to load: `"model"`, `"best_model"` (written by `fit` when
      validating) or `"opt_state"` (needs `like`). Default: what `fit` returned for
      a `fit` checkpoint (the best model when it validated and `restore_best`), else
      `"model"`.

    **Returns:** `(model, metadata)`: the loaded pytree and the metadata dict (for a
    `fit` checkpoint: `fit` configuration, progress, early-stopping state, history
    rows and `extra_state`).
    """
    where, header = read_header(path)
    which = header.get("default", "model") if which is None else which
    if which not in header.get("files", {}):
        raise ValueError(
            f"Checkpoint {where} has no {which!r}; it holds "
            f"{sorted(header.get('files', {}))}."
        )
    if like is None:
        if which == "opt_state":
            raise ValueError(
                "Loading an optimizer state needs like=optimizer.init(params) (its "
                "structure is not stored)."
            )
        cls = _model_class(header, model_class, model_classes)
        hp = header.get("hyperparameters")
        if hp is None:
            raise ValueError(
                f"The checkpoint's {header.get('model_class')!r} model stored no "
                "hyperparameters, so it cannot be rebuilt: pass like=<a model of the "
                "same structure>."
            )
        kwargs = {k: _tuplify(v) for k, v in hp}
        try:
            like = eqx.filter_eval_shape(lambda: cls(**kwargs, key=jax.random.key(0)))
        except Exception as e:
            raise ValueError(
                f"Could not rebuild {cls.__name__}(**{kwargs!r}, key=...) from the "
                f"checkpoint's hyperparameters: {type(e).__name__}: {e}"
            ) from e
        # static (non-array) leaves come from the shape-only build; arrays are loaded
    out = read_tree(where, header, which, like)
    return out, header.get("metadata", {})


def checkpoint_fingerprint(path: str | os.PathLike) -> str | None:
    """The SHA-256 of the checkpoint header at `path` (a checkpoint folder or a `fit`
    `checkpoint_dir`; None if there is none): it changes with every save, so it
    names one checkpoint exactly (files written next to a checkpoint record it)."""
    import hashlib

    where = resolve_checkpoint(path)
    if where is None:
        return None
    return hashlib.sha256((where / HEADER).read_bytes()).hexdigest()
