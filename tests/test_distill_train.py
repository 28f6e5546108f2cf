"""Distillation inside herd's trainer: ``[distill] teacher = MODEL_OR_RUN`` (online, codistillation from a run that
is still training) and ``teacher_cache`` per data source (offline); weight 0 is plain training, resume is exact,
a teacher of another tokenizer is refused before training, a half-written or vanishing teacher checkpoint is
never read."""

import json
import shutil
import warnings

import pytest
import torch
from conftest import PICO, check_resume_is_exact, text_recipe

from herd.errors import ConfigError
from herd.train import teacher as teacher_module
from herd.train.config import from_dict
from herd.train.distill_cache import write_cache
from herd.train.trainer import Trainer

TINY = {"preset": "tiny", "n_layers": 2, "vocab_size": 6144, "bos_token_id": 4096, "eos_token_id": [4097, 4103, 4104],
        "pad_token_id": 4114}  # herd-pico's tokenizer: 6144 ids, so that a full-vocabulary cache stays small
TOKENIZER = {"path": str(PICO / "tokenizer.model")}


def recipe(tmp_path, name, **sections):
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    r = text_recipe(d, model=TINY, tokenizer=TOKENIZER, **sections)
    (d / "a.txt").write_text("the king and the queen speak of love and death. " * 20)
    return r


def trainer(r, resume=False, **train):
    r = {**r, "train": {**r["train"], **train}}
    return Trainer(from_dict(r), resume=resume, progress=False)


def losses(run_dir, key="loss"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r.get(key) for r in rows if "loss" in r]  # None: not logged at that step (no teacher yet)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A teacher trained by herd for 2 steps (a run directory with checkpoints at steps 1 and 2)."""
    tmp = tmp_path_factory.mktemp("teacher")
    trainer(recipe(tmp, "t"), ckpt_every=1, keep_checkpoints=5, steps=2).fit()
    return tmp / "t" / "run"


def test_online_teacher_weight_zero_is_plain_training_and_weight_half_distils(tmp_path, teacher_run):
    trainer(recipe(tmp_path, "plain")).fit()
    trainer(recipe(tmp_path, "zero", distill={"teacher": str(teacher_run), "alpha": 0.0})).fit()
    assert losses(tmp_path / "zero" / "run") == losses(tmp_path / "plain" / "run")
    half = trainer(recipe(tmp_path, "half", distill={"teacher": str(teacher_run), "alpha": 0.5,
                                                     "divergence": "jsd", "temperature": 2.0}))
    assert half.teacher.path == teacher_run / "checkpoints" / "step_00000002" / "model"  # the newest
    half.fit()
    assert losses(tmp_path / "half" / "run") != losses(tmp_path / "plain" / "run")
    assert all(s > 0 for s in losses(tmp_path / "half" / "run", "soft"))
    assert losses(tmp_path / "half" / "run", "alpha") == [0.5, 0.5]
    assert "[distill]" in (tmp_path / "half" / "run" / "run.toml").read_text()


def test_a_teacher_with_another_tokenizer_is_refused_before_training(tmp_path, teacher_run):
    r = recipe(tmp_path, "s", distill={"teacher": str(teacher_run)})
    r["tokenizer"] = {}  # the Llama 4 tokenizer, 202048 ids
    r["model"] = {"preset": "tiny", "n_layers": 2, "vocab_size": 202048}
    with pytest.raises(ConfigError, match="tokenizer|vocab") as e:
        trainer(r)
    assert "student" in str(e.value) and "teacher" in str(e.value)


def test_resume_with_an_online_teacher_is_exact(tmp_path, teacher_run):
    # a fixed weight: a schedule over train.steps would differ in the shorter first run by design
    r = recipe(tmp_path, "r", distill={"teacher": str(teacher_run), "alpha": 0.7, "divergence": "reverse_kl"})

    def make(out, steps, resume=False):
        return trainer({**r, "train": {**r["train"], "out_dir": str(out)}}, resume=resume, steps=steps,
                       ckpt_every=2)

    check_resume_is_exact(make, tmp_path, keys=("loss", "soft", "alpha"))


def test_codistillation_follows_the_teacher_run_and_never_reads_half_a_checkpoint(tmp_path, monkeypatch):
    teacher_recipe = recipe(tmp_path, "t")
    trainer(teacher_recipe, steps=1, ckpt_every=1).fit()
    teacher_dir = tmp_path / "t" / "run"
    student = trainer(recipe(tmp_path, "s", distill={"teacher": str(teacher_dir), "reload_every": 1}), steps=3)
    assert student.teacher.path.parent.name == "step_00000001"
    # the teacher trains on; a save in progress (its hidden temporary directory) is not a checkpoint
    trainer(teacher_recipe, resume=True, steps=2, ckpt_every=1).fit()
    partial = teacher_dir / "checkpoints" / ".step_00000003.tmp" / "model"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{ half written")
    student.train_step()
    assert student.teacher.path.parent.name == "step_00000002"
    # a checkpoint that vanishes while it is read (rotation) leaves the current teacher in place
    shutil.rmtree(partial.parent)
    trainer(teacher_recipe, resume=True, steps=3, ckpt_every=1).fit()

    def vanished(*a, **k):
        raise FileNotFoundError("model.safetensors: gone")

    monkeypatch.setattr(teacher_module.checkpoint, "load", vanished)
    with pytest.warns(UserWarning, match="keeping .*step_00000002"):
        student.train_step()
    assert student.teacher.path.parent.name == "step_00000002"
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        student.train_step()
    assert student.teacher.path.parent.name == "step_00000003"


def test_distilling_from_a_cache_trains_and_resumes_exactly(tmp_path, teacher_run):
    plain = trainer(recipe(tmp_path, "p"), steps=1)
    plain.fit()
    shards = tmp_path / "p" / "run" / "data"
    (shard_dir,) = [p for p in shards.iterdir() if p.is_dir()]
    write_cache(teacher_run / "checkpoints" / "step_00000002" / "model", shard_dir, tmp_path / "cache", top_k=8,
                seq_len=32, progress=False)
    r = recipe(tmp_path, "c", distill={"alpha": 0.5})
    r["data"]["sources"] = [{"shards": str(shard_dir), "teacher_cache": str(tmp_path / "cache")}]

    def make(out, steps, resume=False):
        return trainer({**r, "train": {**r["train"], "out_dir": str(out)}}, resume=resume, steps=steps,
                       ckpt_every=2)

    whole, _ = check_resume_is_exact(make, tmp_path, keys=("loss", "soft"))
    assert whole.teacher is None and all(s > 0 for s in losses(tmp_path / "a", "soft"))


def test_mutual_codistillation_two_runs_teach_each_other(tmp_path):
    a_run, b_run = tmp_path / "a" / "run", tmp_path / "b" / "run"
    ra = recipe(tmp_path, "a", distill={"teacher": str(b_run), "reload_every": 1, "alpha": 0.5})
    rb = recipe(tmp_path, "b", distill={"teacher": str(a_run), "reload_every": 1, "alpha": 0.5})
    # a starts before b exists: the data alone (the paper's burn-in), the losses of a plain run
    with pytest.warns(UserWarning, match="no checkpoint yet"):
        a = trainer(ra, steps=2, ckpt_every=1)
    assert a.teacher.model is None
    a.fit()
    trainer(recipe(tmp_path, "p"), steps=2).fit()
    assert losses(a_run) == losses(tmp_path / "p" / "run")
    b = trainer(rb, steps=2, ckpt_every=1)
    assert b.teacher.path == a_run / "checkpoints" / "step_00000002" / "model"
    b.fit()
    assert all(s > 0 for s in losses(b_run, "soft"))
    a = trainer(ra, resume=True, steps=4, ckpt_every=1)
    assert a.teacher.model is None  # as it was at a's checkpoint, although b has saved since
    a.fit()  # its next look (step 2) finds b's newest
    assert a.teacher.path == b_run / "checkpoints" / "step_00000002" / "model"
    soft = losses(a_run, "soft")
    assert soft[:2] == [None, None] and all(s > 0 for s in soft[2:])


def test_resume_before_the_other_run_saved_waits_for_the_next_look(tmp_path):
    other = tmp_path / "x" / "run"
    r = recipe(tmp_path, "s", distill={"teacher": str(other), "reload_every": 2, "alpha": 0.5})
    with pytest.warns(UserWarning, match="no checkpoint yet"):
        trainer(r, steps=1, ckpt_every=1).fit()
    trainer(recipe(tmp_path, "x"), steps=1).fit()
    s = trainer(r, resume=True, steps=3)
    assert s.step == 1 and s.teacher.model is None
    s.train_step()  # step 1: no look (every 2 steps), still the data alone, as the uninterrupted run
    assert s.teacher.model is None
    s.train_step()
    assert s.teacher.path == other / "checkpoints" / "step_00000001" / "model"


def test_a_quantized_teacher_distils_close_to_the_full_one(tmp_path, teacher_run):
    from herd.infer.quantize import QuantLinear

    full = trainer(recipe(tmp_path, "f", distill={"teacher": str(teacher_run), "alpha": 0.5,
                                                  "teacher_dtype": "fp32"}))
    q = trainer(recipe(tmp_path, "q", distill={"teacher": str(teacher_run), "alpha": 0.5,
                                               "teacher_dtype": "fp32", "teacher_quantize": "int8"}))
    assert any(isinstance(m, QuantLinear) for m in q.teacher.model.modules())
    batch = q.loader.next_batch()
    exact, approx = full.teacher.targets(batch).logits, q.teacher.targets(batch).logits
    assert not torch.equal(exact, approx)
    err = (approx - exact).abs()
    assert err.mean() < 0.02 * exact.std() and err.max() < 0.1 * exact.std()  # int8 per-channel rounding
    q.fit()
    assert all(s > 0 for s in losses(tmp_path / "q" / "run", "soft"))
    with pytest.raises(ConfigError, match="teacher_quantize"):
        trainer(recipe(tmp_path, "bad", distill={"teacher": str(teacher_run), "teacher_quantize": "int3"}))
