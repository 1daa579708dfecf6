"""Relevance feedback: the user's 👍 / 👎 on hits re-rank the search (Rocchio on the drawings' layout).

Each candidate place is read from its raster and drawn as one picture (worker.verify's drawing),
and described by the fine HOG layout of that drawing (worker.edge_cells, FINE), as the sketch is.
Rocchio (1971) moves the query towards what the user marked good and away from what they marked
bad: q' = ALPHA q + BETA mean(good) - GAMMA mean(bad), and the candidates are ranked by their
cosine with q' (blended with their first ranking, PRIOR_WEIGHT). The candidates are the search's
own best POOL places plus, for each place marked good, the best places of a search with that
place's drawing as the sketch ("more like this one"), so feedback can bring up places the sketch
alone ranked too low to see. Places marked bad are not returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wire.protocol import excerpt
from worker.errors import InputError
from worker.hit_ids import parse_hit_id, place_of
from worker.placement import Placement
from worker.tiling import RasterInfo

MAX_MARKS = 100  # ids per list
ALPHA, BETA, GAMMA = 1.0, 0.75, 0.5  # Rocchio's weights of the sketch, the good and the bad places
PRIOR_WEIGHT = 0.5  # the first ranking's share (z of -log rank) beside the Rocchio cosine's z
POOL = 50  # candidates of the sketch's own search that feedback re-ranks (at least 3 x top)
EXPANSIONS = 3  # good places whose own "more like this" search adds candidates
EXPANSION_TOP = 20  # candidates each of those adds
SAME_PLACE_IOU = 0.5  # a candidate overlapping a place marked bad this much is that place


@dataclass(frozen=True)
class Feedback:
    """Hit ids (worker.hit_ids) the user marked good and bad."""

    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, ids in (("positive", self.positive), ("negative", self.negative)):
            if not isinstance(ids, (list, tuple)) or not all(isinstance(i, str) for i in ids):
                shown = list(ids) if isinstance(ids, tuple) else ids  # as the client sent it: a list, not a tuple
                raise InputError(f"feedback {name} {excerpt(shown)} must be a list of hit ids (strings)")
            if len(ids) > MAX_MARKS:
                raise InputError(f"feedback {name} has {len(ids)} ids; at most {MAX_MARKS}")
        if not self.positive and not self.negative:
            raise InputError("feedback has no marks: mark at least one hit good (positive) or bad (negative), "
                             "or search without feedback")
        good = {place_of(i) for i in self.positive}
        both = [i for i in self.negative if place_of(i) in good]  # one place, its id written two ways too
        if both:
            raise InputError(f"feedback marks {excerpt(both[0])} both good and bad: choose one")
        # a place marked twice counts once: twice, it ran its "more like this" search twice, weighed
        # twice in the mean, and took a place of another good one among the EXPANSIONS (probe)
        object.__setattr__(self, "positive", _each_place_once(self.positive))
        object.__setattr__(self, "negative", _each_place_once(self.negative))

    @classmethod
    def from_json(cls, d: object) -> "Feedback":
        if not isinstance(d, dict) or set(d) - {"positive", "negative"}:
            raise InputError(f"feedback {excerpt(d)} must be an object with `positive` and/or `negative` lists of "
                             "hit ids")
        marks = {side: [] if d.get(side) is None else d[side] for side in ("positive", "negative")}
        for side, ids in marks.items():
            if not isinstance(ids, list):  # a string would be read as ids of one character
                raise InputError(f"feedback `{side}` {excerpt(ids)} must be a list of hit ids")
        return cls(tuple(marks["positive"]), tuple(marks["negative"]))

    def to_json(self) -> dict:
        return {"positive": list(self.positive), "negative": list(self.negative)}

    def places(self, rasters: dict[int, RasterInfo]) -> tuple[list[Placement], list[Placement]]:
        """The marked places in an index's rasters; InputError for an id the index does not hold."""
        return [parse_hit_id(i, rasters) for i in self.positive], [parse_hit_id(i, rasters) for i in self.negative]


def _each_place_once(ids: tuple[str, ...]) -> tuple[str, ...]:
    """`ids` less those naming a place an earlier one names (written the same or otherwise)."""
    first: dict[tuple | str, str] = {}
    for i in ids:
        first.setdefault(place_of(i), i)
    return tuple(first.values())


def rocchio_query(sketch: torch.Tensor, good: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """q' = ALPHA q + BETA mean(good) - GAMMA mean(bad), all unit descriptors."""
    query = ALPHA * sketch
    if len(good):
        query = query + BETA * good.mean(0)
    if len(bad):
        query = query - GAMMA * bad.mean(0)
    return query


def feedback_scores(candidates: torch.Tensor, query: torch.Tensor, prior_ranks: np.ndarray) -> np.ndarray:
    """Each candidate's new score: z of its cosine with the Rocchio query, plus PRIOR_WEIGHT z
    of its first ranking (-log rank, so the first places differ more than the fiftieth)."""
    from worker.candidates import standardise

    cosine = (candidates @ query).numpy() / max(float(query.norm()), 1e-9)
    return standardise(cosine) + PRIOR_WEIGHT * standardise(-np.log(prior_ranks))
