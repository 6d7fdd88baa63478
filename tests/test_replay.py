"""The per-task prioritized sampler against direct computations of PER's probabilities,
weights and the priority cap, and its round trip through TorchRL's buffer and checkpoints."""
import pytest
import torch
from tensordict import TensorDict

from d2r_torchrl.data.replay import annealed_beta, make_replay_buffer, per_task_median, stratified_tasks

pytest.importorskip("torchrl._torchrl")

T, ROWS, ALPHA, BETA = 3, 8, 0.6, 0.4


def filled_buffer(max_priority_ratio=None, capacity=T * ROWS, batch_size=T * 4000):
    """A stratified-prioritized buffer holding ``ROWS`` transitions of each of ``T`` tasks in
    their own slots (position ``p``: task ``p % T``, value ``x = p``)."""
    buffer = make_replay_buffer(
        "stratified_prioritized", capacity=capacity, batch_size=batch_size, num_tasks=T,
        priority_alpha=ALPHA, priority_beta=BETA, max_priority_ratio=max_priority_ratio,
    )
    positions = torch.arange(T * ROWS)
    buffer.extend(TensorDict(task_id=positions % T, x=positions.float(), batch_size=[T * ROWS]))
    return buffer


def test_per_task_median_matches_torch_median_per_group():
    values = torch.tensor([5.0, 1.0, 9.0, 2.0, 7.0, 3.0, 4.0])
    task = torch.tensor([0, 1, 0, 1, 0, 2, 1])
    medians = per_task_median(values, task, 4)
    assert medians[:3].tolist() == [torch.tensor([5.0, 9.0, 7.0]).median().item(), 2.0, 3.0]
    assert torch.isnan(medians[3])


def test_every_task_gets_its_share_and_probabilities_follow_priorities_within_the_task():
    torch.manual_seed(0)
    buffer = filled_buffer()
    priority = torch.arange(1, T * ROWS + 1, dtype=torch.float32)  # position p has priority p + 1
    buffer.update_priority(torch.arange(T * ROWS), priority)
    batch = buffer.sample()
    counts = torch.bincount(batch["task_id"], minlength=T)
    assert counts.tolist() == [4000] * T
    assert torch.equal(batch["task_id"], batch["x"].long() % T)  # the index maps back to the storage
    frequency = torch.bincount(batch["index"], minlength=T * ROWS).float() / 4000
    q = (priority.double() + 1e-8) ** ALPHA
    expected = torch.cat([q[task::T] / q[task::T].sum() for task in range(T)])
    observed = torch.cat([frequency[task::T] for task in range(T)])
    assert torch.allclose(observed.double(), expected, atol=0.025)  # ~3.5 standard errors


def test_importance_weights_are_per_task_normalised_powers_of_the_probabilities():
    torch.manual_seed(1)
    buffer = filled_buffer()
    priority = torch.rand(T * ROWS) * 5 + 0.1
    buffer.update_priority(torch.arange(T * ROWS), priority)
    batch = buffer.sample()
    q = (priority.double() + 1e-8) ** ALPHA
    index = batch["index"]
    task_min = torch.stack([q[task::T].min() for task in range(T)])
    expected = (q[index] / task_min[index % T]) ** -BETA
    assert torch.allclose(batch["priority_weight"].double(), expected, rtol=1e-5)
    # PER's (n P(i))^-beta over its largest value in the task is the same number
    n = ROWS
    per = (n * q[index] / torch.stack([q[task::T].sum() for task in range(T)])[index % T]) ** -BETA
    largest = torch.stack([(n * q[task::T] / q[task::T].sum()).min() ** -BETA for task in range(T)])
    assert torch.allclose(batch["priority_weight"].double(), per / largest[index % T], rtol=1e-5)


def test_an_extreme_td_error_is_capped_at_the_ratio_times_the_task_median():
    torch.manual_seed(2)
    ratio = 10.0
    buffer = filled_buffer(max_priority_ratio=ratio)
    td_error = torch.ones(T * ROWS)
    td_error[3] = 1e6  # task 0: one blown-up transition among median-1 ones
    buffer.update_priority(torch.arange(T * ROWS), td_error)
    batch = buffer.sample()
    frequency = torch.bincount(batch["index"], minlength=T * ROWS).float() / 4000
    share = (ratio ** ALPHA) / (ratio ** ALPHA + (ROWS - 1))  # capped one against 7 at the median
    assert abs(frequency[3].item() - share) < 0.03
    assert frequency[3] < 0.4  # uncapped it would take ~100% of task 0's samples
    # the other tasks are untouched: uniform within them
    assert torch.allclose(frequency[1::T], torch.full((ROWS,), 1 / ROWS), atol=0.03)


def test_new_transitions_enter_at_their_own_tasks_cap():
    torch.manual_seed(6)
    ratio = 10.0
    buffer = filled_buffer(max_priority_ratio=ratio, capacity=T * (ROWS + 1))
    td_error = torch.ones(T * ROWS)
    td_error[0::T] = 1000.0  # task 0 works at a thousand times task 1's scale
    buffer.update_priority(torch.arange(T * ROWS), td_error)
    new = torch.arange(T * ROWS, T * (ROWS + 1))
    buffer.extend(TensorDict(task_id=new % T, x=new.float(), batch_size=[T]))
    batch = buffer.sample()
    frequency = torch.bincount(batch["index"], minlength=T * (ROWS + 1)).float() / 4000
    share = ratio ** ALPHA / (ratio ** ALPHA + ROWS)  # the new task-1 row against 8 at the median
    assert abs(frequency[new[1]].item() - share) < 0.03  # TorchRL's global maximum (1000) would give ~0.9
    assert buffer.sampler.task_cap.tolist() == [ratio * 1000.0, ratio, ratio]


def test_sampled_batches_update_their_own_transitions_through_the_buffer():
    torch.manual_seed(3)
    buffer = filled_buffer(batch_size=T * 2)
    batch = buffer.sample()
    batch.set("td_error", torch.full((T * 2,), 50.0))
    buffer.update_tensordict_priority(batch)
    sampler = buffer.sampler
    tree = torch.tensor([sampler._sum_tree[i] for i in range(T * ROWS)])
    updated = sampler.tree_index(batch["index"].unique())
    expected = torch.full((T * ROWS,), 1.0)  # new transitions: TorchRL's default priority 1
    expected[updated] = (50.0 + 1e-8) ** ALPHA
    assert torch.allclose(tree, expected.float(), rtol=1e-5)


def test_state_dict_round_trip_keeps_the_distribution():
    buffer = filled_buffer()
    buffer.update_priority(torch.arange(T * ROWS), torch.rand(T * ROWS, generator=torch.Generator().manual_seed(4)))
    restored = filled_buffer()
    restored.load_state_dict(buffer.state_dict())
    torch.manual_seed(5)
    first = buffer.sample()
    torch.manual_seed(5)
    second = restored.sample()
    assert torch.equal(first["index"], second["index"])
    assert torch.equal(first["priority_weight"], second["priority_weight"])


def test_stratified_tasks_and_bad_shapes_are_reported():
    assert stratified_tasks(filled_buffer()) == T
    assert stratified_tasks(make_replay_buffer("uniform", capacity=6, batch_size=2, num_tasks=T)) is None
    with pytest.raises(ValueError, match="multiple of the 3 tasks"):
        filled_buffer().sample(7)
    with pytest.raises(ValueError, match="max_priority_ratio must be >= 1"):
        filled_buffer(max_priority_ratio=0.5)


def test_annealed_beta_is_linear_and_clamped():
    assert annealed_beta(0.4, 1.0, -1.0) == 0.4
    assert annealed_beta(0.4, 1.0, 0.5) == pytest.approx(0.7)
    assert annealed_beta(0.4, 1.0, 2.0) == 1.0
