"""A fictional encyclopedia (the Veloria archipelago): the built-in corpus and questions of ``miles/Search-v0``.

Everything is invented, so a model can only answer by searching, and the facts are consistent by
construction: each question's answer and supporting documents come from the same generated world.
The shipped files under ``data/`` are this module's output with the default seed and scale;
regenerate them (or a bigger world) with ``python -m miles_envs.envs.search_world OUT_DIR [--scale N]``.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SEED = 7
QUESTIONS_PER_KIND = 4

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "tr", "v", "z", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m")
_PROFESSIONS = ("shipwright", "cartographer", "astronomer", "glassmaker", "physician", "poet", "engineer", "botanist")
_INDUSTRIES = ("salt panning", "pearl diving", "shipbuilding", "olive oil", "amber trade", "weaving", "copper mining")
_PURPOSES = ("measuring tides", "grinding lenses", "signalling ships at night", "drying fish", "spinning rope",
             "predicting storms", "pumping water from mines", "copying maps")
_GENRES = ("travel journal", "epic poem", "treatise", "novel", "almanac", "chronicle")
_SUBJECTS = ("a voyage around the outer reefs", "the founding of the island towns", "the stars of the southern sky",
             "a famine and its end", "the rivalry of two shipyards", "the medicinal plants of the hills")
_SHIP_KINDS = ("schooner", "brigantine", "caravel", "paddle steamer", "clipper")
_SEAS = ("Amber Sea", "Sea of Lanterns", "Grey Strait", "Outer Ocean")


@dataclass
class World:
    documents: list[dict] = field(default_factory=list)
    questions: list[dict] = field(default_factory=list)


def _article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


class _Names:
    """Unique invented names."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def __call__(self, syllables: int = 2) -> str:
        while True:
            word = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(syllables))
            word = (word + self.rng.choice(_CODAS)).capitalize()
            if word not in self.used:
                self.used.add(word)
                return word


def build_world(seed: int = DEFAULT_SEED, scale: int = 1) -> World:
    """About 280 documents and 40 questions per unit of ``scale``."""
    rng = random.Random(seed)
    name = _Names(rng)
    world = World()

    def add(kind: str, title: str, text: str) -> str:
        doc_id = f"{kind}-{len(world.documents):05d}"
        world.documents.append({"id": doc_id, "title": title, "text": text})
        return doc_id

    islands = [{"name": name(3), "sea": rng.choice(_SEAS), "area": rng.randint(40, 2400)} for _ in range(8 * scale)]
    people = [
        {"name": f"{name(2)} {name(3)}", "born": rng.randint(1610, 1890), "profession": rng.choice(_PROFESSIONS)}
        for _ in range(100 * scale)
    ]
    towns = []
    for _ in range(40 * scale):
        town = {"name": name(2), "island": rng.choice(islands), "founded": rng.randint(1200, 1750),
                "founder": rng.choice(people), "industry": rng.choice(_INDUSTRIES), "river": name(2)}
        towns.append(town)
    for person in people:
        person["town"] = rng.choice(towns)
    inventions = [{"name": f"{name(2).lower()} {rng.choice(('wheel', 'lamp', 'press', 'glass', 'pump', 'loom'))}",
                   "inventor": rng.choice(people), "purpose": rng.choice(_PURPOSES)} for _ in range(30 * scale)]
    books = [{"title": f"The {name(2)} {rng.choice(('Papers', 'Songs', 'Voyages', 'Letters', 'Tables'))}",
              "author": rng.choice(people), "genre": rng.choice(_GENRES), "subject": rng.choice(_SUBJECTS)}
             for _ in range(30 * scale)]
    ships = [{"name": name(3), "kind": rng.choice(_SHIP_KINDS), "yard": rng.choice(towns),
              "captain": rng.choice(people), "launched": rng.randint(1650, 1900)} for _ in range(30 * scale)]
    mountains = [{"name": f"Mount {name(2)}", "island": rng.choice(islands), "height": rng.randint(310, 3900),
                  "climber": rng.choice(people)} for _ in range(40 * scale)]
    for item in inventions:
        item["year"] = item["inventor"]["born"] + rng.randint(20, 55)
    for item in books:
        item["year"] = item["author"]["born"] + rng.randint(20, 60)
    for item in mountains:
        item["year"] = item["climber"]["born"] + rng.randint(18, 40)

    for island in islands:
        oldest = min((t for t in towns if t["island"] is island), key=lambda t: t["founded"], default=None)
        town_note = f" Its oldest town is {oldest['name']}, founded in {oldest['founded']}." if oldest else ""
        island["doc"] = add("island", island["name"], (
            f"{island['name']} is an island of the Veloria archipelago in the {island['sea']}, with an area of "
            f"{island['area']} square kilometres.{town_note}"))
    for town in towns:
        town["doc"] = add("town", town["name"], (
            f"{town['name']} is a town on the island of {town['island']['name']}, on the banks of the "
            f"{town['river']} river. It was founded in {town['founded']} by {town['founder']['name']}. "
            f"The town's economy rests on {town['industry']}."))
    for person in people:
        person["doc"] = add("person", person["name"], (
            f"{person['name']} (born {person['born']}) was {_article(person['profession'])} from the Veloria archipelago, "
            f"born in the town of {person['town']['name']} on {person['town']['island']['name']}."))
    for item in inventions:
        item["doc"] = add("invention", item["name"].capitalize(), (
            f"The {item['name']} is a device for {item['purpose']}. It was invented in {item['year']} by "
            f"{item['inventor']['name']}, {_article(item['inventor']['profession'])}."))
    for item in books:
        item["doc"] = add("book", item["title"], (
            f"{item['title']} is {_article(item['genre'])} by {item['author']['name']}, published in {item['year']}. "
            f"It tells of {item['subject']}."))
    for ship in ships:
        ship["doc"] = add("ship", ship["name"], (
            f"The {ship['name']} was a {ship['kind']} launched in {ship['launched']} from the shipyards of "
            f"{ship['yard']['name']}. Her first captain was {ship['captain']['name']}."))
    for item in mountains:
        item["doc"] = add("mountain", item["name"], (
            f"{item['name']} is a mountain on {item['island']['name']}, {item['height']} metres high. The first "
            f"recorded ascent was made in {item['year']} by {item['climber']['name']}."))

    def ask(kind: str, pool: list, make: callable) -> None:
        for item in rng.sample(pool, QUESTIONS_PER_KIND * scale):
            question, answer, support = make(item)
            world.questions.append({"id": f"{kind}-{len(world.questions):04d}", "question": question,
                                    "answers": [str(answer)], "hops": len(support), "supporting": support})

    ask("founded", towns, lambda t: (f"In what year was the town of {t['name']} founded?", t["founded"], [t["doc"]]))
    ask("founder", towns, lambda t: (f"Who founded the town of {t['name']}?", t["founder"]["name"], [t["doc"]]))
    ask("inventor", inventions, lambda i: (f"Who invented the {i['name']}?", i["inventor"]["name"], [i["doc"]]))
    ask("author", books, lambda b: (f"Who wrote {b['title']}?", b["author"]["name"], [b["doc"]]))
    ask("height", mountains, lambda m: (f"How many metres high is {m['name']}?", m["height"], [m["doc"]]))
    ask("captain", ships, lambda s: (f"Who was the first captain of the {s['name']}?", s["captain"]["name"], [s["doc"]]))
    ask("inventor_town", inventions, lambda i: (
        f"In which town was the inventor of the {i['name']} born?", i["inventor"]["town"]["name"],
        [i["doc"], i["inventor"]["doc"]]))
    ask("birth_island", people, lambda p: (
        f"On which island is the town where {p['name']} was born?", p["town"]["island"]["name"],
        [p["doc"], p["town"]["doc"]]))
    ask("yard_founder", ships, lambda s: (
        f"Who founded the town whose shipyards launched the {s['name']}?", s["yard"]["founder"]["name"],
        [s["doc"], s["yard"]["doc"]]))
    ask("author_born", books, lambda b: (
        f"In what year was the author of {b['title']} born?", b["author"]["born"], [b["doc"], b["author"]["doc"]]))
    return world


def write_world(world: World, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for filename, rows in (("search_corpus.jsonl", world.documents), ("search_questions.jsonl", world.questions)):
        with open(directory / filename, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--scale", type=int, default=1)
    args = parser.parse_args()
    write_world(build_world(args.seed, args.scale), args.out_dir)


if __name__ == "__main__":
    main()
