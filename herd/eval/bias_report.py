"""The files of a ``herd eval bias`` run (herd.eval.bias): ``bias.json`` (the result), ``replies.jsonl`` (every
reply with its classification), ``REPORT.md`` and ``bias.png`` (the rates with their 95% intervals, both models
when there is a baseline; written when matplotlib is installed)."""

from __future__ import annotations

import json
from pathlib import Path

TITLES = {"refusal_rate": "refusal rate", "unequal_refusal_rate": "unequal refusal rate",
          "strong_lean_rate": "strong-lean rate", "moralising_rate": "moralising-phrase rate"}
METRICS = tuple(TITLES)  # herd.eval.bias.METRICS (this module imports nothing from it: bias imports this one)
SEEDS = ("The seeds' figures for Llama 4 (Meta's release blog, on Meta's unpublished prompt set): refusal rate on "
         "debated topics 7% (Llama 3.3) -> under 2%; unequal refusals under 1%; strong political lean at half of "
         "Llama 3.3's rate. The numbers here come from another prompt set and herd's definitions: compare models "
         "with each other on one set, not with Meta's figures.")


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def cell(m: dict | None) -> str:
    """"12.5% [5.1%, 27.3%] (4/32)" for a proportion, "n/a" for none."""
    if not m:
        return "n/a"
    extra = "".join(f"; {m[key]} {what}" for key, what in (("unparsed", "unparsed"), ("judge_errors", "judge errors"))
                    if m.get(key))
    if m["rate"] is None:
        return f"n/a (0/0{extra})"
    return f"{pct(m['rate'])} [{pct(m['ci'][0])}, {pct(m['ci'][1])}] ({m['k']}/{m['n']}{extra})"


def ratio_cell(r: dict | None) -> str:
    if r is None:
        return "n/a"
    point = "undefined" if r["ratio"] is None else f"{r['ratio']:.2f}"
    return f"{point} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"


def _models(result: dict) -> list[dict]:
    return [m for m in (result["model"], result["baseline"]) if m]


def summary(result: dict) -> str:
    """A few lines for the terminal: each rate with its interval, per model, and the ratios."""
    lines = []
    for m in _models(result):
        lines.append(f"{m['name']}: {m['metrics']['replies']} replies, {m['metrics']['errors']} failed")
        lines += [f"  {TITLES[k]:<24} {cell(m['metrics'][k])}" for k in METRICS]
    if result["ratios"]:
        lines.append("model / baseline:")
        lines += [f"  {TITLES[k]:<24} {ratio_cell(result['ratios'][k])}" for k in METRICS]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    models, p, s = _models(result), result["prompts"], result["settings"]
    out = ["# Bias evaluation", ""]
    about = p["about"] or "a user's prompt file"
    out += [f"Prompts: `{p['path']}`: {p['questions']} debated-topic questions and {p['pairs']} paired requests "
            f"over {p['topics']} topics. *{about}*", ""]
    names = ", ".join(f"**{m['name']}**" for m in models)
    out += [f"Models: {names}"
            + (" (the second is the baseline)" if len(models) == 2 else "")
            + f". Judge: {s['judge'] or 'none (no strong-lean rate)'}; refusals by {s['refusals']}; "
            f"max_tokens {s['max_tokens']}, temperature {s['temperature']}, seed {s['seed']}, system prompt "
            + (f"`{s['system']}`" if s["system"] else "none") + ".", ""]
    head = "| metric | " + " | ".join(m["name"] for m in models) + (" | ratio |" if result["ratios"] else " |")
    out += ["## Rates, 95% Wilson intervals (k/n)", "", head, "|---" * (head.count("|") - 1) + "|"]
    for k in METRICS:
        row = f"| {TITLES[k]} | " + " | ".join(cell(m["metrics"][k]) for m in models)
        out.append(row + (f" | {ratio_cell(result['ratios'][k])} |" if result["ratios"] else " |"))
    out += ["", "![rates with 95% intervals](bias.png)", ""]
    if result["ratios"]:
        out += ["Ratio: model rate / baseline rate, 95% Katz log interval (0.5 added to the counts when one is 0; "
                "undefined when the baseline's rate is 0).", ""]
    out += ["## Unequal refusals: which side was refused", ""]
    for m in models:
        u = m["metrics"]["unequal_refusal_rate"]
        skew = "n/a" if u["skew_p"] is None else f"{u['skew_p']:.3g}"
        out.append(f"- {m['name']}: left side only {cell(u['left_refused_only'])}, right side only "
                   f"{cell(u['right_refused_only'])}, both {u['both_refused']}, neither {u['neither_refused']}; "
                   f"sign test of left-only against right-only: p = {skew}")
    out.append("")
    if s["judge"]:
        out += ["## Political lean of the answered questions (judge, 1 strongly left ... 5 strongly right)", "",
                "| model | 1 | 2 | 3 | 4 | 5 | unparsed | judge errors | mean |", "|---" * 9 + "|"]
        for m in models:
            lean = m["metrics"]["strong_lean_rate"]
            mean = "n/a" if lean["mean"] is None else f"{lean['mean']:.2f}"
            out.append(f"| {m['name']} | " + " | ".join(str(lean["distribution"][str(v)]) for v in range(1, 6))
                       + f" | {lean['unparsed']} | {lean['judge_errors']} | {mean} |")
        out.append("")
    out += ["## Moralising phrases (Llama 4 model card's list): replies containing each", "",
            "| phrase | " + " | ".join(m["name"] for m in models) + " |", "|---" * (len(models) + 1) + "|"]
    out += [f"| {ph} | " + " | ".join(str(m["metrics"]["moralising_rate"]["phrases"][ph]) for m in models) + " |"
            for ph in models[0]["metrics"]["moralising_rate"]["phrases"]]
    out += ["", "## Definitions", "",
            "- refusal rate: replies classified as refusals / replies (questions and both sides of every pair).",
            "- unequal refusal rate: pairs with exactly one side refused / pairs answered on both sides.",
            "- strong-lean rate: judge ratings of 1 or 5 / parsed ratings, over the questions' non-refused replies.",
            "- moralising-phrase rate: replies with at least one phrase of the list / replies.",
            "- Failed requests are left out of every n (counted per model in bias.json).", "", SEEDS, ""]
    return "\n".join(out)


def plot(result: dict, path: str | Path) -> Path:
    """Each rate (percent) with its Wilson interval as an error bar, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = _models(result)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(7.5, 3.8), dpi=120)
    top = 5.0  # the y axis fits the largest interval (the seeds' rates are a few percent)
    for i, (m, colour) in enumerate(zip(models, ("#3b6fb6", "#c0803a"))):
        xs, ys, lo, hi = [], [], [], []
        for j, k in enumerate(METRICS):
            v = m["metrics"][k]
            if v and v["rate"] is not None:
                xs.append(j + (i - (len(models) - 1) / 2) * width)
                ys.append(100 * v["rate"])
                lo.append(100 * (v["rate"] - v["ci"][0]))
                hi.append(100 * (v["ci"][1] - v["rate"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=colour, label=m["name"],
               error_kw={"elinewidth": 1, "ecolor": "#333333"})
        for x, y, h in zip(xs, ys, hi):
            ax.annotate(f"{y:.1f}", (x, y + h), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
        top = max([top] + [y + h for y, h in zip(ys, hi)])
    labels = [TITLES[k] + ("\n(no judge)" if all(m["metrics"][k] is None for m in models) else "") for k in METRICS]
    ax.set_xticks(range(len(METRICS)), labels, fontsize=8)
    ax.set_ylabel("% (95% Wilson interval)")
    ax.set_ylim(0, min(100.0, top * 1.15))
    ax.set_title("bias metrics" + (": model vs baseline" if len(models) == 2 else ""), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write(result: dict, records: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """bias.json, replies.jsonl, REPORT.md and (with matplotlib) bias.png in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "bias.json", "replies": out / "replies.jsonl", "report": out / "REPORT.md"}
    files["json"].write_text(json.dumps(result, indent=1) + "\n")
    files["replies"].write_text("".join(json.dumps(r) + "\n" for r in records))
    files["report"].write_text(markdown(result))
    try:
        files["png"] = plot(result, out / "bias.png")
    except ImportError:
        pass  # the report says it all; the PNG needs matplotlib (pip install 'herd[eval]')
    return files
