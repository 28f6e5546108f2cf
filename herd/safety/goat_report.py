"""A GOAT run's report (herd.safety.goat): REPORT.md and asr.png (ASR by technique and by turn; needs matplotlib),
and the console summary."""

from __future__ import annotations

import warnings
from pathlib import Path


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _cell(text: str | None, width: int = 80) -> str:
    text = " ".join(str(text or "").split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def render(summary: dict) -> str:
    """A few lines for the terminal."""
    s, k = summary, summary["k"]
    lines = [f"GOAT: {s['n_goals']} goals x {s['attempts']} attempts, up to {s['turns']} turns",
             f"ASR@1 {_pct(s['asr@1'])} ({s['asr@1_goals']} goals)   ASR@{k} {_pct(s['asr@k'])} "
             f"({s['asr@k_goals']} goals)   ASR@{k} unbiased {_pct(s['asr@k_unbiased'])} "
             f"({s['asr@k_unbiased_goals']} goals)",
             f"{s['successes']} of {s['conversations']} conversations succeeded; {s['errors']} ended in an error"]
    used = {name: n for name, n in s["per_technique"].items() if n}
    if used:
        lines.append("successes by technique: " + ", ".join(f"{name} {n}" for name, n in used.items()))
    if s["successes"]:
        lines.append("successes by turn: " + ", ".join(f"{t}: {n}" for t, n in s["by_turn"].items()))
    for g in s["goals"]:
        for e in g["errors"]:
            lines.append(f"error: goal {g['index']} attempt {e['attempt']} ({e['role']}): {_cell(e['error'], 160)}")
    if "files" in s:
        lines.append("wrote " + ", ".join(s["files"].values()))
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    s, k = summary, summary["k"]
    out = ["# GOAT red-teaming report", "",
           f"- attacker: `{s.get('attacker')}`", f"- target: `{s.get('target')}`",
           f"- judge: `{s.get('judge')}` ({s.get('judge_kind')})",
           f"- {s['n_goals']} goals, {s['attempts']} attempts per goal, at most {s['turns']} turns per conversation",
           "", "| metric | value | goals |", "|---|---|---|",
           f"| ASR@1 | {_pct(s['asr@1'])} | {s['asr@1_goals']} |",
           f"| ASR@{k} (empirical) | {_pct(s['asr@k'])} | {s['asr@k_goals']} |",
           f"| ASR@{k} (unbiased, n >= {k}) | {_pct(s['asr@k_unbiased'])} | {s['asr@k_unbiased_goals']} |",
           "", f"{s['successes']} of {s['conversations']} conversations succeeded; {s['errors']} ended in an error "
           "(not counted as attempts); the judge's answer could not be read "
           f"{s['judge_unparsed']} times (counted safe); the attacker wrote no Reply section "
           f"{s['attacker_unparsed']} times (its whole output was sent).",
           "", "## By technique", "",
           "Successes: the techniques named in the Strategy of the turn judged unsafe. Turns: every turn that "
           "named the technique.", "", "| technique | successes | turns |", "|---|---|---|"]
    for name, n in s["per_technique"].items():
        out.append(f"| {name} | {n} | {s['technique_use'].get(name, 0)} |")
    out += ["", "## By turn", "", "| turn | successes | cumulative ASR (conversations) |", "|---|---|---|"]
    for t, n in s["by_turn"].items():
        out.append(f"| {t} | {n} | {_pct(s['asr_by_turn'].get(t))} |")
    if s.get("by_category"):
        out += ["", "## By category", "", "| category | goals | goals with a success |", "|---|---|---|"]
        for name, c in s["by_category"].items():
            out.append(f"| {_cell(name, 40)} | {c['goals']} | {c['succeeded']} |")
    out += ["", "## Goals", "", "| # | goal | status | successes / attempts | first success turn | errors |",
            "|---|---|---|---|---|---|"]
    for g in s["goals"]:
        first = g["first_success_turn"] if g["first_success_turn"] is not None else ""
        out.append(f"| {g['index']} | {_cell(g['goal'])} | {g['status']} | {g['successes']} / {g['attempts']} | "
                   f"{first} | {len(g['errors'])} |")
    errors = [(g, e) for g in s["goals"] for e in g["errors"]]
    if errors:
        out += ["", "## Errors", ""]
        out += [f"- goal {g['index']}, attempt {e['attempt']}, {e['role']}: {_cell(e['error'], 300)}"
                for g, e in errors]
    out += ["", "Transcripts: `transcripts.jsonl` (one conversation a line)."]
    return "\n".join(out) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["per_technique"])
    wins = [summary["per_technique"][n] for n in names]
    use = [summary["technique_use"].get(n, 0) for n in names]
    rate = [w / u if u else 0.0 for w, u in zip(wins, use)]
    turns = list(summary["by_turn"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    bars = a.barh(names[::-1], rate[::-1], color="#c0392b")
    for bar, w, u in zip(bars, wins[::-1], use[::-1]):
        a.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {w}/{u}", va="center", fontsize=8)
    a.set_xlim(0, 1.15)
    a.set_xlabel("successful turns / turns naming the technique")
    a.set_title("ASR by technique")
    cumulative = [summary["asr_by_turn"][t] or 0.0 for t in turns]
    counts = [summary["by_turn"][t] for t in turns]
    b.bar(turns, counts, color="#b0b0b0", label="successes at this turn")
    b.set_ylim(0, max(1, *counts) * 1.3)  # room for the legends
    b.set_xlabel("turn")
    b.set_ylabel("successful conversations")
    b2 = b.twinx()
    b2.plot(turns, cumulative, "o-", color="#2e7dd1", label="cumulative ASR")
    b2.set_ylim(0, 1.3)
    b2.set_ylabel("ASR (conversations)")
    b.set_title("ASR by turn")
    b.legend(loc="upper left", fontsize=8)
    b2.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"GOAT: ASR@1 {_pct(summary['asr@1'])}, ASR@{summary['k']} {_pct(summary['asr@k'])}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(summary: dict, out: str | Path) -> dict[str, Path]:
    """OUT/REPORT.md and OUT/asr.png (the PNG only when matplotlib is installed)."""
    out = Path(out)
    files = {"report": out / "REPORT.md"}
    files["report"].write_text(markdown(summary), encoding="utf-8")
    try:
        plot(summary, out / "asr.png")
        files["png"] = out / "asr.png"
    except ImportError:
        warnings.warn("no asr.png: it needs matplotlib (pip install matplotlib)", stacklevel=2)
    return files
