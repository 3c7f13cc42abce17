"""`record_stability_info` (PROTOCOL.md 3.3): a client-level flag sent on every asample."""

from __future__ import annotations

from fake_tinker import FakeTinker

from tinkex_trio import Config, ModelInput, open_service


async def test_record_stability_info_is_sent_on_every_asample() -> None:
    fake = FakeTinker()
    config = Config(api_key=fake.api_key, base_url="http://fake", telemetry=False)
    async with open_service(config, transport=fake.mock_transport()) as service:
        recording = await service.create_sampling_client(
            base_model="fake/model", record_stability_info=True
        )
        plain = await service.create_sampling_client(base_model="fake/model")
        training = await service.create_lora_training_client("fake/model", rank=4)
        saved = await training.save_weights_and_get_sampling_client(record_stability_info=True)
        await recording.sample(ModelInput.from_ints([5, 6]), num_samples=2)
        await recording.compute_logprobs(ModelInput.from_ints([1, 2, 3]))
        await plain.sample(ModelInput.from_ints([5, 6]))
        await saved.sample(ModelInput.from_ints([5, 6]))
    submits = [r.body for r in fake.requests if r.path.endswith("asample")]
    flags = [(body["sampling_session_id"], body["record_stability_info"]) for body in submits]
    assert flags == [
        (recording.sampling_session_id, True),
        (recording.sampling_session_id, True),
        (plain.sampling_session_id, False),
        (saved.sampling_session_id, True),
    ]
    # The flag belongs to the client, not to the sampling session: it is never sent there.
    sessions = [r.body for r in fake.requests if r.path.endswith("create_sampling_session")]
    assert sessions and all("record_stability_info" not in body for body in sessions)
