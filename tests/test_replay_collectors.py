"""TorchRL's collectors writing straight into the project's buffers (``replay_buffer=``), in
this process and from worker processes: every transition lands in its task's slots, each
task's recorded count is what was collected for it, and a sample shares the batch equally."""
import pytest
import torch
from torchrl.collectors import Collector, MultiAsyncCollector, MultiSyncCollector

from d2r_torchrl.data.replay import make_replay_buffer
from d2r_torchrl.envs import make_env
from d2r_torchrl.modules import make_actor

TASKS = ("reach-v3", "push-v3")
T, STEPS, BATCH = len(TASKS), 50, 64


def tiny_actor():
    spec = make_env(TASKS[:1], goals="fixed", max_episode_steps=STEPS).action_spec_unbatched
    return make_actor(
        "d2r", 39, spec, num_tasks=T, module_width=8, num_modules=3, encoder_widths=(16, 16),
        router_widths=(16,), native_chain=False,
    )


def env_of(tasks, first_task_id=0):
    return lambda: make_env(list(tasks), goals="fixed", max_episode_steps=STEPS, first_task_id=first_task_id)


def assert_stored_per_task(buffer, collected):
    """Each task's count is ``collected[t]`` and its slots hold its own transitions; a sample
    is ``[BATCH]`` with ``BATCH // T`` of each task."""
    assert buffer.writer.task_writes.tolist() == collected
    assert buffer.write_count == sum(collected)
    for task, count in enumerate(collected):
        held = min(count, buffer.storage.max_size // T)
        assert (buffer.storage[torch.arange(held) * T + task]["task_id"] == task).all()
    sample = buffer.sample()
    assert sample.shape == (BATCH,)
    assert torch.bincount(sample["task_id"], minlength=T).tolist() == [BATCH // T] * T
    if "priority_weight" in sample.keys():  # every written transition entered the priority trees
        assert torch.isfinite(sample["priority_weight"]).all() and (sample["priority_weight"] > 0).all()


@pytest.mark.parametrize("kind", ["stratified", "stratified_prioritized"])
def test_collector_writes_each_task_into_its_own_slots(kind):
    buffer = make_replay_buffer(kind, capacity=300, batch_size=BATCH, num_tasks=T)
    collector = Collector(
        env_of(TASKS)(), tiny_actor(), frames_per_batch=100, total_frames=400, replay_buffer=buffer,
        auto_register_policy_transforms=False,
    )
    for _ in collector:
        pass
    collector.shutdown()
    assert_stored_per_task(buffer, [200, 200])  # [T, 50] batches, 150 slots per task: wrapped
    assert len(buffer) == 300


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["stratified", "stratified_prioritized"])
@pytest.mark.parametrize("collector_class, worker_batch", [(MultiAsyncCollector, 25), (MultiSyncCollector, 25)])
def test_multi_process_collector_workers_write_into_the_shared_per_task_record(kind, collector_class, worker_batch):
    """One worker process per task (as the project's multi-process collector splits tasks):
    the workers' writes reach the record and the storage the learner samples from."""
    buffer = make_replay_buffer(kind, capacity=400, batch_size=BATCH, num_tasks=T)
    factories = [env_of(TASKS[:1], 0), env_of(TASKS[1:], 1)]
    frames_per_batch = worker_batch * (2 if collector_class is MultiSyncCollector else 1)
    collector = collector_class(
        factories, tiny_actor(), frames_per_batch=frames_per_batch, total_frames=200, replay_buffer=buffer,
        auto_register_policy_transforms=False,
    )
    for _ in collector:
        pass
    collector.shutdown()
    collected = buffer.writer.task_writes.tolist()
    assert all(count > 0 and count % worker_batch == 0 for count in collected)  # whole worker batches
    assert sum(collected) >= 200
    assert_stored_per_task(buffer, collected)


@pytest.mark.ray
def test_ray_collector_refuses_an_in_process_buffer_before_any_collection():
    """TorchRL's RayCollector only writes into Ray-served buffers; handed one of these it must
    refuse at construction rather than fill remote copies."""
    pytest.importorskip("ray")
    from torchrl.collectors.distributed import RayCollector

    buffer = make_replay_buffer("stratified", capacity=100, batch_size=BATCH, num_tasks=T)
    with pytest.raises(TypeError, match="service_backend='ray'"):
        RayCollector([env_of(TASKS)], tiny_actor(), frames_per_batch=100, total_frames=200, replay_buffer=buffer)
    assert buffer.write_count == 0
