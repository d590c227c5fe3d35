"""Weight sync through checkpoint folders: a training run against an SGLang-protocol server on 127.0.0.1."""

import json

from miles_envs.agents.protocol_server import ProtocolServer
from miles_envs.agents.scripted import ScriptedEngine
from miles_envs.models.factory import init_model
from miles_envs.pipeline import TrainSettings, run_training
from miles_envs.tokenizers import load_tokenizer


class Quiet:
    def resumed(self, step, warm_started): ...

    def sft_step(self, step, metrics): ...

    def train_step(self, metrics): ...

    def evaluated(self, step, reward, phase): ...


async def test_a_run_on_a_server_makes_it_reload_each_version_from_a_folder(tmp_path):
    model = init_model(tmp_path / "model", arch="qwen3", size="tiny")
    served = ScriptedEngine(load_tokenizer("qwen3"), ["red blue"])
    out = tmp_path / "run"
    async with ProtocolServer(served, context_length=512) as server:
        settings = TrainSettings(
            env_id="miles/Echo-v0", model=model, out=out, steps=3, tasks_per_step=2, group_size=2, max_new_tokens=4,
            engine=f"sglang://127.0.0.1:{server.port}", device="cpu", keep_serving=2,
        )
        summary = await run_training(settings, Quiet())
        assert (server.model_path, server.weight_version) == (str(out / "serving" / "step-3"), "step-3")
        assert len(server.requests) == 3 * 2 * 2  # one single-turn episode per member, every step
    assert summary["steps_done"] == 3
    # every version the server loaded was a folder this run wrote, labelled with its step; the newest two stay
    assert sorted(p.name for p in (out / "serving").iterdir()) == ["step-2", "step-3"]
    assert (out / "serving" / "step-3" / "config.json").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert served.weight_version == "step-3"  # the scripted engine behind the server took the folder's version
