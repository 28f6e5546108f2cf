"""Verifiable tasks (herd.post.tasks) and `herd eval tasks` (herd.eval.tasks): pass@k, determinism, reference
answers, the pictures of the shapes task, user JSONL tasks, and the evaluation end to end on tiny models."""

import itertools
import json
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest

import herd
from herd.cli import main
from herd.errors import HerdError
from herd.eval.tasks import Graded, evaluate_tasks, grade, pass_at_k, summarise
from herd.infer.engine import Completion
from herd.post.tasks import TASKS, Item, get_task, split_specs
from herd.post.tasks.base import parse_spec
from herd.post.tasks.shakespeare import load_plays
from herd.post.tasks.shapes import COLOURS


def _load(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a preset has random weights: that is the point here
        return herd.load(name)


# -- pass@k ---------------------------------------------------------------------------------------------------------
def test_pass_at_k_is_the_combinatorial_definition():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    n, c, k = 5000, 7, 400  # C(5000, 400) overflows a float many times over
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9)
    assert pass_at_k(100_000, 1, 1) == pytest.approx(1e-5, rel=1e-9)
    assert pass_at_k(10, 3, 8) == 1.0  # every 8-subset holds a pass
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_summarise_per_task_and_difficulty():
    def row(d, scores):
        return Graded(Item("t", [], "", d), [""] * len(scores), scores)

    graded = {"t": [row(1, [1.0, 0.0, 0.0, 0.0]), row(1, [0.0] * 4), row(2, [1.0, 1.0, 0.5, 0.5])]}
    r = summarise(graded, k=2)
    t = r["tasks"]["t"]
    assert r["k"] == 2 and r["samples"] == 4 and t["n"] == 3
    assert t["by_difficulty"]["1"]["pass@1"] == pytest.approx(0.125)
    assert t["by_difficulty"]["1"]["pass@k"] == pytest.approx(pass_at_k(4, 1, 2) / 2)
    assert t["by_difficulty"]["2"]["pass@1"] == pytest.approx(0.5)  # 0.5 scores do not pass at threshold 1
    assert t["by_difficulty"]["2"]["mean_score"] == pytest.approx(0.75)
    assert summarise(graded, k=2, threshold=0.5)["tasks"]["t"]["by_difficulty"]["2"]["pass@1"] == 1.0
    assert r["pass@1"] == t["pass@1"] == pytest.approx((0.25 + 0 + 0.5) / 3)


# -- built-in tasks -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TASKS))
def test_items_are_deterministic_and_references_score_one(name):
    task = get_task(name)
    items = task.items(8, seed=3)
    assert items == get_task(name).items(8, seed=3)
    assert items != task.items(8, seed=4)
    assert sorted({i.difficulty for i in items}) == list(task.levels)[:8]  # no difficulty: every level in turn
    assert all(i.task == name and i.prompt[-1]["role"] == "user" for i in items)
    assert [task.score(i, i.answer) for i in items] == [1.0] * 8
    assert [task.score(i, "") for i in items] == [0.0] * 8
    assert all(i.difficulty == 2 for i in task.items(3, difficulty=2, seed=0))


def test_arithmetic():
    task = get_task("arithmetic")
    for d in range(1, 5):
        for item in task.items(6, difficulty=d, seed=d):
            a, b, op = item.meta["a"], item.meta["b"], item.meta["op"]
            assert all(len(str(x)) == d for x in (a, b)) and f"{a} {op} {b}" in item.prompt[0]["content"]
            assert int(item.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
            assert task.score(item, f"{a} {op} {b} = {int(item.answer) + 1}") == 0.0
            assert task.score(item, f"First {a}, then: the result is {item.answer}.") == 1.0
    assert {i.difficulty for i in get_task("arithmetic:digits=3").items(4)} == {3}
    assert {i.meta["op"] for i in get_task("arithmetic:ops=*").items(6)} == {"*"}
    big = Item("arithmetic", [], "12345678987654321", 9)
    assert task.score(big, "it is 12,345,678,987,654,321") == 1.0
    assert task.score(big, "12345678987654320") == 0.0  # exact beyond float precision


def test_shakespeare_plays_and_tasks():
    hamlet, tempest = load_plays()
    assert (hamlet.title, tempest.title) == ("Hamlet", "The Tempest")
    assert hamlet.counts.most_common(1)[0][0] == "Hamlet" and hamlet.counts["Horatio"] > 100  # "Ham.", "Hor."
    assert tempest.counts["Prospero"] > 100
    assert not any(line.startswith("[") for p in (hamlet, tempest) for _, lines in p.speeches for line in lines)

    speaker = get_task("speaker")
    for item in speaker.items(12, seed=1):
        opts = item.meta["options"]
        assert len(opts) == item.difficulty + 1 and item.answer in opts
        play = hamlet if item.meta["play"] == "Hamlet" else tempest
        line = item.prompt[0]["content"].split('"')[1]
        assert any(s == item.answer and line in lines for s, lines in play.speeches)
        other = next(o for o in opts if o != item.answer)
        assert speaker.score(item, other) == 0.0
        assert speaker.score(item, f"{item.answer} or {other}") == 0.0
        assert speaker.score(item, f"It is {item.answer.upper()}.") == 1.0

    play = get_task("play")
    for item in play.items(9, seed=1):
        right = hamlet if item.answer == "Hamlet" else tempest
        wrong = tempest if right is hamlet else hamlet
        assert item.meta["character"] in right.counts and item.meta["character"] not in wrong.counts
        assert play.score(item, wrong.title) == 0.0 and play.score(item, "Tempest" if right is tempest else "Hamlet")

    next_line = get_task("next_line")
    for d, context in ((1, 4), (2, 2), (3, 1)):
        item = next_line.items(1, difficulty=d, seed=5)[0]
        assert len(item.prompt[0]["content"].split("\n\n", 1)[1].split("\n")) == context
        words = item.answer.split()
        near = " ".join(words[:-1] + ["zounds"])
        assert 0.5 <= next_line.score(item, near + "\nand more") < 1.0  # partial credit; only the first line counts
        assert next_line.score(item, "\n" + item.answer.upper() + "\nnext") == 1.0


def _play(title: str, speakers: list[str]) -> str:
    speeches = [f"{speakers[i % len(speakers)].upper()}.\nLine {i} of {title}, spoken well.\nAnd one more line."
                for i in range(24)]
    return f"{title.upper()}\n\nDRAMATIS PERSONAE\n\n" + "\n".join(speakers) + "\n\n\n" + "\n\n".join(speeches)


def test_shakespeare_corpus_option(tmp_path):
    (tmp_path / "alpha_gut.txt").write_text(_play("Alpha", ["Anna", "Boris"]))
    (tmp_path / "beta_gut.txt").write_text(_play("Beta", ["Carlo", "Dora"]))
    (tmp_path / "sonnets_gut.txt").write_text("SONNETS\n\nShall I compare thee\nto a summer's day?\n")  # skipped
    items = get_task(f"play:corpus={tmp_path}").items(6, seed=0)
    assert {i.answer for i in items} == {"Alpha", "Beta"}
    assert all({"Alpha": ("Anna", "Boris"), "Beta": ("Carlo", "Dora")}[i.answer].count(i.meta["character"])
               for i in items)
    with pytest.raises(HerdError, match="no plays"):
        get_task(f"speaker:corpus={tmp_path / 'nowhere'}").items(1)


def test_instruction_constraints():
    task = get_task("instruction")
    for item in task.items(9, seed=2):
        assert len(item.meta["constraints"]) == item.difficulty
        assert item.prompt[0]["role"] == "system"
    item = Item("instruction", [], "", 3, {"constraints": {"words": 3, "capitals": True, "json": "answer"}})
    assert task.score(item, '{"answer": "ONE TWO THREE"}') == 1.0
    assert task.score(item, '```json\n{"answer": "ONE, TWO - THREE!"}\n```') == 1.0
    assert task.score(item, '{"answer": "one two three"}') == pytest.approx(2 / 3)
    assert task.score(item, "ONE TWO THREE") == pytest.approx(2 / 3)  # not JSON; the rest holds
    assert task.score(item, '{"reply": "ONE TWO THREE"}') == 0.0  # the wrong key: the whole reply is checked
    assert task.score(item, "no") == 0.0
    words = Item("instruction", [], "", 1, {"constraints": {"words": 5}})
    assert task.score(words, "a b c d e") == 1.0 and task.score(words, "a b c d") == 0.0


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an array of (y, x)."""
    seen, out = np.zeros_like(mask), []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1] and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        out.append(np.array(pixels))
    return out


def test_shapes_pictures_show_the_answer():
    task = get_task("shapes")
    items = task.items(10, seed=0)
    assert {i.meta["question"] for i in items} == {"count", "colour"}
    for item in items:
        image, text = item.prompt[0]["content"]
        pixels = np.asarray(image["image"])
        shapes = []  # (kind, colour) read back from the pixels alone
        for comp in _components((pixels != 255).any(-1)):
            ys, xs = comp[:, 0], comp[:, 1]
            fill = len(comp) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # square 1, circle pi/4, triangle 1/2
            kind = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
            (rgb,) = {tuple(int(v) for v in pixels[y, x]) for y, x in comp}  # one flat colour per shape
            shapes.append((kind, next(n for n, c in COLOURS.items() if c == rgb)))
        assert len(shapes) == 2 * item.difficulty
        kind = item.meta["kind"]
        assert f" {kind}" in text["text"]
        if item.meta["question"] == "count":
            assert item.answer == str(sum(k == kind for k, _ in shapes))
            assert task.score(item, f"I see {int(item.answer) + 1}") == 0.0
        else:
            (colour,) = [c for k, c in shapes if k == kind]
            assert item.answer == colour
            other = next(c for c in COLOURS if c != colour)
            assert task.score(item, other) == 0.0 and task.score(item, f"{colour} and {other}") == 0.0
    count = next(i for i in items if i.meta["question"] == "count")
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    assert task.score(count, f"There are {words[int(count.answer)]} of them.") == 1.0


def test_digits_pictures_show_the_answer():
    task = get_task("digits")
    items = task.items(24, seed=0)
    assert {i.meta["question"] for i in items} == {"number", "colour"}
    for item in items:
        image, text = item.prompt[0]["content"]
        image = image["image"]
        assert image.mode == "RGB" and image.size == (336, 336)
        pixels = np.asarray(image)
        ink = (pixels != 255).any(-1)
        ys, xs = np.nonzero(ink)
        assert len(ys) > 50  # not blank
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == item.meta["box"]  # the number, whole
        assert {tuple(int(v) for v in p) for p in pixels[ink]} == {COLOURS[item.meta["colour"]]}  # one flat colour
        number = item.meta["text"]
        assert len(number) == item.difficulty and (number == "0" or not number.startswith("0"))
        if item.meta["question"] == "number":
            assert item.answer == number and "What number" in text["text"]
            assert task.score(item, f"The number is {number}.") == 1.0
            assert task.score(item, str(int(number) + 1)) == 0.0
        else:
            assert item.answer == item.meta["colour"] and "colour" in text["text"]
            other = next(c for c in COLOURS if c != item.answer)
            assert task.score(item, f"It is {item.answer.upper()}.") == 1.0
            assert task.score(item, other) == 0.0 and task.score(item, f"{item.answer} or {other}") == 0.0
    for d in range(1, 5):
        assert {len(i.meta["text"]) for i in task.items(6, difficulty=d, seed=d)} == {d}
    assert task.items(4, seed=9) == get_task("digits").items(4, seed=9)


def test_shapes_through_a_vision_model():
    llm = _load("tiny-vision")
    item = get_task("shapes").items(1, seed=0)[0]
    ids, pixels = llm.chat_inputs(item.prompt)
    v = llm.config.vision
    assert pixels.shape == (1, 3, v.image_size, v.image_size)  # 336 px: one tile, no rescaling
    assert ids.count(llm.config.image_token_id) == v.tokens_per_tile
    report = evaluate_tasks(llm, ["shapes"], n=2, max_new_tokens=2)
    assert report["tasks"]["shapes"]["n"] == 2 and 0.0 <= report["pass@1"] <= 1.0
    with pytest.raises(HerdError, match="no vision"):
        evaluate_tasks(_load("tiny"), ["shapes"], n=1)


# -- user tasks -----------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*skipped bad records")  # every new task of the file warns; checked once
def test_jsonl_tasks_matchers_reward_and_bad_lines(tmp_path, monkeypatch):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Italy?"}]
    lines = [json.dumps({"prompt": "Capital of France?", "answer": "Paris", "id": 1}),
             json.dumps({"prompt": chat, "answer": "Rome", "difficulty": 2}),
             "not json", json.dumps({"answer": "no prompt"}), "[1, 2]", ""]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"skipped bad records: 2 invalid_json \(line 3, line 5\); 1 bad_record "
                                         r"\(line 4\)"):
        items = get_task(str(path)).items(10)
    assert sorted(i.answer for i in items) == ["Paris", "Rome"]
    by = {i.answer: i for i in items}
    assert by["Paris"].prompt == [{"role": "user", "content": "Capital of France?"}] and by["Paris"].meta["id"] == 1
    assert by["Rome"].prompt == chat and by["Rome"].difficulty == 2
    assert [i.answer for i in get_task(str(path)).items(0, difficulty=2)] == ["Rome"]

    paris = by["Paris"]
    normalised = get_task(str(path))
    assert normalised.score(paris, "  paris. ") == 1.0 and normalised.score(paris, "Lyon") == 0.0
    exact = get_task(f"{path}:matcher=exact")
    assert exact.score(paris, " Paris\n") == 1.0 and exact.score(paris, "paris") == 0.0

    num = tmp_path / "num.jsonl"
    num.write_text(json.dumps({"prompt": "pi?", "answer": 3.14159}) + "\n")
    (pi,) = get_task(f"{num}:matcher=numeric:tolerance=0.01").items(1)
    assert get_task(f"{num}:matcher=numeric:tolerance=0.01").score(pi, "about 3.14") == 1.0
    assert get_task(f"{num}:matcher=numeric").score(pi, "about 3.14") == 0.0
    assert get_task(f"{num}:matcher=numeric").score(pi, "3.14159") == 1.0

    rx = tmp_path / "rx.jsonl"
    rx.write_text(json.dumps({"prompt": "ok?", "answer": r"^(yes|y)\b"}) + "\n" +
                  json.dumps({"prompt": "bad", "answer": "("}) + "\n")
    with pytest.warns(UserWarning, match=r"1 bad_regex \(line 2\)"):
        (yes,) = get_task(f"{rx}:matcher=regex").items(5)
    regex = get_task(f"{rx}:matcher=regex")
    assert regex.score(yes, "yes, indeed") == 1.0 and regex.score(yes, "eyes") == 0.0

    (tmp_path / "myreward.py").write_text(
        "seen = []\n"
        "def fn(prompt, completion, answer):\n"
        "    seen.append(prompt)\n"
        "    return 2.0 if answer.lower() in completion.lower() else -1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = get_task(f"{path}:reward=myreward:fn")
    assert reward.score(by["Rome"], "ROME!") == 1.0 and reward.score(paris, "Nice") == 0.0  # clipped to [0, 1]
    import myreward

    assert myreward.seen == [chat, "Capital of France?"]  # the record's prompt as written
    with pytest.raises(HerdError, match="cannot import"):
        get_task(f"{path}:reward=myreward:nope")
    with pytest.raises(HerdError, match="unknown matcher"):
        get_task(f"{path}:matcher=fuzzy")
    with pytest.raises(FileNotFoundError):
        get_task(str(tmp_path / "missing.jsonl"))


def test_specs():
    assert parse_spec("a.jsonl:reward=pkg.mod:fn:matcher=exact") == ("a.jsonl", {"reward": "pkg.mod:fn",
                                                                                 "matcher": "exact"})
    assert parse_spec("arithmetic:digits=3:ops=+-") == ("arithmetic", {"digits": 3, "ops": "+-"})
    assert split_specs(" arithmetic, speaker:difficulty=2 ,") == ["arithmetic", "speaker:difficulty=2"]
    assert {i.difficulty for i in get_task("speaker:difficulty=2").items(3)} == {2}
    for bad, message in (("arithmetic:bogus=1", "unknown option"), ("nosuchtask", "unknown task"),
                         ("arithmetic:ops=/", "ops must be"), ("arithmetic:3", "key=value")):
        with pytest.raises(HerdError, match=message):
            get_task(bad)


# -- evaluation -----------------------------------------------------------------------------------------------------
TEXT_TASKS = ["arithmetic", "next_line", "speaker", "play", "instruction"]


def test_grade_with_reference_completions_passes_everything():
    tasks = {name: get_task(name) for name in TASKS}
    report = summarise(grade(lambda items, s: [[i.answer] * s for i in items], tasks, n=6, samples=3,
                             progress=False), k=2)
    assert report["pass@1"] == report["pass@k"] == 1.0
    assert all(t["mean_score"] == 1.0 and t["n"] == 6 for t in report["tasks"].values())


def test_evaluate_tasks_batches_samples_through_the_engine(monkeypatch):
    llm = _load("tiny")
    specs = [*TEXT_TASKS, "arithmetic:digits=5"]
    answers = {}
    for spec in specs:
        for item in get_task(spec).items(3, seed=7):
            answers.setdefault(tuple(llm.chat_inputs(item.prompt)[0]), item.answer)
    calls = []

    def generate(prompts, params, images):  # the reference answer of each prompt
        calls.append((len(prompts), params.seed, params.temperature))
        if params.temperature > 0:  # samples=2: the copies of a prompt in a row
            assert all(prompts[i] == prompts[i + 1] for i in range(0, len(prompts), 2))
        return [Completion(p, [], answers[tuple(p)], "stop_token") for p in prompts]

    monkeypatch.setattr(llm.engine, "generate", generate)
    report = evaluate_tasks(llm, specs, n=3, samples=2, temperature=0.7, seed=7, batch=4)
    assert report["pass@1"] == report["pass@k"] == 1.0 and report["k"] == report["samples"] == 2
    assert set(report["tasks"]) == set(specs)
    assert all(rows == 4 for rows, _, _ in calls[:-1]) and len(calls) == math.ceil(len(specs) * 3 / 2)
    assert [seed for _, seed, _ in calls] == [7 + 4 * i for i in range(len(calls))]  # no seed used twice

    calls.clear()
    with pytest.warns(UserWarning, match="greedy"):
        report = evaluate_tasks(llm, ["arithmetic"], n=2, samples=4, temperature=0.0, seed=7, batch=8)
    assert report["samples"] == 1 and calls[0][0] == 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks") / "tiny"
    assert main(["new", "tiny", str(d), "--seed", "0"]) == 0
    return d


def test_cli_eval_tasks_json(capsys, tiny_dir, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"prompt": f"{a} + {a}?", "answer": 2 * a}) for a in range(3)) + "\n")
    specs = f"arithmetic:digits=2,instruction,{qa}:matcher=numeric"
    capsys.readouterr()
    assert main(["eval", "tasks", str(tiny_dir), "--tasks", specs, "--n", "2", "--samples", "2",
                 "--temperature", "1.0", "--max-new-tokens", "4", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"pass@1", "pass@k", "tasks"} and list(out["tasks"]) == split_specs(specs)
    for t in out["tasks"].values():
        assert t["k"] == 2 and t["n"] == 2 and set(t) >= {"pass@1", "pass@k", "mean_score", "by_difficulty"}
        for s in [t, *t["by_difficulty"].values()]:
            assert all(0.0 <= s[key] <= 1.0 for key in ("pass@1", "pass@k", "mean_score"))
    assert main(["eval", "tasks", str(tiny_dir), "--tasks", "arithmetic", "--n", "1", "--max-new-tokens", "2",
                 "--no-progress"]) == 0
    assert "mean over tasks" in capsys.readouterr().out
    assert main(["eval", "tasks", str(tiny_dir), "--tasks", "nosuchtask"]) == 2
    assert "unknown task" in capsys.readouterr().err
