"""The shared command helpers: nothing half-written stays after a failure; missing extras are named."""

import pytest

from miles_envs.cli.common import missing_extra, removed_on_failure


class Interrupted(Exception):
    pass


def write_then_fail(path, files=("a.bin", "sub/b.bin")):
    with pytest.raises(Interrupted), removed_on_failure(path):
        for name in files:
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(b"partial")
        raise Interrupted


def test_a_new_folder_is_removed_when_writing_it_fails(tmp_path):
    write_then_fail(tmp_path / "index")
    assert list(tmp_path.iterdir()) == []


def test_folders_made_above_a_new_folder_go_too(tmp_path):
    with pytest.raises(Interrupted), removed_on_failure(tmp_path / "models" / "demo"):
        (tmp_path / "models" / "demo").mkdir(parents=True)
        raise Interrupted
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_existed_is_kept_but_emptied(tmp_path):
    (tmp_path / "model").mkdir()
    write_then_fail(tmp_path / "model")
    assert (tmp_path / "model").is_dir() and list((tmp_path / "model").iterdir()) == []


def test_a_half_written_file_is_removed(tmp_path):
    page = tmp_path / "page.html"
    with pytest.raises(Interrupted), removed_on_failure(page):
        page.write_text("<html>half")
        raise Interrupted
    assert not page.exists()


def test_success_keeps_everything(tmp_path):
    with removed_on_failure(tmp_path / "out"):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "done").write_text("ok")
    assert (tmp_path / "out" / "done").read_text() == "ok"


@pytest.mark.parametrize(
    ("error", "advice"),
    [
        (ModuleNotFoundError("No module named 'torch'", name="torch"), "pip install 'miles-envs[embedded]'"),
        (ModuleNotFoundError("No module named 'bm25s.tokenization'", name="bm25s.tokenization"), "pip install 'miles-envs[search]'"),
        (ImportError("apply_chat_template requires jinja2 to be installed."), "pip install 'miles-envs[tokenizers]'"),
        (ImportError("cannot import name 'thing' from 'miles_envs'"), None),
    ],
)
def test_missing_extra_names_the_extra_to_install(error, advice):
    message = missing_extra(error)
    assert message == advice if advice is None else message.endswith(advice)


def test_a_file_in_new_folders_gets_them_and_a_failure_takes_them_away(tmp_path):
    page = tmp_path / "new" / "deeper" / "page.html"
    with pytest.raises(Interrupted), removed_on_failure(page, make_parent=True):
        page.write_text("<html>half")
        raise Interrupted
    assert list(tmp_path.iterdir()) == []
    with removed_on_failure(page, make_parent=True):
        page.write_text("<html></html>")
    assert page.read_text() == "<html></html>"
