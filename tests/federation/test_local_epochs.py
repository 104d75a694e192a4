"""Local epochs (`Scenario.local_epochs`): a device of such a class takes ceil(epochs x its
training examples / batch) steps, between 1 and its class's local steps, so that, weighted by
the examples it saw, it counts in the average as its data counts in the pooled data; the
centralized reference's plan follows the same steps."""

from __future__ import annotations

import dataclasses

import pytest

from federation.config import RunConfig
from federation.errors import FedgeError
from federation.fleet import device_for_partition, load_device_data
from federation.local import device_settings
from federation.references import task_devices, task_examples
from federation.tasks import get_task
from federation.tasks.base import Task
from federation.training import epoch_steps


@pytest.mark.parametrize(
    ("epochs", "size", "batch", "cap", "steps"),
    [
        (0.35, 738, 16, 20, 17),  # ceil(16.14): the default fleet's heaviest viewer
        (0.35, 330, 8, 20, 15),  # ceil(14.44) at a mid-tier TV's batch
        (1.0, 64, 16, 20, 4),  # a whole number of steps stays whole (no float creep to 5)
        (0.35, 10, 16, 20, 1),  # fewer examples than a batch: a step sees them all, once
        (3.0, 10, 16, 20, 3),  # ... so three epochs of them are three steps, not ceil(30 / 16)
        (0.01, 100, 16, 20, 1),  # at least one step
        (2.0, 1000, 16, 20, 20),  # at most the class's steps: the public bound
    ],
)
def test_epoch_steps_by_hand(epochs: float, size: int, batch: int, cap: int, steps: int) -> None:
    assert epoch_steps(epochs, size, batch, cap) == steps


def test_epoch_steps_refuses_nonsense() -> None:
    for args in ((0.0, 10, 16, 20), (0.5, 0, 16, 20), (0.5, 10, 0, 20), (0.5, 10, 16, 0)):
        with pytest.raises(ValueError, match="need epochs > 0"):
            epoch_steps(*args)


def _tv(run: RunConfig, client: str):  # the smart-home TV holding this viewer
    for p in range(run.scenario.size):
        device = device_for_partition(run.scenario, p, run.seed)
        if device.task == "tv" and device.data_client == client:
            return device
    raise AssertionError(client)


def test_a_tv_takes_steps_by_its_ratings_and_its_weight_follows() -> None:
    run = RunConfig.parse({"scenario": "smart-home"})
    assert run.scenario.local_epochs == {"tv": 0.35}
    heavy, light = _tv(run, "509"), _tv(run, "484")  # 738 and 16 training ratings
    heavy_data, light_data = (load_device_data(d, run.seed, run.seq_len) for d in (heavy, light))
    assert get_task("tv").train_size(heavy_data) == 738 and get_task("tv").train_size(light_data) == 16
    heavy_settings = device_settings(run, heavy, heavy_data)
    light_settings = device_settings(run, light, light_data)
    assert (heavy_settings.batch_size, heavy_settings.steps) == (16, 17)
    assert (light_settings.batch_size, light_settings.steps) == (8, 1)  # a mid-tier TV: batch 8
    # the weight a device uploads is the examples it saw: 272 against 8, as 738 against 16 ratings
    assert heavy_settings.steps * heavy_settings.batch_size == 272
    # without its data, a device's settings are the class's bound, which the server plans with
    assert device_settings(run, heavy).steps == run.train_for("tv").steps == 20
    # a class not trained by epochs keeps its steps
    phone = next(device_for_partition(run.scenario, p, 0) for p in range(run.scenario.size)
                 if device_for_partition(run.scenario, p, 0).task == "phone")  # fmt: skip
    assert device_settings(run, phone, load_device_data(phone, 0, run.seq_len)).steps == 10


def test_the_reference_plans_the_examples_the_epochs_give() -> None:
    run = RunConfig.parse({"scenario": "smart-home"})
    devices = task_devices(run, "tv")
    (planned,) = task_examples(run, "tv", devices).values()
    # each TV's own steps x batch, averaged over the 10 TVs, x 4 a round x 12 rounds
    seen = []
    for device in devices:
        data = load_device_data(device, run.seed, run.seq_len)
        settings = device_settings(run, device, data)
        seen.append(settings.steps * min(settings.batch_size, len(data.train_items)))
    assert planned == round(12 * 4 * sum(seen) / len(seen))
    # not the bound's 20 steps a TV, nor the 3 steps of before
    assert 12 * 4 * 3 * 8 < planned < 12 * 4 * 20 * 8
    plain = dataclasses.replace(run, scenario=dataclasses.replace(run.scenario, local_epochs={}))
    (bound,) = task_examples(plain, "tv", devices).values()
    assert bound == 12 * 4 * 20 * 11.2  # 20 steps at the mean batch of 6 mid (8) and 4 high (16)


def test_a_task_that_does_not_give_its_training_size_cannot_train_by_epochs() -> None:
    # Task's own train_size: what a task from outside fedge that does not override it gets
    with pytest.raises(FedgeError, match=r"'phone' does not give its clients' training-set size"):
        Task.train_size(get_task("phone"), object())


def test_local_training_takes_the_devices_own_steps() -> None:
    """The wiring: `local_train` sizes the round on the device's data, and the weight it reports
    is what those steps saw (one step of 8 of a 16-rating viewer, not the bound's 20 x 8)."""
    from federation.local import local_train
    from federation.model.edge import initial_state, task_slice

    run = RunConfig.parse({"scenario": "smart-home"})
    light = _tv(run, "484")
    shared = task_slice(initial_state(("tv",), run.lora, run.seed, run), "tv")
    result = local_train(run, light, load_device_data(light, run.seed, run.seq_len), shared, 1)
    assert result.metrics["num-examples"] == 8
