"""What an algorithm costs, declared beside it (cubed's habit): passes over the input,
the rows a block needs, and the block-sized and ``n × n`` arrays it holds. Each algorithm
module exports a ``*_cost`` function building one from its options and the input's
shape; :mod:`pipeline.memory` predicts a worker's peak from it and :mod:`pipeline.plan`
lays out the blocks by it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Fan-in of the reduction trees of small factors (TSQR's R factors): a tree node stacks
# this many children (pipeline.linalg.tsqr's default split_every).
TREE_FAN_IN = 16


@dataclass(frozen=True)
class Cost:
    """What an algorithm costs on an input of a given shape, declared beside it.

    Attributes
    ----------
    passes : passes over the input (an upper bound when ``exact`` is false: NMF stops
        when it converges, rsvd may add a direct residual pass)
    exact : whether ``passes`` is exact
    columns : columns of the matrix the method factorizes (the input's, or its transpose's)
    min_rows : rows a row block needs (what its local factorization needs)
    buffers : block-sized arrays a running task holds at once, the block included
    keeps : whether the input is kept in memory between passes when it fits
    state_columns : float64 columns of tall state kept with each row block between
        passes (rsvd's sketches, NMF's ``W``)
    block_squares : ``columns × columns`` arrays kept per row block (TSQR's factors)
    node_squares : ``columns × columns`` arrays a reduction-tree node holds per child
    output_blocks : block-sized results per block of the last pass (TSQR's ``Q``),
        computed faster than they are written: a worker holds those of all its kept
        blocks, or of its running and next tasks when the input is streamed
    transpose : the method factorizes the input's transpose
    layouts : copies of the input it keeps when it keeps it (ALS keeps its ratings by
        users and by items: 2)
    """

    passes: int
    exact: bool
    columns: int
    min_rows: int
    buffers: int
    keeps: bool
    state_columns: int = 0
    block_squares: int = 0
    node_squares: int = 0
    output_blocks: int = 0
    transpose: bool = False
    layouts: int = 1

    def describe_passes(self) -> str:
        """``"3"``, or ``"up to 208"`` for an upper bound."""
        return str(self.passes) if self.exact else f"up to {self.passes}"
