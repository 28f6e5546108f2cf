"""Easy-data removal, Llama 4's SFT recipe (a judge removes over half of the data as easy; 95% for Behemoth): score
each record's difficulty in [0, 1] (1 = hardest) and keep the hardest fraction.

    herd filter MODEL_DIR chats.jsonl --out runs/hard --keep 0.5
    herd sft MODEL_DIR chats.jsonl --out runs/sft --keep 0.5      # the same into OUT/filter/, then SFT on the kept

Records are SFT records in TRL's formats (herd.post.data); the others are skipped and named as herd sft skips them.
Scorers:
  passk  K samples (temperature T) of the model on the prompt (the conversation up to its last assistant message,
         or a plain-text prompt), graded; difficulty = 1 - their mean grade (right / wrong answers: the share of
         wrong samples, 1 - pass@1). Only for checkable records, which carry extra keys:
           "answer" (+ "matcher": normalised (default) | exact | numeric | regex, + "tolerance"): graded as a JSONL
             task file grades it (herd.post.tasks.jsonl);
           "task" naming a built-in task (herd.post.tasks: "arithmetic", "speaker:corpus=DIR", ...) + "meta"
             (+ "answer", default the reference answer): graded by that task, as an Item with that answer and meta.
  loss   the mean token loss of the reference answer (the tokens SFT trains on) under the model, as a rank among
         the loss-scored records (0 = lowest loss, 1 = highest), so that a kept fraction is well defined.
  judge  a judge rates each conversation 1-10 on a rubric; difficulty = (rating - 1) / 9. The judge is a herd model
         directory (greedy, chat format; default: MODEL_DIR) or an OpenAI-compatible endpoint http(s)://HOST/v1
         (judge_model: default the first of its /models; key: api_key or OPENAI_API_KEY). A rubric file's
         "{conversation}" becomes the conversation (without one, the conversation follows the rubric).
  auto   passk for checkable records, loss for the rest (one ranking then mixes pass rates and loss ranks).
A record the scorer cannot rate (a judge reply without a number in 1-10, an image example longer than the model's
context) gets the middle difficulty 0.5 and is counted as "unscored".

The hardest round(keep * N) records are kept (at least one); equal difficulties are ordered by a seeded hash of
the record, so that ties favour no file. OUT gets kept.jsonl and removed.jsonl (the records as read, in input
order; relative image paths still name files beside the source), scores.jsonl (per record: where (file:line),
task, scorer, raw (mean grade, loss or rating), difficulty, kept), report.json (settings, threshold, total / kept /
removed overall and per task: the record's "task", else its file's name) and difficulty.png (needs matplotlib).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from herd.chat import PATCHES_PER_TILE, ChatFormat
from herd.config import load_config
from herd.errors import HerdError
from herd.images import ImageConfig
from herd.infer.sampling import SamplingParams
from herd.post import data
from herd.post.judge import RUBRIC, Ask, endpoint_judge, herd_judge, rating
from herd.post.tasks import TASKS, Item, get_task, parse_spec
from herd.post.tasks.jsonl import JsonlTask
from herd.tokenizer import Tokenizer
from herd.train.data import BadLog
from herd.train.losses import cross_entropy

SCORERS = ("auto", "passk", "loss", "judge")


@dataclass
class FilterSpec:
    keep: float  # the hardest fraction kept, in (0, 1]
    scorer: str = "auto"
    judge: str | None = None  # a herd model directory or an http(s)://HOST/v1 endpoint; None: the model itself
    judge_model: str | None = None  # the endpoint's model name; None: the first of its /models
    rubric: str | None = None  # a file; None: RUBRIC
    samples: int = 4  # K of passk
    temperature: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def check(self) -> None:
        if not 0 < self.keep <= 1:
            raise HerdError(f"keep must be a fraction in (0, 1], got {self.keep}")
        if self.scorer not in SCORERS:
            raise HerdError(f"unknown scorer {self.scorer!r}; choose one of {', '.join(SCORERS)}")
        if self.samples < 1:
            raise HerdError(f"samples must be >= 1, got {self.samples}")
        if self.judge is not None and self.scorer != "judge":
            raise HerdError(f"a judge ({self.judge}) rates with scorer judge, not {self.scorer}")


@dataclass
class Sample:
    record: dict  # as read
    source: Path  # its file
    where: str  # file:line, as herd sft names its examples
    task: str  # the report's group
    example: data.Example
    check: Callable[[str], float] | None  # grades a completion in [0, 1]; None: not checkable
    scorer: str = ""
    raw: float | None = None
    difficulty: float | None = None


Complete = Callable[[list[Sample], int], list[list[str]]]  # samples, K -> K completions each


def read_samples(files: list[Path], fmt: ChatFormat, image_config: ImageConfig) -> tuple[list[Sample], int]:
    """The usable records of the files and how many were skipped."""
    out, skipped, graders = [], 0, {}
    for path in map(Path, files):
        if not path.is_file():
            raise FileNotFoundError(f"no data file {path}")
        bad, images = BadLog(), {"image_config": image_config, "base_dir": path.parent}
        for where, record in data.read_records(path, bad):
            try:
                found = data.record_format(record)
                if found == "conversational":
                    example = data.encode_conversation(fmt, record["messages"], **images)
                elif found == "prompt_completion":
                    example = data.encode_prompt_completion(fmt, record["prompt"], record["completion"], **images)
                else:
                    raise data.RecordError("a preference record where SFT records are expected")
                check = _grader(record, path, graders)
            except (HerdError, TypeError, ValueError, KeyError) as e:
                bad.add("bad_record", f"{where}: {e}")
                continue
            task = record["task"] if isinstance(record.get("task"), str) else path.name
            out.append(Sample(record, path, f"{path}:{where}", task, example, check))
        bad.warn(path)
        skipped += sum(bad.counts.values())
    if not out:
        raise data.RecordError(f"no usable SFT record in {', '.join(map(str, files))} ({skipped} skipped)")
    return out, skipped


def split(record: dict) -> tuple[str | list[dict], str | list[dict]]:
    """(prompt, reference answer): a conversation before its last assistant message and that message, or a
    prompt-completion record's two halves."""
    if "messages" in record:
        m = record["messages"]
        last = max(i for i, x in enumerate(m) if x.get("role") == "assistant")
        return m[:last], m[last:last + 1]
    return record["prompt"], record["completion"]


def _text(content: object) -> str:
    if isinstance(content, list):
        return "\n".join(p.get("text", "") if p.get("type") == "text" else f"[{p.get('type')}]" for p in content)
    return str(content or "")


def _messages(part: str | list[dict], role: str) -> list[dict]:
    return [{"role": role, "content": part}] if isinstance(part, str) else part


def _grader(record: dict, path: Path, cache: dict) -> Callable[[str], float] | None:
    task = record.get("task")
    try:
        builtin = isinstance(task, str) and parse_spec(task)[0] in TASKS
    except HerdError:
        builtin = False  # "task" is a label
    if not builtin and record.get("answer") is None:
        return None
    key = task if builtin else (str(path), record.get("matcher", "normalised"), float(record.get("tolerance", 0.0)))
    if key not in cache:  # a JsonlTask grades answers by its matcher: the same matching as herd eval tasks
        cache[key] = get_task(task) if builtin else JsonlTask(path=key[0], matcher=key[1], tolerance=key[2])
    scorer, answer = cache[key], record.get("answer")
    if answer is None:
        reference = split(record)[1]
        answer = reference if isinstance(reference, str) else "\n".join(_text(m.get("content")) for m in reference)
    item = Item(scorer.name, [], str(answer), 1, record.get("meta") or {})
    return lambda completion: scorer.score(item, completion)


# -- scorers --------------------------------------------------------------------------------------------------------
def engine_completer(llm, spec: FilterSpec) -> Complete:
    """K samples per prompt through ``llm.engine``, laid out as SFT lays the record out (chat or plain text). A
    seeded batch draws row i from seed + i; the seed moves on by each batch's rows."""
    params = SamplingParams(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, seed=spec.seed)
    done = 0

    def complete(samples: list[Sample], k: int) -> list[list[str]]:
        nonlocal done
        ids, pixels = [], []
        for s in samples:
            prompt = split(s.record)[0]
            p, px = (llm.encode_with_images(prompt, []) if isinstance(prompt, str) else
                     llm.chat_inputs(_with_paths_from(prompt, s.source.parent)))
            ids += [p] * k
            pixels += [px] * k
        texts = [c.text for c in llm.engine.generate(ids, dataclasses.replace(params, seed=params.seed + done),
                                                     pixels)]
        done += len(ids)
        return [texts[i * k:(i + 1) * k] for i in range(len(samples))]

    return complete


def _with_paths_from(messages: list[dict], folder: Path) -> list[dict]:
    """The messages with relative image paths taken from ``folder`` (the data file's, as SFT reads them)."""
    def part(p: dict) -> dict:
        src = p.get("path")
        found = isinstance(src, str) and not Path(src).is_absolute() and (folder / src).is_file()
        return {**p, "path": str(folder / src)} if found else p

    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in messages]


def score_passk(samples: list[Sample], complete: Complete, k: int, batch: int = 32, progress: bool = True) -> None:
    """difficulty = 1 - the mean grade of K completions; ``batch`` sequences per call of ``complete``."""
    per_call = max(1, batch // k)
    with tqdm(total=len(samples), desc="filter pass@k", unit="sample", disable=not progress) as bar:
        for start in range(0, len(samples), per_call):
            chunk = samples[start:start + per_call]
            for s, completions in zip(chunk, complete(chunk, k)):
                grades = [min(1.0, max(0.0, float(s.check(c)))) for c in completions]
                s.scorer, s.raw = "passk", sum(grades) / len(grades)
                s.difficulty = 1.0 - s.raw
            bar.update(len(chunk))


@torch.no_grad()
def score_loss(samples: list[Sample], model: torch.nn.Module, image_config: ImageConfig | None = None,
               tokens_per_batch: int = 8192, progress: bool = True) -> None:
    """difficulty = the rank of the reference answer's mean token loss. Examples of similar length go through
    the model together, laid out by pack and collate as SFT lays them out."""
    param = next(model.parameters())
    order = sorted(samples, key=lambda s: len(s.example.ids))
    scored = []
    with tqdm(total=len(samples), desc="filter loss", unit="sample", disable=not progress) as bar:
        start = 0
        while start < len(order):
            end = start + 1  # sorted by length: the last of a batch sets its rows' length
            while end < len(order) and (end + 1 - start) * len(order[end].example.ids) <= tokens_per_batch:
                end += 1
            length = min(len(order[end - 1].example.ids), model.cfg.max_seq_len)
            # one example per row keeps each loss its own; pack gives [] for an image example that does not fit
            fits = [(s, rows[0]) for s in order[start:end] if (rows := data.pack([s.example], length))]
            if fits:
                b = {k: v.to(param.device) for k, v in data.collate([r for _, r in fits], image_config).items()}
                pixels = b.get("pixel_values")
                logits = model(b["tokens"], positions=b["positions"], doc_ids=b["doc_ids"],
                               pixel_values=None if pixels is None else pixels.to(param.dtype))
                for i, (s, _) in enumerate(fits):
                    loss, _ = cross_entropy(logits[i:i + 1], b["targets"][i:i + 1], b["loss_mask"][i:i + 1])
                    s.scorer, s.raw = "loss", float(loss)
                    scored.append(s)
            bar.update(end - start)
            start = end
    for s, rank in zip(scored, ranks([s.raw for s in scored])):
        s.difficulty = rank


def ranks(values: list[float]) -> list[float]:
    """Each value's rank scaled to [0, 1], ties sharing their mean rank (a single value: 0.5)."""
    if len(values) < 2:
        return [0.5] * len(values)
    at: dict[float, list[int]] = {}
    for position, v in enumerate(sorted(values)):
        at.setdefault(v, []).append(position)
    return [sum(at[v]) / len(at[v]) / (len(values) - 1) for v in values]


def conversation_text(record: dict) -> str:
    prompt, answer = split(record)
    messages = _messages(prompt, "user") + _messages(answer, "assistant")
    return "\n\n".join(f"{m.get('role', '?').upper()}: {_text(m.get('content'))}"
                       + (f"\n[tool calls] {json.dumps(m['tool_calls'])}" if m.get("tool_calls") else "")
                       for m in messages)


def score_judge(samples: list[Sample], ask: Ask, rubric: str = RUBRIC, batch: int = 16,
                progress: bool = True) -> None:
    if "{conversation}" not in rubric:
        rubric += "\n\n{conversation}"
    unparsed = []
    with tqdm(total=len(samples), desc="filter judge", unit="sample", disable=not progress) as bar:
        for start in range(0, len(samples), batch):
            chunk = samples[start:start + batch]
            replies = ask([rubric.replace("{conversation}", conversation_text(s.record)) for s in chunk])
            for s, reply in zip(chunk, replies):
                s.scorer, s.raw = "judge", rating(reply)
                s.difficulty = None if s.raw is None else (s.raw - 1) / 9
                if s.raw is None:
                    unparsed.append(reply)
            bar.update(len(chunk))
    if unparsed:
        warnings.warn(f"{len(unparsed)} of {len(samples)} judge replies hold no rating in 1-10 (e.g. "
                      f"{unparsed[0][:80]!r}): they count as difficulty 0.5", stacklevel=2)


# -- the filter -----------------------------------------------------------------------------------------------------
def filter_files(model_dir: str | Path, files: list[str | Path], out: str | Path, spec: FilterSpec,
                 dtype: str | None = None, device: str = "cpu", api_key: str | None = None,
                 complete: Complete | None = None, reuse: bool = False, progress: bool = True) -> dict:
    """Score, keep the hardest ``spec.keep``, write OUT (see the module's docstring); returns report.json's object.
    ``complete``: passk's sampler (default: the model's engine). ``reuse``: return OUT's report when it was made
    with the same settings and data (sizes and times), computing nothing."""
    spec.check()
    out, files = Path(out), [Path(f) for f in files]
    settings = json.loads(json.dumps({  # as report.json holds them
        "model": str(model_dir), **dataclasses.asdict(spec),
        "data": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] if f.is_file() else [str(f)] for f in files]},
        default=str))
    if reuse and (out / "report.json").is_file():
        report = json.loads((out / "report.json").read_text())
        if report.get("settings") == settings:
            return report
    cfg = load_config(model_dir)
    fmt = ChatFormat(Tokenizer.for_model(model_dir), patches_per_tile=cfg.vision.tokens_per_tile if cfg.vision
                     else PATCHES_PER_TILE)
    image_config = ImageConfig(tile_size=cfg.vision.image_size) if cfg.vision else ImageConfig()
    samples, skipped = read_samples(files, fmt, image_config)
    loaded: dict = {}

    def llm(path=model_dir):
        from herd.api import load

        if str(path) not in loaded:
            loaded[str(path)] = load(path, dtype=dtype, device=device)
        return loaded[str(path)]

    if spec.scorer == "passk" and not all(s.check for s in samples):
        first = next(s for s in samples if not s.check)
        raise HerdError(f"scorer passk needs checkable records (an 'answer' or a built-in 'task' key); {first.where} "
                        f"has neither: use scorer auto (loss for those) or loss")
    graded = [s for s in samples if s.check] if spec.scorer in ("auto", "passk") else []
    if graded:
        k = spec.samples if spec.temperature > 0 else 1  # greedy samples would all be the same
        score_passk(graded, complete or engine_completer(llm(), spec), k, progress=progress)
    by_loss = {"auto": [s for s in samples if not s.check], "loss": samples}.get(spec.scorer, [])
    if by_loss:
        score_loss(by_loss, llm().model, image_config, progress=progress)
    if spec.scorer == "judge":
        judge = spec.judge or model_dir
        is_url = str(judge).startswith(("http://", "https://"))
        ask = endpoint_judge(str(judge), spec.judge_model, api_key) if is_url else herd_judge(llm(judge))
        rubric = Path(spec.rubric).read_text() if spec.rubric else RUBRIC
        score_judge(samples, ask, rubric, progress=progress)
    return keep_hardest(samples, out, spec, settings, skipped)


def keep_hardest(samples: list[Sample], out: Path, spec: FilterSpec, settings: dict, skipped: int = 0) -> dict:
    """Choose the kept records by their difficulty and write OUT's files; report.json's object."""
    difficulty = [0.5 if s.difficulty is None else s.difficulty for s in samples]
    n_keep = max(1, math.floor(spec.keep * len(samples) + 0.5))

    def tiebreak(i: int) -> str:
        text = json.dumps(samples[i].record, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(f"{spec.seed}/{text}".encode()).hexdigest()

    hardest = sorted(range(len(samples)), key=lambda i: (-difficulty[i], tiebreak(i)))
    kept = set(hardest[:n_keep])
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)  # written last: a report means a complete OUT
    files = {name: open(out / f"{name}.jsonl", "w", encoding="utf-8") for name in ("kept", "removed", "scores")}
    with files["kept"], files["removed"], files["scores"]:
        for i, s in enumerate(samples):
            files["kept" if i in kept else "removed"].write(json.dumps(s.record, ensure_ascii=False) + "\n")
            files["scores"].write(json.dumps({"where": s.where, "task": s.task, "scorer": s.scorer, "raw": s.raw,
                                              "difficulty": difficulty[i], "kept": i in kept}) + "\n")
    tasks: dict[str, dict] = {}
    for i, s in enumerate(samples):
        t = tasks.setdefault(s.task, {"total": 0, "kept": 0, "removed": 0, "mean_difficulty": 0.0})
        t["total"] += 1
        t["kept" if i in kept else "removed"] += 1
        t["mean_difficulty"] += difficulty[i]
    for t in tasks.values():
        t["mean_difficulty"] /= t["total"]
    threshold = difficulty[hardest[n_keep - 1]]
    report = {"scorer": spec.scorer, "keep": spec.keep, "total": len(samples), "kept": n_keep,
              "removed": len(samples) - n_keep, "skipped": skipped, "threshold": threshold,
              "unscored": sum(s.difficulty is None for s in samples),
              "scored_by": {k: sum(s.scorer == k for s in samples) for k in ("passk", "loss", "judge")},
              "tasks": tasks, "out": str(out), "settings": settings}
    try:
        plot(difficulty, kept, threshold, out / "difficulty.png", f"difficulty ({spec.scorer}): kept {n_keep} of "
                                                                  f"{len(samples)}")
    except ImportError:
        warnings.warn("no difficulty.png: it needs matplotlib (pip install matplotlib)", stacklevel=2)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def plot(difficulty: list[float], kept: set[int], threshold: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    removed = [d for i, d in enumerate(difficulty) if i not in kept]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.hist([removed, [difficulty[i] for i in sorted(kept)]], bins=20, range=(0, 1), stacked=True,
            color=["#b0b0b0", "#2e7dd1"], label=[f"removed ({len(removed)})", f"kept ({len(kept)})"])
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.2f}")
    ax.set_xlabel("difficulty (1 = hardest)")
    ax.set_ylabel("records")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def kept_locations(out: str | Path) -> set[str]:
    """The file:line of every kept record of a filter's OUT (what herd sft trains on)."""
    rows = (json.loads(line) for line in (Path(out) / "scores.jsonl").read_text().splitlines())
    return {r["where"] for r in rows if r["kept"]}


def render(report: dict) -> str:
    lines = [f"{'task':<32}{'total':>8}{'kept':>8}{'removed':>9}{'difficulty':>12}"]
    for name, t in report["tasks"].items():
        lines.append(f"{name[:31]:<32}{t['total']:>8}{t['kept']:>8}{t['removed']:>9}{t['mean_difficulty']:>12.3f}")
    lines.append(f"kept {report['kept']} of {report['total']} records (difficulty >= {report['threshold']:.3f}, "
                 f"scorer {report['scorer']}; {report['unscored']} unscored, {report['skipped']} skipped) -> "
                 f"{report['out']}")
    return "\n".join(lines)
