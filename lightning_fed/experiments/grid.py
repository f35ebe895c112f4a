"""The grid of a ``lightning-fed sweep``: ``--grid``/``--zip`` axes parsed into points, and each point turned into the
recipe overrides (dotted command-line arguments) that train it.

A point maps grid keys to values in axis order, e.g. ``{"model.init_args.lr": 0.01, "data.init_args.sizes[0]": 3000}``;
a key may index a list of the recipe (``key[0]``, ``key[1:]``). Nothing here trains or imports Lightning.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any, Mapping, Sequence

import yaml

Point = dict[str, Any]  # grid key -> value (a YAML value: number, string, list, dict, None)

_INDEXED = re.compile(r"^(?P<key>[^\[\]]+)\[(?P<index>-?\d*(?::-?\d*)?)\]$")


def split_values(text: str) -> list[Any]:
    """``"0.1,0.2,[1,2]"`` -> ``[0.1, 0.2, [1, 2]]``: commas inside brackets or quotes do not split; YAML values."""
    parts, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    if any(not p.strip() for p in parts):
        raise ValueError(f"empty value in {text!r}: give comma-separated values, e.g. key=0.1,0.2")
    return [yaml.safe_load(p.strip()) for p in parts]


def parse_axis(spec: str) -> tuple[str, list[Any]]:
    """``"key=v1,v2"`` -> ``("key", [v1, v2])``; the key may index a list: ``key[0]`` or ``key[1:]``."""
    key, sep, values = spec.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"grid axis {spec!r} must look like KEY=V1,V2,... (e.g. trainer.max_epochs=5,10)")
    return key.strip(), split_values(values)


def expand_grid(grid: Sequence[str] = (), zipped: Sequence[str] = ()) -> list[Point]:
    """Every combination of the ``grid`` axes (a product), each crossed with the ``zipped`` axes, which vary
    together (equal lengths). Each point maps keys to values, in axis order."""
    axes = [parse_axis(a) for a in grid]
    zips = [parse_axis(a) for a in zipped]
    keys = [k for k, _ in axes] + [k for k, _ in zips]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"grid key(s) {dupes} given twice: give each key once")
    if zips and len({len(v) for _, v in zips}) != 1:
        raise ValueError(f"--zip axes must have the same number of values, got {[f'{k}: {len(v)}' for k, v in zips]}")
    zipped_points = [dict(zip([k for k, _ in zips], vals)) for vals in zip(*[v for _, v in zips])] if zips else [{}]
    points = []
    for combo in itertools.product(*[v for _, v in axes]):
        for extra in zipped_points:
            points.append({**dict(zip([k for k, _ in axes], combo)), **extra})
    return points


def lookup(config: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted ``key`` of a nested recipe dict; ``KeyError(key)`` when a part is missing."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def point_arguments(point: Point, base: Mapping[str, Any]) -> list[str]:
    """Recipe overrides for one grid point, as dotted command-line arguments. ``key[i]``/``key[a:b]`` set elements
    of the recipe's list at ``key`` (a slice gets the one value in every position)."""
    values: dict[str, Any] = {}
    for raw, value in point.items():
        match = _INDEXED.match(raw)
        if match is None:
            values[raw] = value
            continue
        key, index = match["key"], match["index"]
        if key not in values:
            try:
                values[key] = list(lookup(base, key))
            except (KeyError, TypeError):
                raise ValueError(f"grid key {raw!r}: the recipe has no list at {key!r} to index") from None
        target = values[key]
        try:
            if ":" in index:
                start, _, stop = index.partition(":")
                span = range(len(target))[slice(int(start) if start else None, int(stop) if stop else None)]
                if not span:
                    raise IndexError
                for i in span:
                    target[i] = value
            else:
                target[int(index)] = value
        except IndexError:
            raise ValueError(f"grid key {raw!r}: index out of range for {key!r} (length {len(target)})") from None
    # a string goes as it was given (YAML read it as a string, and reads it back so); quoted, a str-typed option
    # such as compression or aggregator would keep the quotes
    return [f"--{k}={v if isinstance(v, str) and yaml.safe_load(v) == v else json.dumps(v)}" for k, v in values.items()]


def point_label(point: Point) -> str:
    """A grid point as ``key=value, ...`` for progress lines (``recipe``: the recipe as written)."""
    return ", ".join(f"{short_key(k)}={v}" for k, v in point.items()) or "recipe"


def short_key(key: str) -> str:
    """A recipe key without its ``init_args.`` parts: ``model.init_args.lr`` -> ``model.lr``."""
    return key.replace("init_args.", "")
