"""`virnuc-ds plot OUT`: the original VirNucPro figure, and a histogram of the virus scores.

OUT/prediction.png (what the original's drew_fig.py draws): one panel per input sequence, the first
N sequences of the input (default 5). Every kept frame of every chunk is a horizontal segment over
the chunk's span of the sequence, at the height of the frame's higher score, red when the frame is
called virus, blue otherwise. Chunk spans are the real ones (the original's overlap schedule, from
OUT/prep/chunked.fa); without that file chunk k is drawn over [(k-1)L, kL).

OUT/score_histogram.png: the distribution of score2 (the virus probability) over all frames,
stacked by call (virus red, others blue), with the 0.5 decision line.

Drawn with matplotlib's Agg canvas (no display, no pyplot state); files are written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import InputError
from .fasta import read_fasta
from .prep.chunking import chunk_starts

RESULTS = "prediction_results.txt"
CHUNKED_FASTA = Path("prep") / "chunked.fa"
PREDICTION_PNG = "prediction.png"
HISTOGRAM_PNG = "score_histogram.png"
VIRUS_COLOR = "#d62728"  # red
OTHERS_COLOR = "#1f3fbf"  # blue
CHUNK_MARK = "_chunk_"


@dataclass
class SequenceScores:
    """The frames of one input sequence: chunk number (from 1), call, and the higher score."""

    id: str
    chunks: list[int] = field(default_factory=list)
    virus: list[bool] = field(default_factory=list)
    max_scores: list[float] = field(default_factory=list)


@dataclass
class Predictions:
    sequences: list[SequenceScores]  # the first N sequences, in input order
    virus_scores: np.ndarray  # score2 of every frame, float32 [F]
    is_virus: np.ndarray  # the call of every frame, bool [F]


def split_frame_id(frame_id: str) -> tuple[str, int]:
    """'contig_7_chunk_3F2' -> ('contig_7', 3): a frame id is `{sequence}_chunk_{k}` plus F/R and 1-3."""
    chunk_id = frame_id[:-2]
    sequence, mark, k = chunk_id.rpartition(CHUNK_MARK)
    if not mark or not k.isdigit():
        return chunk_id, 1
    return sequence, int(k)


def read_predictions(path: str | os.PathLike, n_sequences: int) -> Predictions:
    """Parse prediction_results.txt: all frames' scores, and the frames of the first N sequences."""
    sequences: dict[str, SequenceScores] = {}
    scores: list[float] = []
    calls: list[bool] = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            fields = line.rstrip("\n").split("\t")
            if lineno == 1 and fields[0] == "Sequence_ID":
                continue
            if len(fields) != 4:
                if line.strip():
                    raise InputError(path, f"line {lineno} has {len(fields)} tab-separated fields, expected 4")
                continue
            frame_id, label, s1, s2 = fields
            try:
                score1, score2 = float(s1), float(s2)
            except ValueError:
                raise InputError(path, f"line {lineno}: scores {s1!r}, {s2!r} are not numbers") from None
            virus = label == "virus"
            scores.append(score2)
            calls.append(virus)
            seq_id, chunk = split_frame_id(frame_id)
            entry = sequences.get(seq_id)
            if entry is None:
                if len(sequences) >= n_sequences:
                    continue
                entry = sequences[seq_id] = SequenceScores(seq_id)
            entry.chunks.append(chunk)
            entry.virus.append(virus)
            entry.max_scores.append(max(score1, score2))
    return Predictions(list(sequences.values()), np.asarray(scores, dtype=np.float32), np.asarray(calls, dtype=bool))


def sequence_length_from_chunks(lengths: list[int], chunk_length: int) -> int:
    """The input length n whose chunks (by the original's schedule) have these lengths."""
    if len(lengths) == 1:
        return lengths[0]
    m, L = len(lengths), chunk_length
    for n in range((m - 1) * L + 1, m * L + 1):
        starts = chunk_starts(n, L)
        if len(starts) == m and [min(L, n - s) for s in starts] == lengths:
            return n
    return (m - 1) * L + lengths[-1]  # not the original's schedule: lay the chunks end to end


def chunk_spans(prep_chunked: Path, wanted: set[str], chunk_length: int) -> dict[str, tuple[int, list[tuple[int, int]]]]:
    """{sequence id: (length, [(start, end) of chunk 1, 2, ...])} for the wanted sequences."""
    lengths: dict[str, list[int]] = {}
    if prep_chunked.is_file():
        for record in read_fasta(prep_chunked, check_duplicates=False, allow_empty_file=True):
            seq_id, _ = split_frame_id(record.id + "F1")
            if seq_id in wanted:
                lengths.setdefault(seq_id, []).append(len(record.sequence))
            elif lengths and len(lengths) == len(wanted):
                break  # chunked.fa is in input order: the wanted ones are behind us
    spans = {}
    for seq_id, chunk_lengths in lengths.items():
        n = sequence_length_from_chunks(chunk_lengths, chunk_length)
        starts = chunk_starts(n, chunk_length) if n > 0 else [0]
        if len(starts) != len(chunk_lengths):
            starts = list(np.cumsum([0] + chunk_lengths[:-1]))
        spans[seq_id] = (n, [(int(s), int(s) + c) for s, c in zip(starts, chunk_lengths)])
    return spans


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def draw_prediction_figure(preds: Predictions, spans: dict, chunk_length: int, path: Path) -> None:
    from matplotlib.lines import Line2D  # noqa: PLC0415
    from matplotlib.ticker import ScalarFormatter  # noqa: PLC0415

    rows = len(preds.sequences)
    fig = _new_figure(16, 1.9 * rows + 0.8)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    for ax, seq in zip(axes, preds.sequences):
        length, chunk_span = spans.get(seq.id, (None, None))
        for chunk, virus, score in zip(seq.chunks, seq.virus, seq.max_scores):
            if chunk_span and chunk <= len(chunk_span):
                x0, x1 = chunk_span[chunk - 1]
            else:
                x0, x1 = (chunk - 1) * chunk_length, chunk * chunk_length
            ax.plot([x0, x1], [score, score], color=VIRUS_COLOR if virus else OTHERS_COLOR, linewidth=2.5,
                    solid_capstyle="butt")
        n_virus = sum(seq.virus)
        ax.set_title(f"{seq.id}   ({length or '?'} bp, {max(seq.chunks)} chunk(s), {len(seq.chunks)} frames, "
                     f"{n_virus} called virus)", fontsize=12, loc="left")
        ax.set_ylim(0.45, 1.05)
        ax.set_xlim(0, length or max(seq.chunks) * chunk_length)
        ax.set_ylabel("max score", color="dimgray")
        ax.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.tick_params(colors="dimgray")
    axes[-1].set_xlabel("position in the sequence (bp)", color="dimgray")
    legend = [Line2D([], [], color=VIRUS_COLOR, lw=2.5, label="virus"),
              Line2D([], [], color=OTHERS_COLOR, lw=2.5, label="others")]
    axes[0].legend(handles=legend, loc="lower right", frameon=False, ncol=2)
    fig.tight_layout()
    _save(fig, path)


def draw_score_histogram(preds: Predictions, path: Path) -> None:
    fig = _new_figure(8, 4.5)
    ax = fig.subplots()
    bins = np.linspace(0.0, 1.0, 51)
    virus, others = preds.virus_scores[preds.is_virus], preds.virus_scores[~preds.is_virus]
    ax.hist([others, virus], bins=bins, stacked=True, color=[OTHERS_COLOR, VIRUS_COLOR],
            label=[f"others ({len(others):,})", f"virus ({len(virus):,})"])
    ax.axvline(0.5, color="dimgray", linestyle="--", linewidth=1)
    ax.set_xlabel("score2 (virus probability) per frame")
    ax.set_ylabel("frames")
    ax.set_title(f"{len(preds.virus_scores):,} frames")
    ax.legend(frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    _save(fig, path)


def plot_run(output_dir: str | os.PathLike, n_sequences: int = 5) -> tuple[Path, Path, Predictions]:
    """Write OUT/prediction.png and OUT/score_histogram.png; returns their paths and what was drawn."""
    out = Path(output_dir)
    if n_sequences < 1:
        raise InputError(out, f"--sequences {n_sequences}: draw at least 1 sequence")
    if not out.is_dir():
        raise InputError(out, "no such folder")
    results = out / RESULTS
    if not results.is_file():
        raise InputError(out, f"no {RESULTS}: nothing to plot (a run with a classifier writes it)")
    preds = read_predictions(results, n_sequences)
    if not preds.sequences:
        raise InputError(results, "has no predictions to plot")
    from .report import manifest_facts  # noqa: PLC0415

    chunk_length = int(manifest_facts(out).get("expected_length") or 500)
    spans = chunk_spans(out / CHUNKED_FASTA, {s.id for s in preds.sequences}, chunk_length)
    draw_prediction_figure(preds, spans, chunk_length, out / PREDICTION_PNG)
    draw_score_histogram(preds, out / HISTOGRAM_PNG)
    return out / PREDICTION_PNG, out / HISTOGRAM_PNG, preds


def cmd_plot(args) -> int:
    figure, histogram, preds = plot_run(args.output_dir, args.sequences)
    print(f"wrote {figure} ({len(preds.sequences)} sequence(s)) and {histogram} ({len(preds.virus_scores):,} frames)")
    return 0
