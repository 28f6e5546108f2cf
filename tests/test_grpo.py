"""The GRPO-family loss (herd.post.grpo): advantages, clipping, KL, truncated IS and each normaliser equal the
formulas worked by hand; zero-advantage groups are found so they never reach the loss; loss and gradient equal
TRL's GRPOTrainer._compute_loss on the same model and completions, and the advantages equal TRL's."""

import math

import pytest
import torch

from herd.errors import ConfigError
from herd.post.grpo import GRPOSpec, group_advantages, grpo_loss, varied_groups

# two groups of 4: one mixed, one all equal (zero advantage)
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_advantages_by_hand():
    r = torch.tensor(REWARDS)
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735; A = +-0.5 / (0.57735 + 1e-4) = +-0.86588
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert a == pytest.approx(0.865875, abs=1e-6)
    torch.testing.assert_close(group_advantages(r, 4), torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    # "batch": the baseline stays the group's mean, the std is the batch's: sqrt((2 * 0.75^2 + 6 * 0.25^2) / 7)
    b = 0.5 / (math.sqrt(1.5 / 7) + 1e-4)
    assert b == pytest.approx(1.079890, abs=1e-6)
    torch.testing.assert_close(group_advantages(r, 4, "batch"), torch.tensor([b, -b, -b, b, 0, 0, 0, 0]))
    torch.testing.assert_close(group_advantages(r, 4, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    with pytest.raises(ValueError):
        group_advantages(r, 3)


def test_zero_advantage_groups_are_found():
    keep = varied_groups(torch.tensor(REWARDS), 4)
    assert keep.tolist() == [True] * 4 + [False] * 4
    # equal rewards whose float32 mean is not exact: rounding noise / 1e-4 would reach the loss as an advantage
    nines = torch.tensor([0.9, 0.9, 0.9, 0.0, 0.0, 1.0])
    assert group_advantages(nines, 3)[:3].abs().min() > 1e-4
    assert varied_groups(nines, 3).tolist() == [False] * 3 + [True] * 3
    assert varied_groups(torch.tensor([0.0, 0.0, 0.0, 1e-6]), 4).all()


# two completions; advantages +0.8 and -0.5; the second is one token shorter (its last position is padding)
ADV = [0.8, -0.5]
RATIOS = [[1.5, 0.6, 1.1], [0.5, 1.5, 1.0]]
MASK = [[1, 1, 1], [1, 1, 0]]


def _batch():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]], dtype=torch.float64)
    logps = (old + torch.tensor(RATIOS, dtype=torch.float64).log()).requires_grad_()
    return logps, old, torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK)


def test_clipped_loss_by_hand():
    # per token -min(r * A, clip(r, 0.8, 1.28) * A):
    #   A = +0.8: r = 1.5 clipped to 1.28 (the clip binds: above 1 + eps_high with A > 0), 0.6 and 1.1 not
    #   A = -0.5: r = 0.5 clipped to 0.8 (binds: below 1 - eps_low with A < 0), 1.5 not (min picks 1.5 * A)
    row0 = [-1.28 * 0.8, -0.6 * 0.8, -1.1 * 0.8]
    row1 = [-0.8 * -0.5, -1.5 * -0.5]
    total = sum(row0) + sum(row1)
    want = {"dapo": total / 5, "grpo": (sum(row0) / 3 + sum(row1) / 2) / 2, "dr_grpo": total / (2 * 4)}
    for loss_type, value in want.items():
        logps, old, adv, mask = _batch()
        loss, m = grpo_loss(logps, old, adv, mask, GRPOSpec(loss_type=loss_type), max_completion_length=4)
        assert loss.item() == pytest.approx(value, abs=1e-12), loss_type
        assert m["clip_high"].item() == pytest.approx(1 / 5) and m["clip_low"].item() == pytest.approx(1 / 5)
        assert m["clip_region"].item() == pytest.approx(2 / 5)
        assert m["ratio"].item() == pytest.approx((1.5 + 0.6 + 1.1 + 0.5 + 1.5) / 5)
    # dapo: d loss / d logp = -r * A / n_tokens where the clip does not bind, 0 where it does (and on padding)
    logps, old, adv, mask = _batch()
    grpo_loss(logps, old, adv, mask, GRPOSpec())[0].backward()
    want_grad = [[0.0, -0.6 * 0.8 / 5, -1.1 * 0.8 / 5], [0.0, 1.5 * 0.5 / 5, 0.0]]
    torch.testing.assert_close(logps.grad, torch.tensor(want_grad, dtype=torch.float64))
    # a global token count (all ranks and micro-batches of the step) makes this batch's loss its share
    loss, _ = grpo_loss(*_batch(), GRPOSpec(), n_tokens=20.0)
    assert loss.item() == pytest.approx(total / 20, abs=1e-12)
    loss, _ = grpo_loss(*_batch(), GRPOSpec(loss_type="grpo"), n_seqs=8)
    assert loss.item() == pytest.approx((sum(row0) / 3 + sum(row1) / 2) / 8, abs=1e-12)
    with pytest.raises(ValueError):  # dr_grpo needs the sampler's length limit, not the batch's padded length
        grpo_loss(*_batch(), GRPOSpec(loss_type="dr_grpo"))


def test_kl_and_truncated_importance_sampling_by_hand():
    old = _batch()[1]
    ref = old - 0.2  # ref - logp = -0.2 - log r
    rollout = old.clone()
    rollout[0, 0] -= math.log(3.0)  # pi_old / pi_rollout = 3: capped at 2
    rollout[1, 1] += math.log(4.0)  # = 0.25: kept (truncation is from above only)

    def k3(r):
        d = -0.2 - math.log(r)
        return math.exp(d) - d - 1

    weights = [[2.0, 1.0, 1.0], [1.0, 0.25]]
    pg = [[-1.28 * 0.8, -0.6 * 0.8, -1.1 * 0.8], [-0.8 * -0.5, -1.5 * -0.5]]
    ratios = [RATIOS[0], RATIOS[1][:2]]
    for unbiased in (True, False):
        kl = [[(r if unbiased else 1.0) * k3(r) for r in rs] for rs in ratios]  # k3, weighted by pi / pi_old
        spec = GRPOSpec(beta=0.1, tis_cap=2.0, unbiased_kl=unbiased)
        loss, m = grpo_loss(*_batch(), spec, ref_logps_BT=ref, rollout_logps_BT=rollout)
        # the IS weight multiplies the policy term only (as TRL), the KL is added after
        want = sum(w * p + 0.1 * k for ws, ps, ks in zip(weights, pg, kl) for w, p, k in zip(ws, ps, ks)) / 5
        assert loss.item() == pytest.approx(want, abs=1e-12)
        assert m["kl"].item() == pytest.approx(sum(map(sum, kl)) / 5)
        assert m["is_weight"].item() == pytest.approx((2 + 1 + 1 + 1 + 0.25) / 5)
        assert m["is_capped"].item() == pytest.approx(1 / 5)
    # the KL's gradient alone (zero advantages): weighted, log(pi / ref) * ratio = (0.2 + log r) * r, the
    # reverse KL's; unweighted, 1 - ref / pi = 1 - exp(-0.2) / r, the forward KL's
    for unbiased, dkl in ((True, lambda r: (0.2 + math.log(r)) * r), (False, lambda r: 1 - math.exp(-0.2) / r)):
        logps, old, _, mask = _batch()
        spec = GRPOSpec(beta=0.1, unbiased_kl=unbiased)
        loss, _ = grpo_loss(logps, old, torch.zeros(2, dtype=torch.float64), mask, spec, ref_logps_BT=ref)
        loss.backward()
        want_grad = [[0.1 * dkl(r) / 5 * k for r, k in zip(rs, ks)] for rs, ks in zip(RATIOS, MASK)]
        torch.testing.assert_close(logps.grad, torch.tensor(want_grad, dtype=torch.float64))
    # no cap: no weight; beta without the reference's log-probs is an error
    unweighted, _ = grpo_loss(*_batch(), GRPOSpec(tis_cap=None), rollout_logps_BT=rollout)
    assert unweighted.item() == pytest.approx(sum(map(sum, pg)) / 5, abs=1e-12)
    with pytest.raises(ValueError):
        grpo_loss(*_batch(), GRPOSpec(beta=0.1))


def test_spec_check():
    GRPOSpec().check()
    for bad in ({"epsilon_low": 1.0}, {"beta": -1.0}, {"scale_rewards": "std"}, {"loss_type": "bnpo"},
                {"tis_cap": 0.0}):
        with pytest.raises(ConfigError):
            GRPOSpec(**bad).check()


def _trl_trainer(base, tmp_path, **options):
    """TRL's GRPOTrainer on the tiny Llama 4 of ``base`` (CPU, fp32), rewarding completions with REWARDS_TRL."""
    from datasets import Dataset
    from transformers import AutoTokenizer, Llama4ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    hf = Llama4ForCausalLM.from_pretrained(base, dtype=torch.float32)
    # Llama4ForCausalLM names its backbone "language_model" (base_model_prefix, for loading multimodal checkpoints)
    # but holds it as .model, and TRL's fused LM head looks the backbone up by that prefix
    hf.base_model_prefix = "model"
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=6, report_to="none", use_cpu=True, bf16=False, router_aux_loss_coef=0.0,
                      **options)
    data = Dataset.from_list([{"prompt": "Say hello."}, {"prompt": "Count to three, please."}])
    trainer = GRPOTrainer(model=hf, reward_funcs=lambda completions, **_: REWARDS_TRL, args=args,
                          train_dataset=data, processing_class=AutoTokenizer.from_pretrained(base))
    if trainer.ref_model is not None:
        trainer.ref_model.base_model_prefix = "model"
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, which we do not run
    return trainer, [data[0]] * 4 + [data[1]] * 4


REWARDS_TRL = [1.0, 0.0, 0.25, 1.0, 0.5, 0.5, 0.5, 0.5]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(base, tmp_path, scale):
    pytest.importorskip("trl")
    trainer, prompts = _trl_trainer(base, tmp_path, scale_rewards=scale)
    torch.manual_seed(0)
    want = trainer._generate_and_score_completions(prompts)["advantages"]
    torch.testing.assert_close(group_advantages(torch.tensor(REWARDS_TRL), 4, scale), want)


@pytest.fixture(scope="module")
def trl_batch(base, tmp_path_factory):
    """One generation batch of TRL's (8 completions of 2 prompts, left-padded prompts), ragged completions."""
    pytest.importorskip("trl")
    trainer, prompts = _trl_trainer(base, tmp_path_factory.mktemp("gen"))
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(prompts)
    inputs["completion_mask"][1, 4:] = 0  # as if completions 1 and 5 had ended early
    inputs["completion_mask"][5, 2:] = 0
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    return inputs


@pytest.mark.parametrize("loss_type,beta,unbiased_kl,tis", [
    ("dapo", 0.0, True, False), ("grpo", 0.0, True, False), ("dr_grpo", 0.0, True, False),
    ("dapo", 0.04, True, False), ("dapo", 0.04, False, False), ("grpo", 0.04, True, True)])
def test_loss_and_gradient_equal_trl(base, tmp_path, trl_batch, loss_type, beta, unbiased_kl, tis):
    """TRL's _compute_loss and herd's grpo_loss on log-probs from the same forward of the same model: equal loss,
    equal gradients; old/reference/sampler log-probs drawn around the policy's so that both clips bind."""
    trainer, _ = _trl_trainer(base, tmp_path, loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28,
                              use_bias_correction_kl=unbiased_kl)
    hf, inputs = trainer.model, dict(trl_batch)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    mask, n_prompt = inputs["completion_mask"], inputs["prompt_ids"].shape[1]
    hf.train()
    logits = hf(input_ids=ids, attention_mask=attention).logits[:, n_prompt - 1:-1].float()
    logps = logits.log_softmax(-1).gather(-1, inputs["completion_ids"][..., None])[..., 0]
    g = torch.Generator().manual_seed(1)
    old = logps.detach() + 0.3 * torch.randn(logps.shape, generator=g)
    ref = logps.detach() + 0.3 * torch.randn(logps.shape, generator=g)
    rollout = old + 0.5 * torch.randn(logps.shape, generator=g)
    inputs["old_per_token_logps"] = old
    if beta:
        inputs["ref_per_token_logps"] = ref
    if tis:
        # TRL weights the loss only with vLLM (absent here; the loss reads the flag when called), by a ratio its
        # generation step computes; this is its "token_truncate" formula with herd's cap
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
        inputs["importance_sampling_ratio"] = torch.exp((old - rollout) * mask).clamp(max=2.0)
    spec = GRPOSpec(epsilon_low=0.2, epsilon_high=0.28, beta=beta, unbiased_kl=unbiased_kl, loss_type=loss_type)
    got, metrics = grpo_loss(logps, old, inputs["advantages"], mask, spec, ref_logps_BT=ref if beta else None,
                             rollout_logps_BT=rollout if tis else None, max_completion_length=6)
    params = [hf.model.layers[0].self_attn.q_proj.weight, hf.lm_head.weight]
    got_grads = torch.autograd.grad(got, params)
    want = trainer._compute_loss(hf, inputs)
    want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    assert metrics["clip_low"] > 0 and metrics["clip_high"] > 0  # both clips were exercised
    for name in ("low", "high", "region"):
        assert metrics[f"clip_{name}"].item() == pytest.approx(trainer._metrics["train"][f"clip_ratio/{name}_mean"][-1])
    if beta:
        assert metrics["kl"].item() == pytest.approx(trainer._metrics["train"]["kl"][-1], rel=1e-5)
