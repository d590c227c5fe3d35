import pytest

from miles_envs import Env, user
from miles_envs.envs.guess_number import GuessNumberEnv
from miles_envs.registry import (
    DuplicateEnv, EntryPointError, EnvNotFound, EnvSpec, InvalidEnvId, NotAnEnv, Registry, parse_id,
)


class Tiny(Env):
    def __init__(self, word="hi"):
        self.word = word

    def reset(self, seed=None, options=None):
        return [user(self.word)], {}

    def step(self, action):
        return [], 1.0, True, False, {}


class NotEnv:
    pass


def test_parse_id_like_gymnasium():
    assert parse_id("demo/My-v3") == ("demo", "My", 3)
    with pytest.raises(InvalidEnvId, match="namespace"):
        parse_id("My-v0")
    with pytest.raises(InvalidEnvId, match="version"):
        parse_id("demo/My")


def test_register_make_with_default_kwargs_and_overrides(miles_home):
    reg = Registry()
    reg.register("t/Tiny-v0", Tiny, kwargs={"word": "default"}, max_turns=4, tags=["x"])
    env = reg.make("t/Tiny-v0")
    assert env.reset()[0] == [user("default")] and env.max_turns == 4
    assert reg.make("t/Tiny-v0", word="over", max_turns=2).max_turns == 2
    assert reg.make("t/Tiny-v0", word="over").word == "over"
    assert [s.id for s in reg.list(tag="x")] == ["t/Tiny-v0"]
    assert reg.spec("t/Tiny-v0").source == "code"


def test_duplicate_unless_override(miles_home):
    reg = Registry()
    reg.register("t/Tiny-v0", Tiny)
    with pytest.raises(DuplicateEnv, match="override=True"):
        reg.register("t/Tiny-v0", Tiny)
    reg.register("t/Tiny-v0", Tiny, kwargs={"word": "b"}, override=True)
    with pytest.raises(DuplicateEnv, match="builtin"):
        reg.register("miles/Echo-v0", Tiny)


def test_unknown_id_lists_close_matches(miles_home):
    with pytest.raises(EnvNotFound, match="did you mean: miles/GuessNumber-v0"):
        Registry().make("miles/GuessNumbr-v0")


def test_entry_point_errors(miles_home, tmp_path):
    with pytest.raises(EntryPointError, match="cannot import module 'no_such_module_xyz'"):
        EnvSpec("a/B-v0", "no_such_module_xyz:Env").make()
    with pytest.raises(EntryPointError, match="has no attribute 'Nope'.*GuessNumberEnv"):
        EnvSpec("a/B-v0", "miles_envs.envs.guess_number:Nope").make()
    with pytest.raises(NotAnEnv, match="not a miles_envs.Env subclass"):
        EnvSpec("a/B-v0", f"{__name__}:NotEnv").load()
    with pytest.raises(NotAnEnv, match="returned dict"):
        EnvSpec("a/B-v0", lambda: {}).make()
    with pytest.raises(EntryPointError, match="does not exist"):
        EnvSpec("a/B-v0", str(tmp_path / "missing.py") + ":X").make()
    with pytest.raises(EntryPointError, match="module:Class"):
        EnvSpec("a/B-v0", "just_a_module")


def test_file_entry_point(miles_home, tmp_path):
    path = tmp_path / "my_env.py"
    path.write_text(
        "from miles_envs import Env, user\n"
        "class MyEnv(Env):\n"
        "    def reset(self, seed=None, options=None): return [user('from file')], {}\n"
        "    def step(self, action): return [], 0.0, True, False, {}\n"
    )
    env = EnvSpec("f/File-v0", f"{path}:MyEnv").make()
    assert env.reset()[0] == [user("from file")]


def test_builtins_are_listed_without_importing_them(miles_home):
    import sys

    sys.modules.pop("miles_envs.envs.echo", None)
    ids = {s.id: s.source for s in Registry().list()}
    assert ids["miles/GuessNumber-v0"] == "builtin" and ids["miles/Echo-v0"] == "builtin"
    assert "miles_envs.envs.echo" not in sys.modules
    assert isinstance(Registry().make("miles/GuessNumber-v0"), GuessNumberEnv)


def test_project_store_found_upwards_and_shadows_user(miles_home, tmp_path, monkeypatch):
    from miles_envs.registry import store_for

    (tmp_path / "proj" / "sub").mkdir(parents=True)
    (tmp_path / "proj" / "miles-envs.toml").write_text("")
    monkeypatch.chdir(tmp_path / "proj" / "sub")
    reg = Registry()
    reg.persist(EnvSpec("p/Env-v0", "miles_envs.envs.echo:EchoEnv", kwargs={"words": 2}), "user")
    reg.persist(EnvSpec("p/Env-v0", "miles_envs.envs.echo:EchoEnv", kwargs={"words": 5}), "project")
    assert store_for("project").path == tmp_path / "proj" / "miles-envs.toml"
    spec = Registry().spec("p/Env-v0")
    assert spec.source == "project" and spec.kwargs == {"words": 5}


def make_tiny(word: str = "hi") -> Tiny:
    return Tiny(word)


def not_a_factory():
    return 1


def test_registering_something_that_cannot_build_the_env_fails_at_once(miles_home):
    reg = Registry()
    with pytest.raises(NotAnEnv, match="not_a_factory is a function, not a miles_envs.Env subclass"):
        reg.register("t/Plain-v0", not_a_factory)
    with pytest.raises(EntryPointError, match="does not accept these kwargs.*'colour'.*it takes: word"):
        reg.register("t/Tiny-v0", Tiny, kwargs={"colour": "red"})
    with pytest.raises(EnvNotFound):
        reg.spec("t/Plain-v0")  # nothing was kept
    reg.register("t/Factory-v0", make_tiny, kwargs={"word": "made"})  # a factory annotated '-> Env' is fine
    assert reg.make("t/Factory-v0").reset()[0] == [user("made")]
    with pytest.raises(EntryPointError, match="does not accept"):
        EnvSpec("t/Tiny-v0", Tiny).check(colour="red")  # overrides are checked too


def test_max_turns_comes_from_the_spec_else_the_class(miles_home):
    class Capped(Tiny):
        max_turns = 7

    assert EnvSpec("t/C-v0", Capped).class_max_turns() == 7
    assert EnvSpec("t/C-v0", Capped, max_turns=2).class_max_turns() == 2
    assert EnvSpec("t/T-v0", Tiny).class_max_turns() is None
    assert EnvSpec("t/X-v0", "no_such_module_xyz:Env").class_max_turns() is None  # a listing survives a broken entry


@pytest.mark.parametrize(
    ("typed", "suggested"),
    [
        ("miles/GuessNumbr-v0", ["miles/GuessNumber-v0", "miles/GuessNumber7-v0"]),
        ("miles/GuessNumber-v1", ["miles/GuessNumber-v0", "miles/GuessNumber7-v0"]),
        ("mile/Echo-v0", ["miles/Echo-v0"]),
        ("miles/guessnumber-v0", ["miles/GuessNumber-v0"]),
        ("miles/TicTacTo-v0", ["miles/TicTacToe-v0"]),
        ("miles/Unrelated-v0", []),
    ],
)
def test_did_you_mean_lists_only_close_ids(miles_home, typed, suggested):
    from miles_envs.registry.core import close_ids

    known = [s.id for s in Registry().list()]
    assert close_ids(typed, known) == suggested
