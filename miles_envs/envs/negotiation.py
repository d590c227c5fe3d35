"""``miles/Negotiation-v0``: general-sum bargaining over a pool of items with private values.

Two agents, ``alice`` (moves first) and ``bob``, split a pool of books, hats and balls. Each values
the item types differently, and only knows its own values (its ``private_view``); each agent's
values of the whole pool sum to 10. They alternate messages of free text that may end with a
proposal ``PROPOSE book=1 hat=2 ball=0`` (what the proposer keeps; the rest goes to the other) or
with ``ACCEPT`` (take the other's standing proposal). Rewards on a deal: each agent's value of its
share / 10; no deal within ``max_messages``: 0 for both. Both can gain, so it is not zero-sum.
"""

from __future__ import annotations

import random
import re
from typing import Any

from miles_envs.env import Message, system, user
from miles_envs.multiagent.turn_based import AgentStep, TurnBasedEnv

ITEMS = ("book", "hat", "ball")
TOTAL_VALUE = 10
_PROPOSAL = re.compile(r"PROPOSE\s+" + r"\s+".join(rf"{item}\s*=\s*(\d+)" for item in ITEMS), re.IGNORECASE)
_ACCEPT = re.compile(r"\bACCEPT\b")


def draw_values(rng: random.Random, counts: dict[str, int]) -> dict[str, int]:
    """Integer values per item type with ``sum(count * value) == TOTAL_VALUE`` (rejection sampling)."""
    while True:
        values = {item: rng.randint(0, TOTAL_VALUE) for item in ITEMS}
        if sum(counts[i] * values[i] for i in ITEMS) == TOTAL_VALUE and sum(v > 0 for v in values.values()) >= 2:
            return values


def format_split(split: dict[str, int]) -> str:
    return " ".join(f"{item}={split[item]}" for item in ITEMS)


class NegotiationEnv(TurnBasedEnv):
    possible_agents = ["alice", "bob"]
    max_turns = 6

    def __init__(self, max_messages: int = 6) -> None:
        if max_messages < 2:
            raise ValueError(f"max_messages={max_messages}: a deal needs at least a proposal and an answer (2)")
        super().__init__()
        self.max_messages = max_messages
        self.max_turns = max_messages
        self.counts: dict[str, int] = {}
        self.values: dict[str, dict[str, int]] = {}
        self.standing: tuple[str, dict[str, int]] | None = None
        self.messages = 0

    def start(self, seed: int | None, options: dict[str, Any] | None):
        rng = random.Random(seed)
        self.counts = {item: rng.randint(1, 4) for item in ITEMS}
        self.values = {agent: draw_values(rng, self.counts) for agent in self.possible_agents}
        self.standing, self.messages = None, 0
        observations, infos = {}, {}
        for agent in self.possible_agents:
            private = f"Your private values: {format_split(self.values[agent])} (each item, per unit)."
            rules = (
                f"You are {agent}, negotiating with {self.next_after(agent)} over a pool of items: "
                f"{format_split(self.counts)}. {private} Only you know them. Agree on a split within "
                f"{self.max_messages} messages in total or both get nothing. End a message with "
                "'PROPOSE book=<n> hat=<n> ball=<n>' (what you keep) or 'ACCEPT' (take the standing offer)."
            )
            observations[agent] = [system(rules)]
            infos[agent] = {"private_view": [private]}
        observations["alice"].append(user("You speak first."))
        return observations, infos, "alice"

    def play(self, agent: str, action: Message) -> AgentStep:
        other = self.next_after(agent)
        text = (action.get("content") or "").strip()
        self.messages += 1
        if _ACCEPT.search(text) and self.standing is not None and self.standing[0] == other:
            return self._deal(keeper=other, kept=self.standing[1])
        proposal = self._proposal(text)
        if proposal is not None:
            self.standing = (agent, proposal)
        relay = f"{agent}: {text}"
        if self.standing is not None:
            keeper, kept = self.standing
            yours = kept if keeper == other else self._rest(kept)
            relay += f"\n(Standing offer from {keeper}: you would get {format_split(yours)}.)"
        if self.messages >= self.max_messages:
            return self._no_deal(other, relay)
        return AgentStep(observations={other: [user(relay)]}, next_agent=other)

    def _proposal(self, text: str) -> dict[str, int] | None:
        matches = list(_PROPOSAL.finditer(text))
        if not matches:
            return None
        split = {item: int(n) for item, n in zip(ITEMS, matches[-1].groups())}
        return split if all(split[i] <= self.counts[i] for i in ITEMS) else None

    def _rest(self, kept: dict[str, int]) -> dict[str, int]:
        return {item: self.counts[item] - kept[item] for item in ITEMS}

    def _deal(self, keeper: str, kept: dict[str, int]) -> AgentStep:
        shares = {keeper: kept, self.next_after(keeper): self._rest(kept)}
        rewards = {a: sum(shares[a][i] * self.values[a][i] for i in ITEMS) / TOTAL_VALUE for a in self.possible_agents}
        note = user(f"Deal: {keeper} keeps {format_split(kept)}, {self.next_after(keeper)} gets {format_split(shares[self.next_after(keeper)])}.")
        infos = {a: {"deal": True, "reward_components": {"deal": 1.0, "value": rewards[a]}} for a in self.possible_agents}
        return AgentStep(
            observations={a: [dict(note)] for a in self.possible_agents}, rewards=rewards, terminated=True, infos=infos
        )

    def _no_deal(self, other: str, relay: str) -> AgentStep:
        note = f"No deal within {self.max_messages} messages: nobody gets anything."
        infos = {a: {"deal": False, "reward_components": {"deal": 0.0, "value": 0.0}} for a in self.possible_agents}
        observations = {a: [user(note)] for a in self.possible_agents}
        observations[other].insert(0, user(relay))
        return AgentStep(observations=observations, terminated=True, infos=infos)
