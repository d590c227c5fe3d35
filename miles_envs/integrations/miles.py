"""Miles (and slime) plug-points that play a registered env against Miles' SGLang router.

- ``generate(args, sample, sampling_params)`` for ``--custom-generate-function-path
  miles_envs.integrations.miles.generate``: plays one episode of the env and returns the filled
  ``Sample`` (a multi-agent env fans out to one Sample per seat; siblings share ``rollout_id`` and
  one reward, as Miles' loss reducer requires).
- ``generate_rollout(args, rollout_id, data_source, evaluation=False)`` for
  ``--rollout-function-path miles_envs.integrations.miles.generate_rollout``: takes
  ``rollout_batch_size`` groups from the data source (or makes them when the env needs no prompts),
  plays ``n_samples_per_prompt`` episodes per group on one env seed, and returns the groups; in
  evaluation it returns ``{env_id: {"rewards", "truncated", "samples"}}``.

Both read the router from ``args.sglang_router_ip``/``sglang_router_port``, the tokenizer from
``args.hf_checkpoint``, routing replay from ``args.use_rollout_routing_replay`` (shape
``num_layers`` × ``moe_router_topk``), and add ``--env-*`` arguments through Miles'
``add_arguments`` hook. The env is ``sample.metadata["env_id"]`` or ``--env-id``; its seed is
``sample.metadata["env_seed"]``, else the sample's ``group_index``, else its ``index``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import weakref
from functools import lru_cache
from typing import Any

from miles_envs.engine import Engine
from miles_envs.agents.sglang_wire import sampling_from_request
from miles_envs.integrations.miles_sample import fill_sample, siblings
from miles_envs.loop import LoopConfig, run_episode
from miles_envs.trajectory import Trajectory

DEFAULT_MAX_CONTEXT = 32768
_ENV_ARGUMENTS = (
    ("--env-id", dict(type=str, default=None, help="registered env to play (else sample.metadata['env_id'])")),
    ("--env-kwargs", dict(type=str, default="{}", help="env constructor kwargs as JSON")),
    ("--env-max-turns", dict(type=int, default=None, help="model turns per episode (default: the env's)")),
    ("--env-agent", dict(type=str, default=None, help="multi-agent envs: train only this seat")),
    ("--env-eval-episodes", dict(type=int, default=16, help="episodes per evaluation")),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Miles' hook for extra CLI flags; safe to call twice (generate and rollout paths both carry it)."""
    for flag, options in _ENV_ARGUMENTS:
        if flag not in parser._option_string_actions:
            parser.add_argument(flag, **options)


# ----------------------------------------------------------------------------- shared resources


@lru_cache(maxsize=8)
def _renderer(tokenizer_path: str):
    from miles_envs.chat import ChatRenderer
    from miles_envs.tokenizers import load_tokenizer

    return ChatRenderer(load_tokenizer(tokenizer_path))


@lru_cache(maxsize=8)
def _parser(tokenizer_path: str):
    from miles_envs.parsers import parser_for

    return parser_for(_renderer(tokenizer_path).tokenizer)


# One SGLang client per router and event loop (an httpx client is bound to its loop). Keyed by the
# loop object, weakly: a new loop may reuse a closed one's id(), never its identity.
_engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Engine]] = weakref.WeakKeyDictionary()


def _engine(args: Any) -> Engine:
    from miles_envs.agents.sglang import SGLangEngine

    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}"
    clients = _engines.setdefault(asyncio.get_running_loop(), {})
    if url not in clients:
        routing = bool(getattr(args, "use_rollout_routing_replay", False))
        clients[url] = SGLangEngine(
            url,
            num_layers=getattr(args, "num_layers", None) if routing else None,
            topk=getattr(args, "moe_router_topk", None) if routing else None,
        )
    return clients[url]


class PrefixCacheMeter:
    """The engine, counting one trajectory's prompt and prefix-cached tokens over all its turns for
    Miles' ``Sample.prefix_cache_info`` (its prefix-cache hit-rate metric reads these)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cached_tokens = 0
        self.prompt_tokens = 0

    async def generate(self, input_ids: list[int], sampling: Any, **options: Any) -> Any:
        generation = await self.engine.generate(input_ids, sampling, **options)
        self.prompt_tokens += generation.prompt_tokens or len(input_ids)
        self.cached_tokens += generation.cached_tokens
        return generation

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def fill(self, sample: Any) -> Any:
        info = getattr(sample, "prefix_cache_info", None)
        if info is not None:
            info.cached_tokens += self.cached_tokens
            info.total_prompt_tokens += self.prompt_tokens
        return sample


def _arg(args: Any, name: str, default: Any = None) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def _loop_config(args: Any, sampling_params: dict[str, Any]) -> LoopConfig:
    return LoopConfig(
        sampling=sampling_from_request(sampling_params),
        max_turns=_arg(args, "env_max_turns"),
        max_context=_arg(args, "rollout_max_context_len", DEFAULT_MAX_CONTEXT),
        return_routed_experts=bool(getattr(args, "use_rollout_routing_replay", False)),
    )


def _env_seed(sample: Any) -> int | None:
    metadata = sample.metadata or {}
    for value in (metadata.get("env_seed"), sample.group_index, sample.index):
        if value is not None:
            return int(value)
    return None


def _env_id(args: Any, sample: Any) -> str:
    env_id = (sample.metadata or {}).get("env_id") or _arg(args, "env_id")
    if not env_id:
        raise ValueError("no env to play: pass --env-id (or put env_id in the sample's metadata)")
    return env_id


# ----------------------------------------------------------------------------- generate


async def generate(args: Any, sample: Any, sampling_params: dict[str, Any]) -> Any:
    """Play one episode of the sample's env; returns the Sample (or the seats' sibling Samples)."""
    from miles_envs.registry import spec

    env_id = _env_id(args, sample)
    kwargs = {**json.loads(_arg(args, "env_kwargs", "{}")), **(sample.metadata or {}).get("env_kwargs", {})}
    env = spec(env_id).make(**kwargs)
    tokenizer_path = args.hf_checkpoint
    renderer, parser = _renderer(tokenizer_path), _parser(tokenizer_path)
    config = _loop_config(args, sampling_params)
    seed = _env_seed(sample)
    try:
        if env.multi_agent:
            return await _generate_multi(args, sample, env, env_id, renderer, parser, config, seed)
        meter = PrefixCacheMeter(_engine(args))
        trajectory = await run_episode(
            env, meter, renderer, parser, config, seed=seed,
            ids={"env_id": env_id, "group_id": f"{env_id}#{seed}", "episode_id": str(sample.index)},
        )
    finally:
        await env.aclose()
    return meter.fill(fill_sample(sample, trajectory, decode=renderer.decode))


async def _generate_multi(args, sample, env, env_id, renderer, parser, config: LoopConfig, seed) -> list[Any]:
    """Self-play: every seat is the policy being trained. Siblings share the mean of the seats' returns;
    ``--env-agent`` trains one seat and keeps its own return."""
    from miles_envs.multi_loop import AgentPolicy, MultiLoopConfig, run_multi_episode

    meters = {agent: PrefixCacheMeter(_engine(args)) for agent in env.possible_agents}
    multi_config = MultiLoopConfig(
        max_turns=config.max_turns, max_context=config.max_context, return_routed_experts=config.return_routed_experts
    )
    episode = await run_multi_episode(
        env, {agent: AgentPolicy(meter, config.sampling) for agent, meter in meters.items()}, renderer, parser, multi_config,
        seed=seed, episode_id=str(sample.index), env_id=env_id,
    )
    seat = _arg(args, "env_agent")
    trajectories: list[Trajectory] = list(episode.trajectories.values())
    if seat is not None:
        if seat not in episode.trajectories:
            raise ValueError(f"--env-agent {seat!r} took no turn; seats: {sorted(episode.trajectories)}")
        trajectories, reward = [episode.trajectories[seat]], episode.returns.get(seat, 0.0)
    else:
        reward = sum(episode.returns.values()) / max(len(episode.returns), 1)
    sample.metadata = {**(sample.metadata or {}), "agent_returns": dict(episode.returns)}
    samples = siblings(sample, trajectories, reward=reward, decode=renderer.decode)
    return [meters[t.agent_id].fill(s) for s, t in zip(samples, trajectories)]


generate.add_arguments = add_arguments


# ----------------------------------------------------------------------------- rollout


def _sampling_params(args: Any) -> dict[str, Any]:
    params = {
        "temperature": _arg(args, "rollout_temperature", 1.0),
        "top_p": _arg(args, "rollout_top_p", 1.0),
        "top_k": _arg(args, "rollout_top_k", -1),
        "max_new_tokens": _arg(args, "rollout_max_response_len", 1024),
    }
    if getattr(args, "rollout_stop", None):
        params["stop"] = list(args.rollout_stop)
    if getattr(args, "rollout_stop_token_ids", None):
        params["stop_token_ids"] = list(args.rollout_stop_token_ids)
    return params


async def _play_group(args: Any, group: list[Any], base_params: dict[str, Any]) -> list[Any]:
    async def member(i: int, sample: Any) -> Any:
        params = dict(base_params)
        if getattr(args, "rollout_seed", None) is not None:
            params["sampling_seed"] = args.rollout_seed + i
        return await generate(args, sample, params)

    return list(await asyncio.gather(*(member(i, s) for i, s in enumerate(group))))


async def _rollout_async(args: Any, groups: list[list[Any]]) -> list[list[Any]]:
    params = _sampling_params(args)
    try:
        return list(await asyncio.gather(*(_play_group(args, group, params) for group in groups)))
    finally:
        await _release_engines()


async def _release_engines() -> None:
    """Close this loop's clients (a rollout step runs on its own loop)."""
    for client in _engines.pop(asyncio.get_running_loop(), {}).values():
        await client.close()


def _sample_class() -> type:
    for module in ("miles.utils.types", "slime.utils.types"):
        try:
            return __import__(module, fromlist=["Sample"]).Sample
        except ImportError:
            continue
    raise ImportError("neither miles nor slime is installed: pass a data source, or install Miles")


def _env_groups(args: Any, rollout_id: int, count: int, group_size: int, *, seed_base: int) -> list[list[Any]]:
    """Groups for envs that need no dataset: group ``i`` plays env seed ``seed_base + i`` in every member."""
    sample_cls = _sample_class()
    groups = []
    for i in range(count):
        seed = seed_base + i
        prototype = sample_cls(group_index=seed, metadata={"env_id": args.env_id, "env_seed": seed, "rollout_step": rollout_id})
        groups.append([_indexed(copy.deepcopy(prototype), seed * group_size + j) for j in range(group_size)])
    return groups


def _indexed(sample: Any, index: int) -> Any:
    sample.index = index
    return sample


def generate_rollout(args: Any, rollout_id: int, data_source: Any, evaluation: bool = False):
    """Miles/slime rollout function: ``list[list[Sample]]`` for training, the eval dict for evaluation."""
    group_size = int(_arg(args, "n_samples_per_prompt", 1))
    if evaluation:
        count = int(_arg(args, "env_eval_episodes", 16))
        groups = _env_groups(args, rollout_id, count, 1, seed_base=0)
        samples = [s for group in asyncio.run(_rollout_async(args, groups)) for s in _flat(group)]
        return {
            args.env_id: {
                "rewards": [s.reward for s in samples],
                "truncated": [s.status == type(s).Status.TRUNCATED for s in samples],
                "samples": samples,
            }
        }
    batch = int(args.rollout_batch_size)
    if data_source is not None and hasattr(data_source, "get_samples"):
        groups = data_source.get_samples(batch)
    else:
        groups = _env_groups(args, rollout_id, batch, group_size, seed_base=rollout_id * batch)
    return asyncio.run(_rollout_async(args, groups))


def _flat(group: list[Any]) -> list[Any]:
    return [s for item in group for s in (item if isinstance(item, list) else [item])]


generate_rollout.add_arguments = add_arguments

