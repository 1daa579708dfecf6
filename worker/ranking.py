"""How a search ranks: the settings a caller passes to worker.search (none live in the model)."""

from __future__ import annotations

from dataclasses import dataclass

from worker.errors import InputError

RANKERS = ("layout", "tokens")


@dataclass(frozen=True)
class RankingConfig:
    """How a search ranks (passed in by the caller; the model holds no ranking settings)."""

    ranker: str = "layout"
    # Template sides in level px: four per octave of the index's scales (windows 1.14-1.25x
    # apart). Held-out recall@5/10 with 160 and 224 alone, then these four: 0.689/0.739 ->
    # 0.708/0.764 (750 queries, seed 2, where it was chosen), 0.693/0.735 -> 0.705/0.760 (seed
    # 0, the reported set). Median query 517 -> 749 ms on that 577-tile index, about a quarter
    # more on the demo index, no measurable change end to end at 1M tiles
    # (docs/benchmarks/quality.md, speed.md). 160, 192, 224 gained nothing.
    sizes: tuple[int, ...] = (160, 192, 224, 256)
    angles: tuple[float, ...] = (-10.0, 0.0, 10.0)  # turns tried, degrees counterclockwise
    shortlist: int = 200  # candidates re-ranked: coarse local peaks ("layout"), or global-token nearest tiles
    fine_radius: int = 2  # fine search +- stored cells (8 level px each) around a coarse peak
    # The aligned cross-attention token score (the paper's modules) is blended into the best
    # `token_candidates` placements with this weight (each score standardised over the
    # placements it was computed for). Off by default: on the benchmark's held-out scenes it
    # changed recall@5 by less than its noise at weights 0.2-1.0 (docs/benchmarks/quality.md)
    # and costs a ViT pass per query.
    token_weight: float = 0.0
    token_candidates: int = 32
    calibrate: bool = True  # scores as z-values against each template's own background (coarse_peaks)
    # The best `verify` placements are read from their rasters and drawn as one picture each, as
    # the user saw the place, and compared with the sketch again (see `verify`). 12, not 24: on
    # 500 held-out queries (2 seeds) recall@5/10 were 0.68/0.74 with 12 and 0.67/0.74 with 24,
    # and a search took 100 ms less (356 -> 256 ms p50). They are mostly one place a little
    # moved, scaled or turned (about 7 distinct places of 12), so a search's hits below them are
    # not verified, and have no score (worker.search). Verifying the next distinct places too,
    # until 10 were, cost 18-75 ms a search (p50, demo index) for recall@1/5/10 0.735/0.800/0.847
    # -> 0.736/0.803/0.841 (750 held-out queries, seed 0); the 12 as the first distinct places
    # and the best others, 0.731/0.793/0.839 (docs/benchmarks/quality.md). Neither was adopted.
    verify: int = 12
    # The best `tile_windows` tiles under the coarse shortlist, scored by their own drawings, join
    # the candidates and the verification (worker.tile_windows); 0: none.
    tile_windows: int = 8
    # The best `tile_window_pool` coarse peaks (more than are refined) say which tiles may become
    # tile windows: a sparse sketch's coarse score is weak, and the tile it was drawn on was often
    # under no peak of the best 200 (13 of 150 aligned held-out queries, seed 2). On 750 held-out
    # queries (seed 2), 200 -> 800: recall@5 0.649 -> 0.667 (16 gained, 3 lost), aligned 0.85 ->
    # 0.93; median query 379 -> 482 ms on that 577-tile index. 400: recall@5 0.665, aligned 0.91.
    tile_window_pool: int = 800
    verify_weight: float = 1.0
    coarse_weight: float = 0.5  # the coarse z-score's share in the fine stage's ranking
    # compare windows and drawn places only where the sketch has lines (edge_cells.cosine_map,
    # verify.drawing_cosine)
    inked_only: bool = True
    # The approximate shortlist (worker.ann): "auto" asks it first for indexes that have one built
    # and hold at least worker.ann.AUTO_MIN_TILES tiles; "on" whenever one is built; "off" never.
    ann: str = "auto"
    # windows asked of the ANN index per query vector, re-ranked (worker.ann): 64 held 0.34 of the
    # exact best 200 windows, 512 0.95 (450k synthetic windows); at 1M tiles 512 held 0.89 and
    # 1024 0.92 (with 128 lists visited), for 14 ms more
    ann_neighbours: int = 1024
    ann_windows: int = 256  # best distinct windows scanned exactly

    def __post_init__(self) -> None:
        if self.ranker not in RANKERS:
            raise InputError(f"ranker {self.ranker!r} must be one of {', '.join(RANKERS)}")
        if not self.token_weight >= 0:  # NaN too
            raise InputError(f"token weight {self.token_weight} must be 0 or more")
        if self.ranker == "tokens" and self.token_weight:  # was dropped, unsaid: that ranker has no blend
            raise InputError(f"token weight {self.token_weight} blends the token score into the layout ranker; "
                             "the tokens ranker ranks by the tokens alone: give one or the other")
        if self.ann not in ("auto", "on", "off"):
            raise InputError(f"ann {self.ann!r} must be auto, on or off")
        if self.shortlist < 1:
            raise InputError(f"shortlist {self.shortlist} must be at least 1")

    @property
    def uses_tokens(self) -> bool:
        """Whether a query needs the sketch's ViT tokens (the expensive part of a query on a CPU)."""
        return self.ranker == "tokens" or self.token_weight > 0
