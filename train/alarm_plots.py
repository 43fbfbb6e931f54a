"""Pictures of alarm scoring a clinician can read: a timeline per record, an ECG strip per miss and false alarm."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from pipeline.alarms.rules import ALARM_TYPES
from train.alarm_score import MIN_EVENT_S, SCORED_PRIORITY, Episode, score_type

if TYPE_CHECKING:
    from train.alarm_eval import RecordAlarms
    from train.icu_alarms import IcuAlarm

PRIORITY_COLOUR = {"high": "tab:red", "medium": "tab:orange", "low": "tab:olive"}
RHYTHM_COLOUR = {"N": "tab:green", "VF": "tab:red", "VT": "tab:purple", "AF": "tab:blue", "AFL": "tab:cyan"}
STRIP_S = 20.0  # strip length (s)
ICU_STRIP_S = 30.0  # ICU alarm strips: the last seconds of the record, up to the monitor's alarm (s)
BEAT_COLOUR = {"N": "tab:green", "S": "tab:blue", "V": "tab:red", "F": "tab:purple", "Q": "tab:grey"}
MAX_STRIPS = 60  # per run, the first ones in record order


def fresh_folder(out_dir: Path) -> None:
    """`out_dir`, made if missing, without the pictures of an earlier run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()


def save_small(fig: Figure, path: Path, dpi: int) -> None:
    """Write `fig` at `dpi` as a PNG of 16 colours (hundreds of strips live in the repository)."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    Image.open(png).convert("RGB").quantize(16).save(path, optimize=True)
    plt.close(fig)


def plot_timelines(results: list[RecordAlarms], out_dir: Path) -> None:
    """One PNG per record: reference rhythm, beat-derived reference events, alarms (by priority), minutes."""
    fresh_folder(out_dir)
    for r in results:
        rows = sorted({a.label for a in r.alarms} | {e.label for e in r.references if e.label in ALARM_TYPES})
        fig, ax = plt.subplots(figsize=(12, 1.2 + 0.3 * (len(rows) + 1)))
        for e in r.rhythm:
            ax.barh(0, e.duration_s / 60, left=e.start / 60, color=RHYTHM_COLOUR.get(e.label, "lightgrey"), height=0.8)
            if e.duration_s > r.duration_s / 60:
                ax.text((e.start + e.duration_s / 2) / 60, 0, e.label, ha="center", va="center", fontsize=7)
        for i, label in enumerate(rows, start=1):
            for e in r.references:
                if e.label == label:
                    ax.barh(i + 0.25, max(e.duration_s, 1.0) / 60, left=e.start / 60, color="black", height=0.25)
            for a in r.alarms:
                if a.label == label:
                    colour = PRIORITY_COLOUR[SCORED_PRIORITY.get(label) or ALARM_TYPES[label][1]]
                    ax.barh(i - 0.1, max(a.duration_s, 1.0) / 60, left=a.start / 60, color=colour, height=0.4)
        ax.set_yticks(range(len(rows) + 1), ["rhythm (reference)", *rows], fontsize=7)
        ax.set_xlim(0, r.duration_s / 60)
        ax.set_xlabel("minutes (black: reference event; colour: alarm, red high, orange medium, olive low priority)")
        ax.set_title(r.name, fontsize=9)
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out_dir / f"{r.name.replace('/', '-')}.png", dpi=100)
        plt.close(fig)


def _strip(r: RecordAlarms, episode: Episode, what: str, path: Path) -> None:
    fs = r.record.fs
    a = max(0.0, episode.start - STRIP_S / 2)
    b = min(r.duration_s, a + STRIP_S)
    samples = r.record.signal_mv[round(a * fs):round(b * fs)]
    t = a + np.arange(len(samples)) / fs
    fig, ax = plt.subplots(figsize=(12, 2.6))
    ax.plot(t, samples, lw=0.6, color="black")
    ax.axvline(episode.start, color="tab:red", lw=1)
    beats = (r.record.beat_samples >= a * fs) & (r.record.beat_samples < b * fs)
    for s, c in zip(r.record.beat_samples[beats], r.record.beat_classes[beats], strict=True):
        ax.text(s / fs, ax.get_ylim()[1], c, fontsize=6, ha="center", va="top")
    ax.set_xlabel("s (reference beat classes on top; red line: onset)")
    ax.set_ylabel("mV")
    ax.set_title(f"{r.name}: {what} at {episode.start:.1f} s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_strips(results: list[RecordAlarms], out_dir: Path) -> None:
    """ECG strips around each missed high-priority event and each false high-priority alarm (first MAX_STRIPS)."""
    fresh_folder(out_dir)
    high = [t for t, priority in SCORED_PRIORITY.items() if priority == "high"]
    made = 0
    for r in results:
        for t in high:
            s = score_type(t, r.alarms, r.references, r.rhythm, MIN_EVENT_S.get(t, 0.0))
            for kind, episodes in (("missed", s.missed), ("false", s.false)):
                for e in episodes:
                    if made >= MAX_STRIPS:
                        return
                    name = f"{r.name.replace('/', '-')}-{kind}-{t}-{e.start:.0f}s.png"
                    _strip(r, e, f"{kind} {t}", out_dir / name)
                    made += 1


def plot_icu_strips(results: list[IcuAlarm], out_dir: Path) -> None:
    """One PNG per Challenge record: its last ICU_STRIP_S, every lead, the daemon's beats by class, the daemon's
    high-priority alarms shaded, the decision window (`icu_alarms.DECISION_S`) marked."""
    from train.icu_alarms import COUNTS_AS, DECISION_S

    fresh_folder(out_dir)
    for r in results:
        fs, end_s = r.record.fs, r.record.signals_mv.shape[1] / r.record.fs
        a = max(0.0, end_s - ICU_STRIP_S)
        n_leads = len(r.record.sig_names)
        fig, axes = plt.subplots(n_leads, 1, figsize=(12, 1.0 + 1.3 * n_leads), sharex=True, squeeze=False)
        for ax, lead, samples in zip(axes[:, 0], r.record.sig_names, r.record.signals_mv, strict=True):
            x = samples[round(a * fs):]
            ax.plot(a + np.arange(len(x)) / fs, x, lw=0.6, color="black")
            ax.set_ylabel(f"{lead} mV", fontsize=8)
            ax.axvspan(end_s - DECISION_S, end_s, color="khaki", alpha=0.3, lw=0)
            for e in r.alarms:
                if e.label in COUNTS_AS and e.end >= a:
                    ax.axvspan(max(e.start, a), e.end, color=PRIORITY_COLOUR["high"], alpha=0.15, lw=0)
                    ax.text(max(e.start, a), ax.get_ylim()[0], e.label, fontsize=6, va="bottom")
            for t, c in r.beats:
                if t >= a:
                    ax.axvline(t, color=BEAT_COLOUR.get(c, "grey"), lw=0.5, alpha=0.6)
                    ax.text(t, ax.get_ylim()[1], c, fontsize=6, ha="center", va="top", color=BEAT_COLOUR.get(c))
        axes[-1, 0].set_xlabel("s (monitor alarm at the end; yellow: the decision window; red: daemon "
                               "high-priority alarms; letters: the daemon's beats)")
        verdict = "true" if r.true else "false"
        fig.suptitle(f"{r.name}: monitor's {r.alarm_type} alarm ({verdict}); daemon {r.outcome}", fontsize=9)
        fig.tight_layout()
        save_small(fig, out_dir / f"{r.outcome}-{r.alarm_type}-{r.name.replace('/', '-')}.png", dpi=70)
