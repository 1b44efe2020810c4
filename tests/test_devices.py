"""[federation] devices: one base replica and one worker thread per device; a list of CPUs gives the global model
of one device bit for bit (each client's update depends only on its instruction and the global model)."""

import pytest
import torch

from fedtune import config
from fedtune.config import ConfigError
from fedtune.run.assemble import simulate, simulation_devices

FAST = {"model.name": "tiny", "federation.num_clients": 3, "train.local_steps": 2, "data.max_train_per_client": 16,
        "data.max_seq_len": 32, "run.rounds": 2, "run.seed": 5, "federation.batch_clients": False}


@pytest.mark.parametrize("algorithm", ["fedavg", pytest.param("fedkseed", marks=pytest.mark.slow)])
def test_a_list_of_cpus_equals_one_device_bit_for_bit(tmp_path, algorithm, caplog):
    over = {**FAST, "run.algorithm": algorithm}
    one = simulate(config.load(None, {**over, "federation.workers": 1, "run.out": str(tmp_path / "one")}),
                   progress=False)
    with caplog.at_level("INFO", logger="fedtune"):
        two = simulate(config.load(None, {**over, "federation.devices": ["cpu", "cpu"],
                                          "run.out": str(tmp_path / "two")}), progress=False)
    assert "simulation devices: cpu, cpu (1 base replica(s) loaded" in caplog.text
    assert "clients on 2 devices" in caplog.text  # the replicas trained, not a fallback
    assert two["global_model_fingerprint"] == one["global_model_fingerprint"]
    assert two["rounds_completed"] == one["rounds_completed"] == 2


def test_devices_setting_is_checked_with_the_fix():
    assert simulation_devices([], 0) == []
    assert simulation_devices("all", 2) == ["cuda:0", "cuda:1"]
    assert simulation_devices(["cpu", "cuda:1"], 2) == ["cpu", "cuda:1"]
    with pytest.raises(ConfigError, match="has 1 CUDA GPU"):
        simulation_devices(["cuda:0", "cuda:1"], 1)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        simulation_devices("all", 0)
    with pytest.raises(ConfigError, match='"all" or a list of "cpu" / "cuda:N"'):
        config.load(None, {"federation.devices": ["gpu0"]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_all_gpus_train_and_match_one_gpu(tmp_path):
    """Every GPU holds a replica; the result equals one GPU's up to float rounding (cuBLAS is not bit-stable across
    devices of a kind in general; same kind, same kernels: in practice equal)."""
    from conftest import max_abs
    from safetensors.torch import load_file

    over = {**FAST, "run.algorithm": "fedavg", "model.device": "cuda:0"}
    simulate(config.load(None, {**over, "federation.workers": 1, "run.out": str(tmp_path / "one")}), progress=False)
    devices = "all" if torch.cuda.device_count() > 1 else ["cuda:0", "cuda:0"]  # one GPU: still two replicas
    simulate(config.load(None, {**over, "federation.devices": devices, "run.out": str(tmp_path / "all")}),
             progress=False)
    a = load_file(str(tmp_path / "one/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "all/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and max(max_abs(a[k], b[k]) for k in a) <= 1e-5
