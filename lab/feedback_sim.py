"""A simulated user who marks hits 👍 / 👎 and refines (worker.query_search with worker.feedback).

Each round the user looks at the top 10 shown: every hit that overlaps the sketched place at all
(the place or its neighbours) is marked good, the best NEGATIVES hits that do not touch it are
marked bad; marks add up over rounds. The new list is what the product's search with those
marks returns. Beside it, the trivial baseline any feedback must beat: the first list with the
places marked bad removed ("drop bad").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lab.placements import iou
from worker.feedback import POOL, Feedback
from worker.hit_ids import hit_id
from worker.query_search import search_query
from worker.ranking import RankingConfig
from worker.sketch import prepare_sketch

SHOWN = 10
NEGATIVES = 3
CORRECT_IOU = 0.25  # as lab.bench_quality


@dataclass
class FeedbackOutcome:
    """Rank (1-based, None past the top 10) of the first correct hit at each stage."""

    ranks: dict[str, int | None] = field(default_factory=dict)


def first_correct(hits, query) -> int | None:
    truth = query.frame.pixel_polygon()
    for n, hit in enumerate(hits[:SHOWN], start=1):
        if hit.raster_path == query.frame.raster.path and iou(hit.footprint_pixels(), truth) >= CORRECT_IOU:
            return n
    return None


def marks(hits, query, good: set, bad: set) -> None:
    """The simulated user's marks on the shown hits, added to `good` and `bad`."""
    truth = query.frame.pixel_polygon()
    wrong = 0
    for hit in hits[:SHOWN]:
        touches = hit.raster_path == query.frame.raster.path and hit.footprint_pixels().intersects(truth)
        if touches:
            good.add(hit_id(hit.placement))
        elif wrong < NEGATIVES:
            bad.add(hit_id(hit.placement))
            wrong += 1
    bad -= good


def simulate(index, model, query, rounds: int = 2, ranking: RankingConfig | None = None) -> FeedbackOutcome:
    """Before, drop-bad and each round's rank of the truth for one query."""
    ranking = ranking or RankingConfig()
    sketch = prepare_sketch(query.image, model.img_size)
    first = search_query(index, model, sketch, ranking, top=POOL).hits
    out = FeedbackOutcome({"before": first_correct(first, query)})
    good: set = set()
    bad: set = set()
    marks(first, query, good, bad)
    dropped = [h for h in first if hit_id(h.placement) not in bad]
    out.ranks["drop bad"] = first_correct(dropped, query)
    shown = first
    for n in range(1, rounds + 1):
        if n > 1:
            marks(shown, query, good, bad)
        if not good and not bad:
            out.ranks[f"round {n}"] = first_correct(shown, query)
            continue
        shown = search_query(index, model, sketch, ranking, top=SHOWN,
                             feedback=Feedback(tuple(sorted(good)), tuple(sorted(bad)))).hits
        out.ranks[f"round {n}"] = first_correct(shown, query)
    return out
