"""PPO with --lora on one base model: the actor and the critic are two adapters on the policy's base (the critic's
value head beside its adapter), the reference is the base with both switched off; one backward reaches both
adapters, gradient checkpointing recomputes each under its own adapter, resume and the saved policy work, and
--value-model starts the critic from a reward model."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune.cli import main
from tests.conftest import PAIRS, write_jsonl
from tests.test_online import LENGTH_REWARD, args_for, files, rows_of  # noqa: F401  (files: the fixture)

LORA = ("--lora", "--lora-r", "4")


def ppo_run(tmp_path, model_dir, files, *extra, lora: bool = True):  # noqa: F811
    from preftune.cli import build_config, build_parser
    from preftune.recipes import ppo

    argv = args_for("ppo", model_dir, files, tmp_path / "run", "--num-ppo-epochs", "1", "--max-steps", "1",
                    "--rollout-batch-size", "4", "--num-generations", "2", "--warmup-ratio", "0",
                    *(LORA if lora else ()), *LENGTH_REWARD, *extra)
    return ppo.setup(build_config(build_parser().parse_args(argv)))


def adapter_weights(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The LoRA weights of adapter `name`, keyed without the adapter's name (so two adapters' keys match)."""
    return {key.replace(f".{name}.", "."): p.detach().clone() for key, p in model.named_parameters()
            if f".lora_A.{name}." in key or f".lora_B.{name}." in key}


def one_step(run):
    from preftune.recipes import online

    rollout = online.collect(run, online.step_positions(run))
    run.objective.score(run, rollout)
    online.optimise(run, rollout)
    return rollout


def base_model_values(model_dir, run, rollout) -> torch.Tensor:
    """V(s_t) of a critic built apart from the run: a fresh base with the run's critic adapter as its only adapter,
    its backbone's hidden states at the positions predicting each completion token, times the run's value head."""
    from peft import get_peft_model, set_peft_model_state_dict

    from preftune.forward.rollout import per_token, sample_rows
    from preftune.recipes.ppo import CRITIC_ADAPTER

    policy = run.models.policy
    critic = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                            policy.peft_config[CRITIC_ADAPTER])
    set_peft_model_state_dict(critic, adapter_weights(policy, CRITIC_ADAPTER))
    batch = sample_rows(rollout.samples, run.tokenizer.pad_token_id, "cpu", "padded")
    with torch.no_grad():
        hidden = critic.base_model.model.model(input_ids=batch.input_ids,
                                               attention_mask=batch.attention_mask).last_hidden_state
        head = run.group.unwrap(run.model).critic.head.weight
        values = hidden[batch.token_rows, batch.token_predictors] @ head[0]
    return per_token(values, batch, len(rollout.samples), rollout.width)


def test_lora_ppo_holds_one_base_model_with_two_adapters(tmp_path, tiny_model_dir, files):  # noqa: F811
    from preftune.recipes.ppo import CRITIC_ADAPTER

    run = ppo_run(tmp_path, tiny_model_dir, files)
    try:
        trained = run.group.unwrap(run.model)
        embeddings = [m for m in trained.modules() if isinstance(m, torch.nn.Embedding)]
        assert len(embeddings) == 1  # one backbone: the critic has none of its own
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        frozen = sum(p.numel() for p in trained.parameters() if not p.requires_grad)
        assert frozen == sum(p.numel() for p in base.parameters())
        with run.models.reference_model() as reference:
            assert reference is run.models.policy  # the reference is the same model, adapters off
        assert set(run.models.policy.peft_config) == {"default", CRITIC_ADAPTER}
        # every trainable parameter is in the optimizer: both adapters and the value head
        in_optimizer = {id(p) for p in run.trainable}
        assert {id(p) for p in trained.parameters() if p.requires_grad} == in_optimizer
        assert trained.critic.head.weight.requires_grad and id(trained.critic.head.weight) in in_optimizer
    finally:
        run.logger.close()


def test_one_step_moves_both_adapters_and_the_reference_stays_the_base(tmp_path, tiny_model_dir, files):  # noqa: F811
    from preftune.forward.rollout import token_logps
    from preftune.recipes import online
    from preftune.recipes.ppo import CRITIC_ADAPTER, token_values

    run = ppo_run(tmp_path, tiny_model_dir, files)
    try:
        policy = run.models.policy
        before = {name: adapter_weights(policy, name) for name in ("default", CRITIC_ADAPTER)}
        head_before = run.group.unwrap(run.model).critic.head.weight.detach().clone()
        rollout = one_step(run)
        after = {name: adapter_weights(policy, name) for name in ("default", CRITIC_ADAPTER)}
        for name in before:  # each adapter's lora_B starts at 0 and moved: both got gradients in one backward
            moved = [k for k in before[name] if not torch.equal(before[name][k], after[name][k])]
            assert any(".lora_B." in k for k in moved), name
        assert not torch.equal(head_before, run.group.unwrap(run.model).critic.head.weight)
        assert any(not torch.equal(after["default"][k], after[CRITIC_ADAPTER][k]) for k in after["default"])
        assert policy.active_adapter == "default"  # sampling and saving see the policy's adapter
        pad, width = run.tokenizer.pad_token_id, rollout.width
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with torch.no_grad():
            with run.models.reference_model() as reference:
                reference_logps = token_logps(reference, rollout.samples, pad, width, "cpu")
            base_logps = token_logps(base, rollout.samples, pad, width, "cpu")
            policy_logps = token_logps(policy, rollout.samples, pad, width, "cpu")
            values = token_values(run.group.unwrap(run.model).critic, rollout.samples, pad, width)
        torch.testing.assert_close(reference_logps, base_logps, rtol=0, atol=1e-5)
        assert (policy_logps - base_logps).abs().max() > 1e-4  # the policy moved; its reference did not
        # the critic's values: the base with the critic adapter alone, and the value head
        torch.testing.assert_close(values, base_model_values(tiny_model_dir, run, rollout) * rollout.mask.bool(),
                                   rtol=1e-5, atol=1e-5)
        # the saved policy is the policy adapter alone, and it loads as the trained policy
        out = tmp_path / "saved"
        from preftune.models.load import save_model

        save_model(policy, run.tokenizer, out)
        assert not (out / CRITIC_ADAPTER).exists()
        assert not any(CRITIC_ADAPTER in key for key in load_file(out / "adapter_model.safetensors"))
        loaded = AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            torch.testing.assert_close(token_logps(loaded, rollout.samples, pad, width, "cpu"), policy_logps,
                                       rtol=0, atol=1e-5)
    finally:
        online.cleanup(run)


def test_gradient_checkpointing_recomputes_the_critic_under_its_adapter(tmp_path, tiny_model_dir, files):  # noqa: F811
    """The backward recomputes the critic's layers after the forward switched back to the policy's adapter: the
    same gradients as without checkpointing (recomputed under the policy's adapter, the critic's would differ)."""
    from preftune.recipes import online

    run = ppo_run(tmp_path, tiny_model_dir, files, "--gradient-checkpointing")
    try:
        rollout = online.collect(run, online.step_positions(run))
        run.objective.score(run, rollout)
        model = run.group.unwrap(run.model)
        grads = []
        for checkpointing in (True, False):
            if not checkpointing:
                model.policy.gradient_checkpointing_disable()
            loss, _ = run.objective.loss(run.model, rollout)
            loss.backward()
            grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
            model.zero_grad(set_to_none=True)
        assert any(".critic." in name for name in grads[1]) and grads[0].keys() == grads[1].keys()
        for name in grads[1]:
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7, msg=name)
    finally:
        online.cleanup(run)


def test_lora_ppo_resumes_to_the_same_adapters(tmp_path, tiny_model_dir, files):  # noqa: F811
    out = tmp_path / "run"
    args = args_for("ppo", tiny_model_dir, files, out, "--save-steps", "2", *LORA, *LENGTH_REWARD)
    assert main(args) == 0
    uninterrupted, metrics = load_file(out / "adapter_model.safetensors"), rows_of(out)
    critic = load_file(out / "checkpoint-4" / "model.safetensors")
    shutil.rmtree(out / "checkpoint-4")
    assert main([*args, "--resume"]) == 0
    resumed = load_file(out / "adapter_model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)
    again = load_file(out / "checkpoint-4" / "model.safetensors")
    assert any("critic" in name for name in critic)  # the critic's adapter and head are in the checkpoint
    assert all(torch.equal(critic[name], again[name]) for name in critic)
    assert [r.get("loss/value") for r in metrics] == [r.get("loss/value") for r in rows_of(out)]


def test_value_model_a_lora_reward_model_on_the_same_base_starts_the_critic_as_it(tmp_path, tiny_model_dir,
                                                                                   files):  # noqa: F811
    from peft import AutoPeftModelForSequenceClassification

    from preftune.forward.rollout import sample_rows
    from preftune.recipes.ppo import token_values

    reward_dir = tmp_path / "rm"
    data = write_jsonl(tmp_path / "rm-pairs.jsonl", PAIRS)
    assert main(["reward-model", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir",
                 str(reward_dir), "--max-steps", "2", "--learning-rate", "1e-2", "--report-to", "none",
                 *LORA]) == 0
    run = ppo_run(tmp_path, tiny_model_dir, files, "--value-model", str(reward_dir))
    try:
        from preftune.recipes import online

        rollout = online.collect(run, online.step_positions(run))
        pad = run.tokenizer.pad_token_id
        reward_model = AutoPeftModelForSequenceClassification.from_pretrained(str(reward_dir / "adapter"),
                                                                               num_labels=1)
        batch = sample_rows(rollout.samples, pad, "cpu", "padded")
        with torch.no_grad():
            values = token_values(run.group.unwrap(run.model).critic, rollout.samples, pad, rollout.width)
            model = reward_model.get_base_model()
            hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            scores = model.score(hidden[batch.token_rows, batch.token_predictors]).squeeze(-1)
        from preftune.forward.rollout import per_token

        torch.testing.assert_close(values, per_token(scores, batch, len(rollout.samples), rollout.width),
                                   rtol=1e-5, atol=1e-5)
        assert values.abs().max() > 0
    finally:
        online.cleanup(run)


def test_value_model_a_full_reward_model_gives_its_head(tmp_path, tiny_model_dir, files):  # noqa: F811
    from transformers import AutoModelForSequenceClassification

    reward_dir = tmp_path / "rm"
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    reward_model.save_pretrained(reward_dir)
    run = ppo_run(tmp_path, tiny_model_dir, files, "--value-model", str(reward_dir))
    try:
        head = run.group.unwrap(run.model).critic.head.weight
        assert torch.equal(head.detach(), reward_model.score.weight.detach())
        assert all(not p.any() for k, p in run.models.policy.named_parameters() if ".lora_B.critic." in k)
    finally:
        run.logger.close()


def test_value_model_a_lora_reward_model_on_another_base_is_refused(tmp_path, tiny_model_dir, tiny_ref_dir, files,  # noqa: F811
                                                                    capsys):
    reward_dir = tmp_path / "rm"
    data = write_jsonl(tmp_path / "rm-pairs.jsonl", PAIRS)
    assert main(["reward-model", "--model", str(tiny_ref_dir), "--data", str(data), "--output-dir",
                 str(reward_dir), "--max-steps", "1", "--report-to", "none", *LORA]) == 0
    out = tmp_path / "run"
    assert main(args_for("ppo", tiny_model_dir, files, out, "--value-model", str(reward_dir), *LORA,
                         *LENGTH_REWARD)) == 2
    assert "not on the policy's base" in capsys.readouterr().err


class SavedBytes:
    """The bytes autograd holds for backward (`torch.autograd.graph.saved_tensors_hooks`), live and at their peak:
    each storage counted once however many saved tensors view it (a weight the policy's and the critic's forwards
    both save counts once), released when the graph that saved it is freed."""

    def __init__(self) -> None:
        self.holders: dict[int, int] = {}  # storage pointer -> saved tensors holding it
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def pack(self, tensor: torch.Tensor) -> object:
        return SavedBytes.Held(self, tensor)

    @staticmethod
    def unpack(held: SavedBytes.Held) -> torch.Tensor:
        return held.tensor

    class Held:
        def __init__(self, counter: SavedBytes, tensor: torch.Tensor) -> None:
            self.counter, self.tensor = counter, tensor
            storage = tensor.untyped_storage()
            self.key = storage.data_ptr()
            if counter.holders.get(self.key, 0) == 0:
                counter.sizes[self.key] = storage.nbytes()
                counter.live += storage.nbytes()
                counter.peak = max(counter.peak, counter.live)
            counter.holders[self.key] = counter.holders.get(self.key, 0) + 1

        def __del__(self) -> None:
            self.counter.holders[self.key] -= 1
            if self.counter.holders[self.key] == 0:
                self.counter.live -= self.counter.sizes[self.key]


def peak_saved_bytes(compute) -> int:
    """The peak of `SavedBytes` while `compute()` runs (its forwards and backwards)."""
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, SavedBytes.unpack):
        compute()
    assert counter.live == 0  # every graph was freed by its backward
    return counter.peak


def scored_rollout(run):
    from preftune.recipes import online

    rollout = online.collect(run, online.step_positions(run))
    run.objective.score(run, rollout)
    return rollout


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_minibatch_holds_the_actors_or_the_critics_activations_never_both(tmp_path, tiny_model_dir, files,  # noqa: F811
                                                                             lora):
    """The loss's backward is taken in two terms, the policy's and then the critic's, the critic's forward running
    after the policy's graph is freed: what autograd holds at its peak is the larger of the two forwards', not
    their sum (measured alone: each forward's own, summed and backpropagated)."""
    from preftune.forward.rollout import token_logps
    from preftune.recipes import online
    from preftune.recipes.ppo import token_values

    run = ppo_run(tmp_path, tiny_model_dir, files, lora=lora)
    try:
        rollout = scored_rollout(run)
        trained, pad, width = run.group.unwrap(run.model), run.tokenizer.pad_token_id, rollout.width
        layout = run.config.train.batch_layout
        alone = {
            "policy": peak_saved_bytes(lambda: token_logps(trained.policy, rollout.samples, pad, width, "cpu",
                                                           layout).sum().backward()),
            "critic": peak_saved_bytes(lambda: token_values(trained.critic, rollout.samples, pad, width,
                                                            layout).sum().backward()),
        }
        run.model.zero_grad(set_to_none=True)
        minibatch = peak_saved_bytes(lambda: online.accumulate_gradients(
            run.objective, run.model, rollout, len(rollout.samples), run.group.accelerator, on_policy=True))
        assert min(alone.values()) > 0
        # the losses' own saved tensors are (B, T): a few hundred bytes here
        assert minibatch <= max(alone.values()) + 0.25 * min(alone.values()), (minibatch, alone)
    finally:
        online.cleanup(run)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_the_two_terms_gradients_add_up_to_the_joint_losss(tmp_path, tiny_model_dir, files, lora):  # noqa: F811
    """accumulate_gradients' two backwards (policy term, then vf_coef x value term) give the gradients, loss and
    metrics of one backward of the joint loss (policy + vf_coef x value), off-policy (after an update) and
    on-policy."""
    from preftune.recipes import online

    run = ppo_run(tmp_path, tiny_model_dir, files, lora=lora)
    try:
        rollout = scored_rollout(run)
        rollout.logps = rollout.logps - 0.1 * torch.rand_like(rollout.logps) * rollout.mask  # ratios not all 1
        for on_policy in (False, True):
            run.model.zero_grad(set_to_none=True)
            loss, metrics = run.objective.loss(run.model, rollout, on_policy=on_policy)
            loss.backward()
            joint = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
            run.model.zero_grad(set_to_none=True)
            value, split_metrics = online.accumulate_gradients(run.objective, run.model, rollout,
                                                               len(rollout.samples), run.group.accelerator,
                                                               on_policy=on_policy)
            split = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
            assert split.keys() == joint.keys() and any(".critic" in n or "critic." in n for n in split)
            for name in joint:
                torch.testing.assert_close(split[name], joint[name], rtol=1e-5, atol=1e-7, msg=name)
            assert value == pytest.approx(loss.item(), rel=1e-6)
            assert split_metrics == pytest.approx({k: float(v) for k, v in metrics.items()}, rel=1e-6)
    finally:
        online.cleanup(run)


def test_under_ddp_the_loss_is_one_term(tmp_path, tiny_model_dir, files):  # noqa: F811
    """A DDP-wrapped actor-critic takes one backward per forward: there the loss is the joint one, a single term
    (two backwards of one DDP forward would leave the critic's gradients unreduced and fail the next forward);
    its gradients equal the two terms' without DDP."""
    import torch.distributed as dist

    from preftune.recipes import online

    run = ppo_run(tmp_path, tiny_model_dir, files)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        rollout = scored_rollout(run)
        trained = run.group.unwrap(run.model)
        wrapped = torch.nn.parallel.DistributedDataParallel(trained)
        assert len(list(run.objective.loss_terms(wrapped, rollout))) == 1
        assert len(list(run.objective.loss_terms(trained, rollout))) == 2
        grads = []
        for model in (wrapped, trained, wrapped):  # a DDP forward after a DDP backward: its reduction finished
            model.zero_grad(set_to_none=True)
            online.accumulate_gradients(run.objective, model, rollout, len(rollout.samples),
                                        run.group.accelerator, on_policy=True)
            grads.append({n: p.grad.clone() for n, p in trained.named_parameters() if p.grad is not None})
        for name in grads[1]:
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)
    finally:
        dist.destroy_process_group()
        online.cleanup(run)
