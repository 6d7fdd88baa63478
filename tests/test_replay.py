"""The per-task prioritized sampler against direct computations of PER's probabilities,
weights and the priority cap, and its round trip through TorchRL's buffer and checkpoints."""
import warnings

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


def test_importance_weights_are_pers_divided_by_their_mean_in_each_task():
    torch.manual_seed(1)
    buffer = filled_buffer()
    priority = torch.rand(T * ROWS) * 5 + 0.1
    priority[0::T] *= 0.01  # task 0 holds far smaller priorities: PER's max-normalisation would shrink its weights
    buffer.update_priority(torch.arange(T * ROWS), priority)
    batch = buffer.sample()
    q = (priority.double() + 1e-8) ** ALPHA
    index, task = batch["index"], batch["index"] % T
    per = (ROWS * q[index] / torch.stack([q[t::T].sum() for t in range(T)])[task]) ** -BETA  # (n P(i))^-beta
    per_task_mean = torch.stack([per[task == t].mean() for t in range(T)])
    weight = batch["priority_weight"].double()
    assert torch.allclose(weight, per / per_task_mean[task], rtol=1e-5)
    assert torch.allclose(torch.stack([weight[task == t].mean() for t in range(T)]), torch.ones(T, dtype=torch.float64))


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


# --- whoever writes: TaskWriter puts every transition in its own task's slots ---------------


def task_batch(task_id, start=0.0):
    """Transitions with ``task_id`` (any shape) and a distinct value ``x`` each."""
    task_id = torch.as_tensor(task_id)
    x = torch.arange(task_id.numel(), dtype=torch.float32).view(task_id.shape) + start
    return TensorDict(task_id=task_id, x=x, batch_size=task_id.shape)


def held_values(buffer, task):
    """The ``x`` values task ``task`` holds (its slots ``k * T + task``, ``k`` < its count)."""
    count = int(buffer.writer.task_writes[task].clamp_max(buffer.storage.max_size // T))
    return sorted(buffer.storage[torch.arange(count) * T + task]["x"].tolist())


@pytest.mark.parametrize("kind", ["stratified", "stratified_prioritized"])
def test_a_task_major_batch_is_stored_per_task_and_sampled_in_equal_shares(kind):
    torch.manual_seed(7)
    buffer = make_replay_buffer(kind, capacity=T * 10, batch_size=T * 300, num_tasks=T)
    batch = task_batch(torch.arange(T).unsqueeze(1).expand(T, 4))  # [T, n], as a collector yields
    index = buffer.extend(batch)
    assert index.shape == (T, 4)
    assert buffer.writer.task_writes.tolist() == [4] * T and len(buffer) == T * 4
    for task in range(T):  # task t's values are 4t..4t+3, all in task t's slots
        assert held_values(buffer, task) == [4.0 * task + k for k in range(4)]
    sample = buffer.sample()
    assert sample.shape == (T * 300,)
    assert torch.bincount(sample["task_id"], minlength=T).tolist() == [300] * T
    assert torch.equal(sample["x"].long() // 4, sample["task_id"])  # each sample is its task's


@pytest.mark.parametrize("kind", ["stratified", "stratified_prioritized"])
def test_unequal_tasks_keep_their_own_ring_and_share_of_the_batch(kind):
    torch.manual_seed(8)
    buffer = make_replay_buffer(kind, capacity=T * 3, batch_size=T * 600, num_tasks=T)
    buffer.extend(task_batch([0, 0, 0, 0, 0, 1, 2, 2]))  # 5 of task 0 into its 3 slots
    buffer.extend(task_batch([1, 0], start=100.0))
    assert buffer.writer.task_writes.tolist() == [6, 2, 2]
    assert held_values(buffer, 0) == [3.0, 4.0, 101.0]  # its latest three
    assert held_values(buffer, 1) == [5.0, 100.0] and held_values(buffer, 2) == [6.0, 7.0]
    sample = buffer.sample()
    assert torch.bincount(sample["task_id"], minlength=T).tolist() == [600] * T
    for task, values in enumerate(([3.0, 4.0, 101.0], [5.0, 100.0], [6.0, 7.0])):
        drawn = sample["x"][sample["task_id"] == task]
        assert sorted(drawn.unique().tolist()) == values  # every held one, nothing else
        if kind == "stratified":  # uniform within the task
            assert all(abs((drawn == v).float().mean().item() - 1 / len(values)) < 0.08 for v in values)


def test_single_transitions_and_steps_added_one_at_a_time_land_in_their_task():
    buffer = make_replay_buffer("stratified", capacity=T * 4, batch_size=T, num_tasks=T)
    buffer.add(task_batch(torch.tensor(2)))  # one transition, batch []
    buffer.add(task_batch(torch.arange(T), start=10.0))  # one step of the T envs, batch [T]
    assert buffer.writer.task_writes.tolist() == [1, 1, 2]
    assert held_values(buffer, 2) == [0.0, 12.0] and held_values(buffer, 0) == [10.0]


def test_task_writer_records_its_last_write_as_torchrl_writers_do(tmp_path):
    """TorchRL's storage checkpointer reads the storage's last cursor (and warns that the
    buffer may not be saved properly when there is none)."""
    buffer = make_replay_buffer("stratified", capacity=T * 4, batch_size=T, num_tasks=T)
    buffer.extend(task_batch([0, 2, 2, 1]))  # task 1's first transition goes to slot 1
    assert buffer.storage._last_cursor_index == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        buffer.dumps(tmp_path / "checkpoint")
    assert not [w for w in caught if "last_cursor" in str(w.message)]


def test_sampling_with_a_task_still_empty_names_it():
    buffer = make_replay_buffer("stratified", capacity=T * 4, batch_size=T, num_tasks=T)
    buffer.extend(task_batch([1, 1]))
    with pytest.raises(RuntimeError, match=r"tasks \[0, 2\] hold no transition yet"):
        buffer.sample()
    prioritized = filled_buffer()
    prioritized.empty()
    with pytest.raises(RuntimeError, match=r"tasks \[0, 1, 2\] hold no transition yet"):
        prioritized.sample()


@pytest.mark.parametrize("kind", ["stratified", "stratified_prioritized"])
def test_a_task_id_outside_the_tasks_is_refused_and_nothing_is_stored(kind):
    buffer = make_replay_buffer(kind, capacity=T * 4, batch_size=T, num_tasks=T)
    buffer.extend(task_batch([0, 1, 2]))
    for bad in ([0, 3], [-1, 1]):
        with pytest.raises(ValueError, match=r"'task_id' holds \[-?\d\], outside the 3 tasks \[0, 3\); nothing was stored"):
            buffer.extend(task_batch(bad, start=50.0))
    assert buffer.writer.task_writes.tolist() == [1, 1, 1] and buffer.write_count == 3
    assert (buffer.storage[torch.arange(len(buffer))]["x"] < 50).all()
    with pytest.raises(KeyError, match="no 'task_id' entry"):
        buffer.extend(TensorDict(x=torch.zeros(2), batch_size=[2]))


@pytest.mark.parametrize("kind", ["uniform", "prioritized"])
def test_other_kinds_store_a_task_by_steps_batch_as_transitions(kind):
    buffer = make_replay_buffer(kind, capacity=40, batch_size=8, num_tasks=2)
    buffer.extend(task_batch(torch.arange(2).unsqueeze(1).expand(2, 5)))  # [T, steps], as Collector writes
    buffer.add(task_batch(torch.arange(2), start=10.0))  # one step, batch [T]
    assert len(buffer) == 12 and buffer.write_count == 12
    assert sorted(buffer[:]["x"].tolist()) == [*map(float, range(10)), 10.0, 11.0]
    assert buffer.sample().shape == (8,)


def test_a_per_task_sampler_without_the_task_writer_says_what_to_build():
    from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

    from d2r_torchrl.data.replay import TaskStratifiedSampler

    buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(6), sampler=TaskStratifiedSampler(T), batch_size=3)
    buffer.extend(task_batch([0, 1, 2]))
    with pytest.raises(RuntimeError, match=r"build the buffer with writer=TaskWriter\(3\)"):
        buffer.sample()


@pytest.mark.parametrize(
    "argument, value, message",
    [
        ("capacity", 0, "capacity must be a positive integer, got 0"),
        ("capacity", 2, "capacity 2 is less than one transition per task"),
        ("batch_size", -3, "batch_size must be a positive integer, got -3"),
        ("num_tasks", 0, "num_tasks must be a positive integer, got 0"),
        ("capacity", 1e6, "capacity must be a positive integer, got 1000000.0"),
        ("memmap_above", -1, "memmap_above must be an integer >= 0, got -1"),
        ("priority_alpha", float("nan"), "priority_alpha must be a finite number >= 0, got nan"),
        ("priority_beta", float("inf"), "priority_beta must be a finite number >= 0, got inf"),
        ("max_priority_ratio", float("inf"), "max_priority_ratio must be >= 1 and finite"),
    ],
)
def test_bad_buffer_arguments_are_named(argument, value, message):
    arguments = dict(capacity=30, batch_size=6, num_tasks=T)
    arguments[argument] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        make_replay_buffer("stratified", **arguments)


def test_new_transitions_added_without_priority_enter_at_their_tasks_cap():
    """``buffer.add`` makes TorchRL give the sampler its default priority for data without
    ``td_error``; the transition must still enter at its task's cap."""
    ratio = 10.0
    buffer = filled_buffer(max_priority_ratio=ratio, capacity=T * (ROWS + 1))
    td_error = torch.ones(T * ROWS)
    td_error[0::T] = 1000.0
    buffer.update_priority(torch.arange(T * ROWS), td_error)
    index = buffer.add(task_batch(torch.tensor(1), start=500.0))
    sampler = buffer.sampler
    assert int(index) == T * ROWS + 1  # task 1's slot ROWS
    assert sampler._sum_tree[int(sampler.tree_index(index))] == pytest.approx(ratio ** ALPHA, rel=1e-5)
    assert sampler.task_cap.tolist() == [ratio * 1000.0, ratio, ratio]


@pytest.mark.parametrize("kind", ["stratified", "stratified_prioritized"])
def test_writer_state_round_trips_and_writes_resume_in_the_same_slots(kind, tmp_path):
    def buffer_at(scratch):
        return make_replay_buffer(kind, capacity=T * 4, batch_size=T * 2, num_tasks=T, memmap_above=1,
                                  scratch_dir=str(scratch))

    straight, stopped = buffer_at(tmp_path / "a"), buffer_at(tmp_path / "b")
    first, second = task_batch([0, 0, 0, 0, 0, 1, 2]), task_batch([2, 1, 0, 2], start=20.0)
    for buffer in (straight, stopped):
        buffer.extend(first)
    stopped.dumps(tmp_path / "checkpoint")
    resumed = buffer_at(tmp_path / "b")  # the in-place memory-mapped files
    resumed.loads(tmp_path / "checkpoint")
    in_memory = make_replay_buffer(kind, capacity=T * 4, batch_size=T * 2, num_tasks=T)
    in_memory.extend(first)
    from_state = make_replay_buffer(kind, capacity=T * 4, batch_size=T * 2, num_tasks=T)
    from_state.load_state_dict(in_memory.state_dict())
    for buffer in (straight, resumed, from_state):
        assert buffer.writer.task_writes.tolist() == [5, 1, 1] and buffer.write_count == 7
        buffer.extend(second)
    for buffer in (resumed, from_state):
        assert buffer.writer.state_dict()["task_writes"] == [6, 2, 3]
        for task in range(T):
            assert held_values(buffer, task) == held_values(straight, task)
            held = torch.arange(int(buffer.writer.task_writes[task].clamp_max(4))) * T + task
            assert torch.equal(buffer.storage[held]["x"], straight.storage[held]["x"])  # slot by slot
        if kind == "stratified_prioritized":
            tree = [buffer.sampler._sum_tree[i] for i in range(T * 4)]
            assert tree == [straight.sampler._sum_tree[i] for i in range(T * 4)]
