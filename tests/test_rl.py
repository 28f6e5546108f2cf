"""herd rl: rollouts from herd's engine, zero-advantage groups dropped, difficulty filtering by the policy's own
pass rate, mixed tasks with system prompts, exact resume, and a CI-sized run that learns a toy task."""

import json

import pytest
import torch
from conftest import check_resume_is_exact

from herd.cli import main
from herd.eval.tasks import Graded
from herd.post import rl as rl_module
from herd.post.rl import RLSpec, RLTrainer, Rollouts, rl_config

WORDS = "apple bread candle dragon eagle forest garden harbor island jungle kettle lemon".split()


@pytest.fixture(scope="module")
def letter_task(tmp_path_factory):
    """A toy task a random model can learn by RL alone: answer with one token containing "u" (about 5% of a
    random model's samples; no special token's text has one)."""
    path = tmp_path_factory.mktemp("rl") / "u.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say a word like {w}.", "answer": "u"}) + "\n" for w in WORDS))
    return f"{path}:matcher=regex"


def _overrides(**rl):
    base = {"prompts_per_step": 4, "max_new_tokens": 1, "pool_size": 12, "heldout": 12, "filter_samples": 8}
    return [x for k, v in {**base, **rl}.items() for x in (f"--rl.{k}", json.dumps(v))] + [
        "--train.tensorboard", "false"]


def test_rl_lifts_reward_on_a_learnable_task(base, letter_task, tmp_path, capsys):
    out = tmp_path / "rl"
    assert main(["rl", str(base), "--tasks", letter_task, "--out", str(out), "--steps", "25", "--group-size", "8",
                 "--lr", "3e-2", "--json", *_overrides(filter=False)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"out", "steps", "reward_first", "reward_last", "heldout_pass@1_before",
                           "heldout_pass@1_after"}
    assert result["reward_first"] <= 0.2 and result["reward_last"] >= 0.8, result
    assert result["heldout_pass@1_after"] > result["heldout_pass@1_before"]
    assert (out / "config.json").is_file() and (out / "TRAINING.md").is_file()


def test_zero_advantage_groups_never_reach_the_loss(base, letter_task, tmp_path):
    trainer = RLTrainer(rl_config(base, [letter_task], tmp_path / "z", steps=2, overrides=_overrides(filter=False)),
                        progress=False)
    batch = trainer.loader.next_batch()
    advantages = batch["advantages"].view(-1, 8)
    assert advantages.shape[0] == 4 and bool((advantages != 0).any(1).all())  # every group has a signal
    assert trainer.loader.last["groups_dropped"] > 0  # at a ~5% success rate most groups are all wrong
    assert bool((batch["loss_mask"].sum(1) >= 1).all())  # every row trains on its answer token


def test_difficulty_filter_keeps_pass_rates_in_the_open_band(monkeypatch, letter_task):
    """A round keeps exactly the candidates whose estimated pass rate lies in (0, tau]."""
    spec = RLSpec(tasks=[letter_task], pool_size=12, filter_samples=4, tau=0.5, system_prompts=[])
    loader = Rollouts(spec, seed=0, max_len=64)
    rate = {w: i % 5 / 4 for i, w in enumerate(WORDS)}  # 0, .25, .5, .75, 1, 0, ...

    def fake_sample(items, samples, stream):
        out = []
        for item in items:
            right = round(rate[item.prompt[-1]["content"].split()[-1].rstrip(".")] * samples)
            out.append(Graded(item, [], [1.0] * right + [0.0] * (samples - right)))
        return out

    monkeypatch.setattr(loader, "_sample", fake_sample)
    loader._new_round()
    kept = {loader.pool[i].prompt[-1]["content"].split()[-1].rstrip(".") for i in loader.queue}
    assert kept == {w for w in WORDS if 0 < rate[w] <= 0.5}
    assert loader.last["round_kept"] == len(kept) and loader.last["round_too_hard"] == 3


def test_mixed_tasks_by_weight_with_system_prompts():
    spec = RLSpec(tasks=["arithmetic", "shapes"], task_weights=[3.0, 1.0], pool_size=400,
                  system_prompts=["Be brief.", "Think first."])
    pool = Rollouts(spec, seed=0, max_len=64).candidates(0)
    shapes = sum(item.meta["spec"] == "shapes" for item in pool)
    assert 70 <= shapes <= 130  # a quarter of 400
    assert all(item.prompt[0] == {"role": "system", "content": item.prompt[0]["content"]} for item in pool)
    assert {item.prompt[0]["content"] for item in pool} == {"Be brief.", "Think first."}
    assert any(isinstance(m["content"], list) for item in pool for m in item.prompt)  # shapes bring pictures
    assert [i.prompt for i in Rollouts(spec, seed=0, max_len=64).candidates(0)] == [i.prompt for i in pool]


def test_resume_is_exact(base, letter_task, tmp_path):
    """Stopped at step 2 and resumed, a filtered RL run's rewards, losses and weights are the uninterrupted
    run's: the round's pool and queue are in the checkpoint, the sampling seeds follow the step."""
    def cfg(out, steps):
        return rl_config(base, [letter_task], out, steps=steps, lr=1e-2,
                         overrides=[*_overrides(), "--train.ckpt_every", "2", "--optim.schedule", "constant"])


    check_resume_is_exact(lambda out, steps, resume=False: RLTrainer(cfg(out, steps), resume=resume, progress=False),
                          tmp_path, keys=("loss", "reward"))


def test_bad_settings_are_named(base, tmp_path):
    from herd.errors import ConfigError

    with pytest.raises(ConfigError, match="no tasks"):
        rl_config(base, [], tmp_path / "x", steps=2)
    with pytest.raises(ConfigError, match="give the number of RL steps"):
        rl_config(base, ["arithmetic"], tmp_path / "x")
    with pytest.raises(ConfigError, match="rl.task_weights"):
        rl_config(base, ["arithmetic"], tmp_path / "x", steps=2, overrides=["--rl.task_weights", "[1, 2]"])
    with pytest.raises(ConfigError, match="temperature"):
        rl_config(base, ["arithmetic"], tmp_path / "x", steps=2, overrides=["--rl.temperature", "0.0"])
    assert rl_module.SYSTEM_PROMPTS


@pytest.mark.parametrize("lag", [0, 2])
def test_policy_lag_is_exact_and_resume_keeps_the_batches_made_ahead(base, letter_task, tmp_path, lag):
    """Rollouts of step k come from the weights after step max(0, k - lag), whatever the thread timing; a
    checkpoint keeps the batches made ahead of the trainer, so a resumed async run is the uninterrupted one."""
    def make(out, steps, resume=False):
        cfg = rl_config(base, [letter_task], out, steps=steps, lr=1e-2,
                        overrides=[*_overrides(lag=lag), "--train.ckpt_every", "2", "--optim.schedule", "constant"])
        return RLTrainer(cfg, resume=resume, progress=False)

    whole, _ = check_resume_is_exact(make, tmp_path, keys=("loss", "reward", "policy_lag"))
    lags = [r["policy_lag"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]
    assert lags == [min(k, lag) for k in range(4)]
    if lag:
        assert (tmp_path / "b" / "checkpoints" / "step_00000002" / "rollouts.pt").is_file()


def test_kill_9_then_resume_continues_the_same_run(base, letter_task, tmp_path):
    """herd rl killed with SIGKILL after its first checkpoint, then --resume: the run ends as an uninterrupted
    one does (the checkpoint is whole or absent; what was made after it is made again, the same way)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["rl", str(base), "--tasks", letter_task, "--steps", "6", "--group-size", "8", "--lr", "1e-2",
            "--no-progress", *_overrides(), "--train.ckpt_every", "2", "--optim.schedule", "constant"]
    # every run in a process of its own: the same torch thread count (an earlier test may have changed this
    # process's), so the same float reductions
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-m", "herd.cli", *args, "--out", str(tmp_path / "whole")], env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "herd.cli", *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step_00000002").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([sys.executable, "-m", "herd.cli", *args, "--out", str(killed), "--resume"], env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=300)

    def rows(run):
        return {r["step"]: (r["loss"], r["reward"]) for r in
                map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}

    assert rows(killed) == rows(tmp_path / "whole") and sorted(rows(killed)) == list(range(1, 7))


def test_lora_rl_trains_adapters_and_exports_them(base, letter_task, tmp_path, capsys):
    """--lora: only the adapted weights move (the merged model's lm_head and embeddings are the base's), and
    OUT_DIR gets the merged model and the PEFT adapter. (Learning itself is the full-weights test's: on this toy
    LoRA leaves the random lm_head alone, and whether the greedy answer flips within a short run is a coin toss.)"""
    from herd import checkpoint

    out = tmp_path / "lora"
    assert main(["rl", str(base), "--tasks", letter_task, "--out", str(out), "--steps", "6", "--group-size", "8",
                 "--lr", "1e-2", "--lora", "8", "--json", *_overrides(filter=False)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 6 and (out / "adapter" / "adapter_config.json").is_file()
    tuned, original = checkpoint.load(out), checkpoint.load(base)
    assert torch.equal(tuned.lm_head.weight, original.lm_head.weight)
    assert torch.equal(tuned.embed_tokens.weight, original.embed_tokens.weight)
    assert not torch.equal(tuned.layers[0].self_attn.q_proj.weight, original.layers[0].self_attn.q_proj.weight)
