"""Bring your own TorchRL pieces: a stock collector and a stock prioritized buffer in the
trainer (with checkpoint and resume), errors naming what a piece lacks, and the D2R actor
and critic under TorchRL's stock ``SACLoss``."""
import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import MultiSyncCollector
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, TensorDictPrioritizedReplayBuffer, TensorDictReplayBuffer
from torchrl.objectives import SACLoss, SoftUpdate

from d2r_torchrl.data.replay import TaskStratifiedSampler, random_transitions
from d2r_torchrl.modules import make_actor, make_critic
from d2r_torchrl.modules.actor_critic import ROUTE_KEY
from d2r_torchrl.training import builders
from d2r_torchrl.training.checkpointing import ResumeError
from d2r_torchrl.training.components import ComponentError, check_batch
from d2r_torchrl.training.trainer import MultiTaskTrainer
from test_resume import small_config as small_resume_config

TASKS = ("reach-v3", "push-v3")


def small_config(tmp_path, name: str):
    """The small two-task run of ``test_resume`` (3 rounds of 10 steps per task, 1 warm-up
    round, 2 updates per round: 4 updates) with room for all 60 transitions."""
    return small_resume_config(tmp_path, name, "buffer.capacity=1000")


def stock_prioritized_buffer(path, capacity: int = 60) -> TensorDictPrioritizedReplayBuffer:
    return TensorDictPrioritizedReplayBuffer(
        alpha=0.6, beta=0.4, storage=LazyMemmapStorage(capacity, scratch_dir=path), batch_size=8, priority_key="td_error"
    )


def test_trainer_runs_a_stock_multi_sync_collector_built_over_its_actor(tmp_path):
    config = small_config(tmp_path, "multi_sync")
    trainer = MultiTaskTrainer(config)
    factories = [builders.env_factory(config, (task,), first_task_id=i) for i, task in enumerate(TASKS)]
    collector = MultiSyncCollector(
        factories, trainer.actor, frames_per_batch=20, total_frames=-1, auto_register_policy_transforms=False
    )
    sent = []
    send = collector.update_policy_weights_
    collector.update_policy_weights_ = lambda *args, **kwargs: (sent.append(trainer.counters.updates), send(*args, **kwargs))[1]
    trainer.train(collector)
    assert (trainer.counters.frames, trainer.counters.updates) == (60, 4)
    assert sent == [2, 4]  # after each round's updates
    stored = trainer.buffer[:]
    assert torch.bincount(stored["task_id"], minlength=2).tolist() == [30, 30]  # both workers' tasks
    assert (stored[ROUTE_KEY].sum(-1) == 7).all()  # D2R routes of the trainer's actor (1 + 2 * 3)
    timings = trainer.run_dir / "scalars" / "time"
    for phase in ("collect", "extend", "updates", "sample"):  # logged per batch by the trainer
        rows = (timings / f"{phase}.csv").read_text().split()
        assert len(rows) == (3 if phase in ("collect", "extend") else 2) and all(float(r.split(",")[1]) > 0 for r in rows)


def test_stock_prioritized_memmap_buffer_trains_checkpoints_and_resumes(tmp_path):
    trainer = MultiTaskTrainer(small_config(tmp_path, "stock_buffer"), buffer=stock_prioritized_buffer(tmp_path / "a"))
    seen, betas = [], []
    update_fn = trainer._update_fn

    def observed_update(batch):
        seen.append(batch.get("priority_weight").clone())
        betas.append(trainer.buffer.sampler.beta)
        return update_fn(batch)

    trainer._update_fn = observed_update
    tree_before = [trainer.buffer.sampler._sum_tree[i] for i in range(60)]
    trainer.train()
    assert trainer.counters.updates == 4 and len(seen) == 4
    # beta 0.4 -> 1 over the 40 frames after the 20 warm-up frames: rounds 2 and 3 end at 40 and 60
    assert betas == pytest.approx([0.7, 0.7, 1.0, 1.0])
    assert all(weight.shape == (8,) and (weight > 0).all() and (weight <= 1).all() for weight in seen)
    tree_after = [trainer.buffer.sampler._sum_tree[i] for i in range(60)]
    assert tree_after != tree_before  # TD errors became priorities

    with pytest.raises(ResumeError, match="replay buffer of its own.*TensorDictPrioritizedReplayBuffer"):
        MultiTaskTrainer.resume(tmp_path / "stock_buffer")
    with pytest.raises(ResumeError, match="Pass one of the same class"):
        MultiTaskTrainer.resume(tmp_path / "stock_buffer", buffer=stock_prioritized_buffer(tmp_path / "b", capacity=80))
    resumed = MultiTaskTrainer.resume(tmp_path / "stock_buffer", buffer=stock_prioritized_buffer(tmp_path / "c"))
    assert len(resumed.buffer) == len(trainer.buffer) == 60
    saved, restored = trainer.buffer[:], resumed.buffer[:]
    for key in ("observation", "action", ("next", "reward")):
        assert torch.equal(saved[key], restored[key]), key
    assert [resumed.buffer.sampler._sum_tree[i] for i in range(60)] == tree_after


def test_pieces_that_cannot_serve_the_trainer_are_refused_before_any_work(tmp_path):
    config = small_config(tmp_path, "refused")
    unsized = TensorDictReplayBuffer(storage=LazyTensorStorage(100))
    with pytest.raises(ComponentError, match="no batch size"):
        MultiTaskTrainer(config, buffer=unsized)
    small = TensorDictReplayBuffer(storage=LazyTensorStorage(20), batch_size=8)
    with pytest.raises(ComponentError, match="not more than the 20 warm-up frames"):
        MultiTaskTrainer(config, buffer=small)
    wrong_key = TensorDictPrioritizedReplayBuffer(alpha=0.6, beta=0.4, storage=LazyTensorStorage(100), batch_size=8)
    wrong_key.priority_key = "priority"
    with pytest.raises(ComponentError, match="priority_key='td_error'"):
        MultiTaskTrainer(config, buffer=wrong_key)
    with pytest.raises(ComponentError, match="must be a torchrl.data.ReplayBuffer"):
        MultiTaskTrainer(config, buffer=[])
    for sampler_tasks, capacity, message in (
        (3, 120, "built for 3 tasks"),
        (2, 101, "capacity 101 must be a multiple"),
        (2, 120, r"build it with writer=TaskWriter\(2\)"),  # TorchRL's round-robin writer
    ):
        per_task = TensorDictReplayBuffer(
            sampler=TaskStratifiedSampler(sampler_tasks), storage=LazyTensorStorage(capacity), batch_size=12
        )
        with pytest.raises(ComponentError, match=message):
            MultiTaskTrainer(config, buffer=per_task)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ComponentError, match="lacks update_policy_weights_, shutdown"):
        MultiTaskTrainer(config).train(iter([]))


def test_a_batch_without_the_stored_keys_or_with_foreign_task_ids_is_named():
    batch = TensorDict(observation=torch.zeros(4, 39), task_id=torch.zeros(4, dtype=torch.long), batch_size=[4])
    with pytest.raises(ComponentError, match=r"lacks \['action', \('next', 'observation'\)"):
        check_batch(batch, 2)
    full = batch.update(
        {"action": torch.zeros(4, 4), "next": {"observation": torch.zeros(4, 39), "reward": torch.zeros(4, 1),
                                               "task_id": torch.zeros(4, dtype=torch.long),
                                               "done": torch.zeros(4, 1, dtype=torch.bool),
                                               "terminated": torch.zeros(4, 1, dtype=torch.bool)}}
    )
    full["task_id"] = torch.tensor([0, 1, 2, 1])
    with pytest.raises(ComponentError, match="task ids 0..2; this run has 2 tasks"):
        check_batch(full, 2)
    full["task_id"] = torch.tensor([0, 1, 1, 1])
    check_batch(full, 2)


def test_d2r_actor_and_critic_train_under_stock_sac_loss_on_one_task():
    torch.manual_seed(0)
    spec = builders.policy_specs(builders.env_factory(small_config("/tmp", "x"), ("reach-v3",))())[1]
    actor = make_actor("d2r", 39, spec, num_tasks=1, num_modules=4, module_width=16)
    critic = make_critic("d2r", 39, spec.shape[-1], num_tasks=1, num_modules=4, module_width=16)
    loss = SACLoss(actor, critic, num_qvalue_nets=2)
    loss.set_vmap_randomness("different")  # D2R critics sample routes
    loss.make_value_estimator(gamma=0.99)
    target = SoftUpdate(loss, tau=0.005)
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-3)
    batch = random_transitions(actor, 1, 64, 39, generator=torch.Generator().manual_seed(1))
    critic_losses = []
    for _ in range(30):
        losses = loss(batch.clone())
        total = losses["loss_actor"] + losses["loss_qvalue"] + losses["loss_alpha"]
        optimizer.zero_grad()
        total.backward()
        grads = {name: p.grad for name, p in loss.named_parameters() if p.requires_grad}
        assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
        assert any("router" in name and g is not None and g.abs().sum() > 0 for name, g in grads.items())
        optimizer.step()
        target.step()
        critic_losses.append(float(losses["loss_qvalue"]))
    assert critic_losses[-1] < 0.5 * critic_losses[0]  # the D2R critics fit the fixed batch's targets
