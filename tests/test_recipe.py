"""``herd recipe``: stages run in order, a finished stage is skipped, a changed one is refused until --redo (which
also reruns what reads it), a failed stage is not marked done."""

import json

import pytest

from herd.cli import main as cli
from herd.errors import ConfigError, HerdError
from herd.recipe import KINDS, Recipe, run, status

RECIPE = """
[recipe]
name = "mini"
out_dir = "out"

[[stage]]
name = "captions"
kind = "captions"
n = {n}
kinds = ["digits"]

[[stage]]
name = "listing"
kind = "command"
args = ["info", "tiny", "--json"]

[[stage]]
name = "copy"
kind = "command"
args = ["new", "tiny", "{{out}}/model", "--seed", "{{captions}}"]
"""


def write(tmp_path, n=2, text=RECIPE):
    path = tmp_path / "r.toml"
    path.write_text(text.format(n=n))
    return Recipe.load(path)


def test_stages_run_once_and_are_skipped_after(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setitem(KINDS, "command", lambda s, out: seen.append((s["args"], out)))
    r = write(tmp_path)
    assert status(r) == {"captions": "todo", "listing": "todo", "copy": "todo"}
    assert run(r, progress=False) == {"captions": "ran", "listing": "ran", "copy": "ran"}
    assert (tmp_path / "out" / "captions" / "captions" / "captions.jsonl").is_file()
    # {out} and {captions} became the stages' directories
    assert seen[1][0] == ["new", "tiny", str((tmp_path / "out" / "copy").resolve()) + "/model", "--seed",
                          str((tmp_path / "out" / "captions").resolve())]
    assert run(write(tmp_path), progress=False) == {s: "skipped" for s in ("captions", "listing", "copy")}
    assert len(seen) == 2
    done = json.loads((tmp_path / "out" / "listing" / "DONE.json").read_text())
    assert done["kind"] == "command" and done["settings"]["args"][0] == "info"


def test_a_changed_stage_is_refused_until_redo_which_reruns_its_readers(tmp_path, monkeypatch):
    monkeypatch.setitem(KINDS, "command", lambda s, out: None)
    run(write(tmp_path), progress=False)
    r = write(tmp_path, n=3)
    assert status(r) == {"captions": "changed", "listing": "done", "copy": "changed"}  # copy reads captions
    with pytest.raises(ConfigError, match="'captions'.*--redo captions"):
        run(r, progress=False)
    assert run(r, redo=("captions",), progress=False) == {"captions": "ran", "listing": "skipped", "copy": "ran"}
    assert json.loads((tmp_path / "out" / "captions" / "captions" / "index.json").read_text())["samples"] == 3


def test_a_failed_stage_is_not_done_and_stops_the_recipe(tmp_path, capsys):
    text = RECIPE.replace('args = ["info", "tiny", "--json"]', 'args = ["info", "no-such-preset"]')
    path = tmp_path / "r.toml"
    path.write_text(text.format(n=2))
    assert cli(["recipe", str(path), "--no-progress"]) == 2
    assert "exited with status" in capsys.readouterr().err
    r = Recipe.load(path)
    assert status(r) == {"captions": "done", "listing": "todo", "copy": "todo"}  # its directory is empty
    assert not (tmp_path / "out" / "listing" / "DONE.json").exists()


def test_a_real_command_stage_and_the_list(tmp_path, capsys):
    text = RECIPE.split("[[stage]]\nname = \"listing\"")[0]
    path = tmp_path / "r.toml"
    path.write_text(text.format(n=1) + '[[stage]]\nname = "model"\nkind = "command"\n'
                    'args = ["new", "tiny", "{out}/model"]\n')
    assert cli(["recipe", str(path), "--no-progress"]) == 0
    assert (tmp_path / "out" / "model" / "model" / "config.json").is_file()
    assert cli(["recipe", str(path), "--list"]) == 0
    assert capsys.readouterr().out.split()[-4:] == ["captions", "done", "model", "done"]


@pytest.mark.parametrize("stage, message", [
    ('name = "a"\nkind = "teleport"', "kind 'teleport'"),
    ('name = "a"\nkind = "command"\nargs = ["{later}"]', "not an earlier stage"),
    ('name = "bad name"\nkind = "command"', "needs a name"),
])
def test_bad_recipes_are_named(tmp_path, stage, message):
    path = tmp_path / "r.toml"
    path.write_text(f'[recipe]\nout_dir = "o"\n\n[[stage]]\n{stage}\n')
    with pytest.raises(ConfigError, match=message):
        Recipe.load(path)
    path.write_text('[recipe]\nout_dir = "o"\n[[stage]]\nname = "a"\nkind = "command"\n'
                    '[[stage]]\nname = "a"\nkind = "command"\n')
    with pytest.raises(ConfigError, match="used twice"):
        Recipe.load(path)
    with pytest.raises(HerdError):
        Recipe.load(tmp_path / "missing.toml")


def test_only_runs_one_stage_once_the_earlier_ones_are_done(tmp_path, monkeypatch):
    monkeypatch.setitem(KINDS, "command", lambda s, out: None)
    r = write(tmp_path)
    with pytest.raises(ConfigError, match="--only listing: stage 'captions' before it is not done"):
        run(r, only="listing", progress=False)
    with pytest.raises(ConfigError, match="no stage 'nope'"):
        run(r, only="nope", progress=False)
    assert run(r, only="captions", progress=False) == {"captions": "ran", "listing": "skipped", "copy": "skipped"}
    assert status(r) == {"captions": "done", "listing": "todo", "copy": "todo"}
