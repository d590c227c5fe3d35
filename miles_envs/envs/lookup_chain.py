"""``miles/LookupChain-v0``: questions over a small company directory that need chained lookups.

Each episode draws a fresh directory (people, teams, offices) whose ids are random, so the answer
cannot be guessed or memorised: every hop's id comes from the previous tool result. Questions take
3 or 5 dependent calls (``find_person`` → ``get_team`` → ``get_office`` / ``get_person`` → ...).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from miles_envs.env import Message
from miles_envs.envs.tool_env import Reward, Task, ToolEnv, extract_tagged
from miles_envs.search.metrics import normalize_answer
from miles_envs.tools import tool

FIRST_NAMES = (
    "Ada", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kasia", "Lior",
    "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamar", "Umar", "Vera", "Wen", "Yara",
)
LAST_NAMES = (
    "Abara", "Bishop", "Castell", "Dorn", "Eklund", "Ferreira", "Gallo", "Haddad", "Ivanova", "Jensen",
    "Kowal", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quiroga", "Rahman", "Sato", "Tanaka",
)
TEAM_NAMES = ("Atlas", "Beacon", "Cobalt", "Delta", "Ember", "Fjord", "Granite", "Harbor", "Iris", "Juniper")
CITIES = ("Lisbon", "Osaka", "Nairobi", "Montreal", "Tallinn", "Valparaiso", "Hanoi", "Reykjavik", "Perth", "Bergen")
BUILDINGS = ("North Tower", "Riverside Hall", "Foundry", "Glasshouse", "Old Mill", "Signal House")

PEOPLE_PER_TEAM = 4
TEAMS = 5


@dataclass(frozen=True)
class Person:
    person_id: str
    name: str
    team_id: str


@dataclass(frozen=True)
class Team:
    team_id: str
    name: str
    sponsor_id: str
    office_id: str


@dataclass(frozen=True)
class Office:
    office_id: str
    city: str
    building: str


@dataclass
class Directory:
    people: dict[str, Person]
    teams: dict[str, Team]
    offices: dict[str, Office]


def _ids(rng: random.Random, prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{number}" for number in rng.sample(range(1000, 10000), count)]


def make_directory(rng: random.Random) -> Directory:
    """A directory where each team is sponsored by a person from a different team."""
    office_ids = _ids(rng, "O", TEAMS)
    offices = {
        oid: Office(oid, city, rng.choice(BUILDINGS)) for oid, city in zip(office_ids, rng.sample(CITIES, TEAMS))
    }
    team_ids = _ids(rng, "T", TEAMS)
    names = rng.sample([f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES], TEAMS * PEOPLE_PER_TEAM)
    person_ids = _ids(rng, "P", len(names))
    people = {
        pid: Person(pid, name, team_ids[index // PEOPLE_PER_TEAM])
        for index, (pid, name) in enumerate(zip(person_ids, names))
    }
    teams = {}
    for index, (tid, team_name) in enumerate(zip(team_ids, rng.sample(TEAM_NAMES, TEAMS))):
        other = (index + rng.randrange(1, TEAMS)) % TEAMS
        sponsor = person_ids[other * PEOPLE_PER_TEAM + rng.randrange(PEOPLE_PER_TEAM)]
        teams[tid] = Team(tid, team_name, sponsor, office_ids[index])
    return Directory(people, teams, offices)


def _question(directory: Directory, rng: random.Random) -> tuple[str, str, str, int]:
    """(kind, question, answer, tool calls needed)."""
    person = rng.choice(list(directory.people.values()))
    team = directory.teams[person.team_id]
    kind = rng.choice(("city", "sponsor", "sponsor_city"))
    if kind == "city":
        return kind, f"In which city is the office of {person.name}'s team?", directory.offices[team.office_id].city, 3
    sponsor = directory.people[team.sponsor_id]
    if kind == "sponsor":
        return kind, f"What is the full name of the sponsor of {person.name}'s team?", sponsor.name, 3
    office = directory.offices[directory.teams[sponsor.team_id].office_id]
    return kind, f"In which city does the sponsor of {person.name}'s team work?", office.city, 5


class LookupChainEnv(ToolEnv):
    """Answer a question about the company directory; reward 1 for the exact answer in ``<answer>`` tags.

    Reward components: ``correct`` (weight 1) and ``format`` (weight 0).
    """

    max_turns = 10
    system_prompt = (
        "Answer the question about the company directory. Look the facts up with the tools; ids come from "
        "earlier results. When you know the answer, reply without a tool call and put it inside "
        "<answer></answer>."
    )
    default_reward_weights = {"correct": 1.0}

    def make_task(self, rng: random.Random, options: dict[str, Any]) -> Task:
        directory = make_directory(rng)
        kind, question, answer, hops = _question(directory, rng)
        task_id = f"{kind}-{rng.getrandbits(32):08x}"
        return Task(task_id, question, answer, {"directory": directory, "kind": kind, "calls_needed": hops})

    @property
    def directory(self) -> Directory:
        if self.task is None:
            raise RuntimeError("the directory exists only during an episode: call reset() first")
        return self.task.metadata["directory"]

    @tool
    def find_person(self, name: str) -> Person:
        """Find an employee by full name.

        Args:
            name: The person's full name, e.g. "Ada Novak".
        """
        for person in self.directory.people.values():
            if normalize_answer(person.name) == normalize_answer(name):
                return person
        raise LookupError(f"no employee is named {name!r}")

    @tool
    def get_person(self, person_id: str) -> Person:
        """Get an employee record by id.

        Args:
            person_id: An id such as "P-1234".
        """
        return _lookup(self.directory.people, person_id, "employee")

    @tool
    def get_team(self, team_id: str) -> Team:
        """Get a team record (its name, sponsor's person id and office id) by id.

        Args:
            team_id: An id such as "T-1234".
        """
        return _lookup(self.directory.teams, team_id, "team")

    @tool
    def get_office(self, office_id: str) -> Office:
        """Get an office record (city and building) by id.

        Args:
            office_id: An id such as "O-1234".
        """
        return _lookup(self.directory.offices, office_id, "office")

    def score(self, task: Task, answer: Message) -> Reward:
        tagged = extract_tagged(answer.get("content"))
        correct = tagged is not None and normalize_answer(tagged) == normalize_answer(task.answer)
        return {"correct": float(correct), "format": float(tagged is not None)}


def _lookup(table: dict[str, Any], key: str, kind: str) -> Any:
    if key not in table:
        raise LookupError(f"no {kind} has id {key!r}")
    return table[key]
