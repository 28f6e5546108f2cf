"""``herd recipe RECIPE.toml``: a pipeline of stages run in order, each skipped once its output exists, resumed
when it was interrupted, and run again only when its settings (or an earlier stage it reads) changed.

    [recipe]
    name = "pico-chat"
    out_dir = "../runs/pico-chat"          # relative to the recipe's folder

    [[stage]]
    name = "captions"
    kind = "captions"                      # herd.train.synthetic_images.write_caption_set
    n = 2000
    minutes = 1                            # the budget estimate behind the ETA

    [[stage]]
    name = "base"
    kind = "command"                       # any herd command; {out} is this stage's directory,
    args = ["new", "tiny", "{out}/model"]  # {captions} the directory of the stage named captions

Each stage writes into ``out_dir/<name>/``; ``DONE.json`` there (written last, atomically) marks it finished and
holds its fingerprint: a hash of its table and of the fingerprints of the stages it names. A finished stage with
the same fingerprint is skipped; one whose fingerprint changed is an error that names it (``--redo NAME`` runs it
again, and what reads it then runs again too, since their fingerprints change with it). An unfinished stage runs
again in its directory, where each kind resumes what it can (a training run from its last checkpoint, a caption
set from scratch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from herd.errors import ConfigError, HerdError

DONE = "DONE.json"
_REF = re.compile(r"\{(\w[\w-]*)\}")


@dataclass
class Stage:
    name: str
    kind: str
    settings: dict[str, Any]  # the stage's table without name / kind / minutes
    minutes: float = 1.0
    refs: list[str] = field(default_factory=list)  # earlier stages it names as {stage}


def _refs(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(_REF.findall(value))
    if isinstance(value, dict):
        return set().union(*map(_refs, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(_refs, value)) if value else set()
    return set()


def _fill(value: Any, paths: dict[str, str]) -> Any:
    """``{name}`` -> that stage's directory, in every string of a settings value."""
    if isinstance(value, str):
        return _REF.sub(lambda m: paths[m.group(1)], value)
    if isinstance(value, dict):
        return {k: _fill(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, paths) for v in value]
    return value


# -- stage kinds: (settings with paths filled in, the stage's directory) -> None ---------------------------------
def _captions(s: dict[str, Any], out: Path) -> None:
    from herd.train.synthetic_images import write_caption_set

    write_caption_set(out / "captions", n=int(s["n"]), seed=int(s.get("seed", 0)),
                      kinds=tuple(s.get("kinds", ("shapes", "digits"))))


def _command(s: dict[str, Any], out: Path) -> None:
    args = s.get("args")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args) or not args:
        raise ConfigError("a command stage needs args = [\"herd subcommand\", \"arguments\", ...]")
    rc = subprocess.call([sys.executable, "-m", "herd.cli", *args], cwd=out)
    if rc:
        raise HerdError(f"`herd {' '.join(args)}` exited with status {rc}")


KINDS: dict[str, Callable[[dict[str, Any], Path], None]] = {"captions": _captions, "command": _command}


@dataclass
class Recipe:
    name: str
    out_dir: Path
    stages: list[Stage]

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        from herd.train.config import tomllib

        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as e:
            raise ConfigError(f"recipe {path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"recipe {path}: {e}") from None
        head = raw.get("recipe", {})
        unknown = set(raw) - {"recipe", "stage"}
        if unknown:
            raise ConfigError(f"recipe {path}: unknown tables {sorted(unknown)} (a [recipe] table and [[stage]] "
                              f"tables)")
        if "out_dir" not in head:
            raise ConfigError(f"recipe {path}: [recipe] needs out_dir")
        return cls(head.get("name", path.stem), path.parent / head["out_dir"],
                   parse_stages(raw.get("stage", []), str(path)))

    def fingerprints(self) -> dict[str, str]:
        prints: dict[str, str] = {}
        for st in self.stages:
            h = hashlib.sha256(json.dumps([st.kind, st.settings], sort_keys=True).encode())
            for ref in st.refs:
                h.update(prints[ref].encode())
            prints[st.name] = h.hexdigest()[:16]
        return prints

    def paths(self) -> dict[str, str]:
        return {st.name: str((self.out_dir / st.name).resolve()) for st in self.stages}


def parse_stages(tables: list[dict[str, Any]], where: str = "recipe") -> list[Stage]:
    stages: list[Stage] = []
    for i, t in enumerate(tables):
        t = dict(t)
        name, kind = t.pop("name", None), t.pop("kind", None)
        minutes = t.pop("minutes", 1.0)
        if not isinstance(name, str) or not re.fullmatch(r"\w[\w-]*", name):
            raise ConfigError(f"{where}: stage {i + 1} needs a name of letters, digits, _ and - (got {name!r})")
        if name in {s.name for s in stages} or name == "out":
            raise ConfigError(f"{where}: stage name {name!r} is used twice (or is the reserved 'out')")
        if kind not in KINDS:
            raise ConfigError(f"{where}: stage {name!r} has kind {kind!r}; kinds: {', '.join(KINDS)}")
        refs = sorted(_refs(t) - {"out"})
        missing = [r for r in refs if r not in {s.name for s in stages}]
        if missing:
            raise ConfigError(f"{where}: stage {name!r} names {{{missing[0]}}}, which is not an earlier stage")
        stages.append(Stage(name, kind, t, float(minutes), refs))
    if not stages:
        raise ConfigError(f"{where}: no [[stage]] tables")
    return stages


def status(recipe: Recipe) -> dict[str, str]:
    """Each stage: "done", "changed" (done with other settings), "partial" (started) or "todo"."""
    prints, out = recipe.fingerprints(), {}
    for st in recipe.stages:
        d = recipe.out_dir / st.name
        if (d / DONE).is_file():
            out[st.name] = "done" if json.loads((d / DONE).read_text()).get("fingerprint") == prints[st.name] \
                else "changed"
        else:
            out[st.name] = "partial" if d.is_dir() and any(d.iterdir()) else "todo"
    return out


def run(recipe: Recipe, redo: tuple[str, ...] = (), only: str | None = None, progress: bool = True) -> dict:
    """Run what is not done, in order (``only``: that stage alone, once the ones before it are done); returns
    {stage: "skipped" | "ran"}."""
    from tqdm import tqdm

    names = [s.name for s in recipe.stages]
    for n in (*redo, *([only] if only else [])):
        if n not in names:
            raise ConfigError(f"no stage {n!r} in recipe {recipe.name} (stages: {', '.join(names)})")
    redo_all = set(redo)
    for st in recipe.stages:  # what reads a stage run again runs again too
        if redo_all & set(st.refs):
            redo_all.add(st.name)
    for n in redo_all:
        shutil.rmtree(recipe.out_dir / n, ignore_errors=True)
    state, prints, paths = status(recipe), recipe.fingerprints(), recipe.paths()
    changed = [n for n, s in state.items() if s == "changed"]
    if only is not None:
        missing = [n for n in names[:names.index(only)] if state[n] != "done"]
        if missing:
            raise ConfigError(f"--only {only}: stage {missing[0]!r} before it is not done")
    if changed:
        raise ConfigError(f"stage {changed[0]!r} finished with other settings (or an earlier stage it reads "
                          f"changed): pass --redo {changed[0]} to run it again")
    todo = [s for s in recipe.stages if state[s.name] != "done" and (only is None or s.name == only)]
    budget = sum(s.minutes for s in todo)
    bar = tqdm(total=budget, desc=recipe.name, unit="min", disable=not progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} budgeted min [{elapsed}<{remaining}]")
    result = {}
    try:
        for st in recipe.stages:
            if st not in todo:
                result[st.name] = "skipped"
                continue
            out = recipe.out_dir / st.name
            out.mkdir(parents=True, exist_ok=True)
            bar.set_postfix_str(st.name)
            start = time.time()
            KINDS[st.kind](_fill(st.settings, {**paths, "out": str(out.resolve())}), out)
            marker = {"fingerprint": prints[st.name], "kind": st.kind, "settings": st.settings,
                      "seconds": round(time.time() - start, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            tmp = out / f".{DONE}.tmp"
            tmp.write_text(json.dumps(marker, indent=1))
            tmp.replace(out / DONE)  # last, and atomic: a stage killed before this line is not done
            result[st.name] = "ran"
            bar.update(st.minutes)
    finally:
        bar.close()
    return result


# -- herd recipe ----------------------------------------------------------------------------------------------
DESCRIPTION = __doc__.split("\n\n")[0].replace("``", "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="the recipe TOML ([recipe] and [[stage]] tables)")
    p.add_argument("--redo", action="append", default=[], metavar="STAGE",
                   help="run this finished stage again (repeatable)")
    p.add_argument("--only", metavar="STAGE", help="run only this stage (the earlier ones must be done)")
    p.add_argument("--list", action="store_true", help="print each stage's state and exit")
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    recipe = Recipe.load(args.recipe)
    if args.list:
        for st, s in status(recipe).items():
            print(f"{st:24s} {s}")
        return 0
    for name, what in run(recipe, tuple(args.redo), args.only, progress=not args.no_progress).items():
        print(f"{name}: {what}")
    return 0
