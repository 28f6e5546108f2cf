"""Needle in a haystack: can a model find one fact planted at a chosen depth of a long context?

For each context length L and depth d (0 = the start, 1 = the end) the harness builds ``needles`` prompts of
exactly L tokens. Each prompt is a window of real text (by default Hamlet and The Tempest, shipped in
``herd/eval/haystack``) with one sentence, "The special magic number for {key} is {value}.", planted at
d x the haystack's length (moved to the nearest line or sentence end), a random key word and a random
7-digit value, then the question and the start of the answer:

    base style:  <|begin_of_text|> haystack ... \\n\\nQuestion: What is the special magic number for {key}?
                 \\nAnswer: The special magic number for {key} is
    chat style:  the same haystack and question as a user message, then the assistant header and the same
                 answer start (Llama 4 chat format)

A needle counts as retrieved when the first number in the greedy completion is exactly the value. The grid of
accuracies becomes a JSON result and a heatmap in the style of the Llama 4 figures (green = retrieved,
white = missed). ``run_niah`` takes any ``complete(prompts) -> texts`` function, so the scoring is testable
without a model.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from herd.tokenizer import Tokenizer

HAYSTACK_DIR = Path(__file__).parent / "haystack"
NEEDLE = "The special magic number for {key} is {value}."
QUESTION = "What is the special magic number for {key}?"
ANSWER = "The special magic number for {key} is"
KEYS = ("Verona", "Elsinore", "Messina", "Padua", "Athens", "Ephesus", "Illyria", "Navarre", "Windsor", "Milan",
        "Naples", "Tyre", "Sicilia", "Bohemia", "Arden", "Belmont", "Cyprus", "Venice", "Mantua", "Rousillon")
_NUMBER = re.compile(r"\d+")
_SNAP = 48  # tokens searched on each side of the exact depth for a line or sentence end


@dataclass
class NiahConfig:
    lengths: list[int]
    depths: list[float]
    needles: int = 1  # prompts per cell (different key, value and haystack window)
    chat: bool = False
    seed: int = 0
    max_new_tokens: int = 12
    haystack: list[str] = field(default_factory=list)  # text files; empty = herd/eval/haystack/*.txt

    def check(self) -> None:
        if not self.lengths or not self.depths or self.needles < 1:
            raise ValueError("niah: give at least one length, one depth and --needles >= 1")
        bad = [d for d in self.depths if not 0.0 <= d <= 1.0]
        if bad:
            raise ValueError(f"niah: depths must lie in [0, 1], got {bad}")


@dataclass
class NiahResult:
    config: NiahConfig
    cells: list[dict]  # {"length", "depth", "retrieved", "total", "accuracy"}
    accuracy: float  # over all prompts
    seconds: float
    model: str = ""
    samples: list[dict] = field(default_factory=list)  # per prompt: length, depth, key, value, output, retrieved

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = asdict(self.config)
        return d


def haystack_ids(tokenizer: Tokenizer, files: Sequence[str | Path] = ()) -> list[int]:
    paths = [Path(f) for f in files] or sorted(HAYSTACK_DIR.glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"no haystack text: give files, or restore {HAYSTACK_DIR}")
    ids: list[int] = []
    for p in paths:
        ids += tokenizer.encode(p.read_text(encoding="utf-8", errors="replace").strip() + "\n\n")
    return ids


class PromptBuilder:
    """Prompts of an exact token length with a needle at a given depth."""

    def __init__(self, tokenizer: Tokenizer, hay: list[int], chat: bool = False):
        self.tok, self.hay, self.chat = tokenizer, hay, chat
        self._is_end: dict[int, bool] = {}  # token id -> whether its text ends a line or sentence

    def _ends_sentence(self, token: int) -> bool:
        if token not in self._is_end:
            text = self.tok.decode([token])
            self._is_end[token] = text.rstrip(" ").endswith(("\n", ".", "!", "?"))
        return self._is_end[token]

    def frame(self, key: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the haystack."""
        tok = self.tok
        question = tok.encode("\n\nQuestion: " + QUESTION.format(key=key))
        if self.chat:
            from herd.chat import ChatFormat

            fmt = ChatFormat(tok)
            head = [tok.bos_id, *fmt.encode_header("user")]
            tail = [*question, tok.eot_id, *fmt.encode_header("assistant"), *tok.encode(ANSWER.format(key=key))]
        else:
            head = [tok.bos_id]
            tail = [*question, *tok.encode("\nAnswer: " + ANSWER.format(key=key))]
        return head, tail

    def build(self, length: int, depth: float, key: str, value: str, offset: int) -> list[int]:
        head, tail = self.frame(key)
        needle = self.tok.encode(" " + NEEDLE.format(key=key, value=value) + "\n")
        n = length - len(head) - len(tail) - len(needle)
        if n < 1:
            raise ValueError(f"niah: length {length} is too short for the question and needle "
                             f"({length - n + 1} tokens at least)")
        window = [self.hay[(offset + i) % len(self.hay)] for i in range(n)]
        cut = round(depth * n)
        if 0 < cut < n:  # plant at a line or sentence end near the depth, so the needle reads as a sentence
            near = [i for i in range(max(1, cut - _SNAP), min(n, cut + _SNAP)) if self._ends_sentence(window[i - 1])]
            cut = min(near, key=lambda i: abs(i - cut), default=cut)
        ids = head + window[:cut] + needle + window[cut:] + tail
        assert len(ids) == length
        return ids


def retrieved(output: str, value: str) -> bool:
    m = _NUMBER.search(output)
    return m is not None and m.group() == value


def run_niah(complete: Callable[[list[list[int]]], list[str]], tokenizer: Tokenizer, cfg: NiahConfig,
             progress: bool = True, model: str = "") -> NiahResult:
    """Score ``complete`` (token-id prompts -> completion texts, greedy) on the grid of ``cfg``. Prompts of one
    length go to ``complete`` together (one batch per length)."""
    cfg.check()
    rng = random.Random(cfg.seed)
    builder = PromptBuilder(tokenizer, haystack_ids(tokenizer, cfg.haystack), cfg.chat)
    cells, samples = [], []
    start = time.perf_counter()
    bar = tqdm(total=len(cfg.lengths) * len(cfg.depths) * cfg.needles, desc="niah", unit="prompt",
               disable=not progress, dynamic_ncols=True)
    try:
        for length in cfg.lengths:
            jobs = []
            for depth in cfg.depths:
                for _ in range(cfg.needles):
                    key, value = rng.choice(KEYS), str(rng.randrange(1_000_000, 10_000_000))
                    jobs.append((depth, key, value, builder.build(length, depth, key, value,
                                                                  rng.randrange(len(builder.hay)))))
            bar.set_postfix(length=length)
            outputs = complete([j[3] for j in jobs])
            for (depth, key, value, _), out in zip(jobs, outputs, strict=True):
                samples.append({"length": length, "depth": depth, "key": key, "value": value, "output": out,
                                "retrieved": retrieved(out, value)})
            bar.update(len(jobs))
            for depth in cfg.depths:
                hits = [s["retrieved"] for s in samples if s["length"] == length and s["depth"] == depth]
                cells.append({"length": length, "depth": depth, "retrieved": sum(hits), "total": len(hits),
                              "accuracy": sum(hits) / len(hits)})
    finally:
        bar.close()
    accuracy = sum(s["retrieved"] for s in samples) / len(samples)
    return NiahResult(cfg, cells, accuracy, time.perf_counter() - start, model, samples)


def engine_completer(engine, max_new_tokens: int = 12, batch: int = 8) -> Callable[[list[list[int]]], list[str]]:
    """``complete`` for run_niah from a herd Engine: greedy, ``batch`` prompts at a time."""
    from herd.infer.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)

    def complete(prompts: list[list[int]]) -> list[str]:
        out: list[str] = []
        for i in range(0, len(prompts), batch):
            out += [c.text for c in engine.generate(prompts[i:i + batch], params)]
        return out

    return complete


def heatmap(result: NiahResult, path: str | Path, title: str | None = None) -> Path:
    """Depth (rows, 0% at the top) x context length (columns); each cell's colour is its accuracy, white = all
    missed, green = all retrieved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    lengths, depths = result.config.lengths, result.config.depths
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in result.cells}
    grid = [[acc[(L, d)] for L in lengths] for d in depths]
    cmap = LinearSegmentedColormap.from_list("niah", ["#ffffff", "#2e9e5b"])
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(lengths), 1.0 + 0.42 * len(depths)), dpi=120)
    ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [short_count(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xticks([x - 0.5 for x in range(1, len(lengths))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(depths))], minor=True)
    ax.grid(which="minor", color="#cccccc", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title or f"{result.model or 'model'}: {result.accuracy:.0%} retrieved", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def short_count(n: int) -> str:
    """4096 -> 4K, 2**20 -> 1M (other numbers as they are)."""
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size and n % (size // 4) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def save(result: NiahResult, out_dir: str | Path, title: str | None = None) -> dict[str, Path]:
    """``niah.json`` (config, cells, accuracy, every prompt's output) and ``niah.png`` (when matplotlib is
    installed) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "niah.json"}
    files["json"].write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    try:
        files["png"] = heatmap(result, out / "niah.png", title)
    except ImportError:
        pass  # the caller says that the heatmap needs matplotlib
    return files
