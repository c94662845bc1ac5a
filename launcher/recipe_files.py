"""Reading recipe YAML files, their bases and overrides, for launcher/recipe.py's `load_recipe`.

A recipe is merged in this order: its `extends:` base (recursively, a path relative to the
recipe's own directory), the file itself, then `key=value` overrides. `layers` yields each of
those sources in that order and `merge` folds one into the config, so that every mistake (a
missing file, a YAML syntax error, an `extends:` loop, an unknown key, a wrong type, a bad
override) is one paragraph naming the file or the override that caused it. The schema the
messages list keys from is passed in: this module never imports recipe.py (recipe.py imports it).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from launcher.errors import RecipeError


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"Recipe file {path} does not exist. Check the path (it is relative to the current directory).")
    try:
        data = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: YAML syntax error{where}: {problem}. Fix the YAML at that position.") from None
    if not isinstance(data, DictConfig):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of sections (model:, data:, train:, ...), not a list or a scalar.")
    return data


def _keys_at(schema: type, dotted: str) -> List[str]:
    """The valid keys of the schema section at a dotted path ('' for the top level)."""
    node = OmegaConf.structured(schema)
    node = OmegaConf.select(node, dotted) if dotted else node
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _unknown_key_message(schema: type, source: str, full_key: str) -> str:
    parent, _, leaf = full_key.rpartition(".")
    valid = _keys_at(schema, parent)
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f" Did you mean `{parent + '.' if parent else ''}{close[0]}`?" if close else ""
    where = f"`{parent}`" if parent else "the top level"
    listing = f" Valid keys in {where}: {', '.join(valid)}." if valid else f" {where} takes no settings yet."
    return f"{source}: unknown key `{full_key}`.{hint}{listing}"


def type_message(source: str, e: oc_errors.OmegaConfBaseException) -> str:
    key = str(getattr(e, "full_key", "") or "?")
    msg = str(getattr(e, "msg", e)).splitlines()[0]
    return f"{source}: wrong type for `{key}`: {msg}. Give `{key}` a value of the type its default has (see recipes/quickstart.yaml)."


def merge(base: DictConfig, other: DictConfig, source: str, schema: type) -> DictConfig:
    """`base` with `other` merged over it; `schema`: the dataclass `base` was structured from."""
    try:
        return OmegaConf.merge(base, other)
    except oc_errors.ConfigKeyError as e:
        raise RecipeError(_unknown_key_message(schema, source, str(e.full_key))) from None
    except oc_errors.ValidationError as e:
        raise RecipeError(type_message(source, e)) from None


def _load_with_bases(path: Path, seen: List[Path]) -> List[tuple]:
    """[(source name, config)] from the deepest base to this file."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + [path])
        raise RecipeError(f"Recipe `extends:` loop: {chain}. Remove one of the `extends:` lines.")
    data = _read_yaml(path)
    base = data.pop("extends", None) if "extends" in data else None
    layers = []
    if base is not None:
        if not isinstance(base, str):
            raise RecipeError(f"{path}: `extends` must be the path of a base recipe (a string).")
        target = path.parent / base
        if not target.is_file():
            raise RecipeError(
                f"{path}: `extends: {base}` names {target.resolve()}, which does not exist. A relative `extends` path is "
                f"relative to the recipe's own directory ({path.parent}), not to the current directory; fix the path."
            )
        layers = _load_with_bases(target, seen + [path])
    return layers + [(str(path), data)]


def layers(path: Path, overrides: Optional[List[str]]) -> Iterator[tuple]:
    """(source name, config) for the recipe's bases (deepest first), the file itself, then each override.
    Every file is read before the first is yielded; each override is parsed only when its turn comes,
    so a mistake earlier in the order is the one reported."""
    yield from _load_with_bases(path, [])
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"Override `{item}` is not of the form key=value (e.g. train.max_steps=40).")
        try:
            dot = OmegaConf.from_dotlist([item])
        except Exception as e:  # omegaconf raises several types for bad dotlists
            raise RecipeError(f"Override `{item}` could not be parsed: {e}.") from None
        yield f"override `{item}`", dot
