"""Partial labels: each site annotates only some labels of a multi-label task.

An entry a site did not annotate is stored as ``-1``; ``ImageClassifier`` leaves it out of the loss and
lightning-fed's metrics ignore it, so a missing annotation is never read as "finding absent".
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

UNLABELLED = -1


def rotating_label_sets(num_sites: int, num_labels: int, labels_per_site: int) -> list[list[int]]:
    """Site ``k`` annotates ``labels_per_site`` consecutive labels starting at ``k * num_labels // num_sites``
    (wrapping round), so neighbouring sites overlap and every label is annotated somewhere when
    ``num_sites * labels_per_site >= num_labels``."""
    if not 1 <= labels_per_site <= num_labels:
        raise ValueError(f"labels_per_site must be in 1..{num_labels}, got {labels_per_site}")
    if num_sites * labels_per_site < num_labels:
        raise ValueError(
            f"{num_sites} sites x {labels_per_site} labels cannot cover {num_labels} labels: raise labels_per_site"
        )
    return [
        sorted({(k * num_labels // num_sites + j) % num_labels for j in range(labels_per_site)})
        for k in range(num_sites)
    ]


def check_label_sets(label_sets: Sequence[Sequence[int]], num_sites: int, num_labels: int) -> list[list[int]]:
    """Validate per-site annotated label lists; every label must be annotated by at least one site."""
    if len(label_sets) != num_sites:
        raise ValueError(
            f"annotated_labels has {len(label_sets)} entries for {num_sites} sites: give one list per site"
        )
    out = []
    for k, labels in enumerate(label_sets):
        bad = [label for label in labels if not 0 <= int(label) < num_labels]
        if bad or not labels:
            raise ValueError(f"annotated_labels[{k}] = {list(labels)}: every site needs labels in 0..{num_labels - 1}")
        out.append(sorted({int(label) for label in labels}))
    never = sorted(set(range(num_labels)) - {label for labels in out for label in labels})
    if never:
        raise ValueError(
            f"labels {never} are annotated by no site: nothing could learn them; add them to some site's annotated_labels"
        )
    return out


def mask_labels(targets: np.ndarray, annotated: Optional[Sequence[int]]) -> np.ndarray:
    """Multi-hot ``targets [N, L]`` with every label outside ``annotated`` set to ``-1`` (``None``: all annotated)."""
    out = np.asarray(targets).astype(np.int64).copy()
    if annotated is not None:
        keep = np.zeros(out.shape[1], dtype=bool)
        keep[list(annotated)] = True
        out[:, ~keep] = UNLABELLED
    return out
