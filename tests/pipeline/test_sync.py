import json

import torch

from miles_envs.agents.embedded import EmbeddedEngine
from miles_envs.engine import SamplingParams
from miles_envs.chat.renderer import ChatRenderer
from miles_envs.loop import LoopConfig
from miles_envs.models.factory import init_model
from miles_envs.trainer import Trainer, TrainerConfig
from miles_envs.pipeline.sync import train


async def test_train_loop_syncs_weights_logs_checkpoints_and_resumes(tmp_path):
    folder = init_model(tmp_path / "model", arch="qwen3-moe", size="tiny")
    engine = EmbeddedEngine.from_path(folder, device="cpu")
    renderer = ChatRenderer(engine.tokenizer)
    loop_config = LoopConfig(sampling=SamplingParams(max_new_tokens=6, seed=0))
    settings = dict(lr=1e-3, r3=True, device="cpu")
    try:
        trainer = Trainer.from_pretrained(str(folder), TrainerConfig(**settings))
        history = await train("miles/Echo-v0", engine, trainer, 2, renderer=renderer, tasks_per_step=2, group_size=2,
                              loop_config=loop_config, out_dir=tmp_path / "run", checkpoint_every=1)
        assert [m["step"] for m in history] == [1.0, 2.0]
        assert all(m["trajectories"] == 4.0 and "mismatch/router_disagreement" in m for m in history)
        assert engine.weight_version == "step-2"
        engine_weights = engine.model.state_dict()
        for name, value in trainer.state_dict().items():
            assert torch.equal(engine_weights[name], value), name

        resumed = Trainer.from_pretrained(str(folder), TrainerConfig(**settings))
        more = await train("miles/Echo-v0", engine, resumed, 3, renderer=renderer, tasks_per_step=2, group_size=2,
                           loop_config=loop_config, out_dir=tmp_path / "run")
        assert [m["step"] for m in more] == [3.0]
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1.0, 2.0, 3.0]
        assert (tmp_path / "run" / "checkpoints" / "step_000003" / "trainer_state.json").is_file()
    finally:
        await engine.close()
