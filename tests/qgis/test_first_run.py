"""The plugin's first run as a new user meets it, in real QGIS with real worker processes: the
Settings dialog, finding a worker, explaining what is needed, setting one up from a checkout,
and a worker that stops at start."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager

import pytest
from qgis.core import Qgis, QgsSettings
from qgis.PyQt.QtCore import QCoreApplication, QProcess
from qgis.PyQt.QtWidgets import QDialogButtonBox

from conftest import REPO, WORKER_PYTHON, process_until

WORKER_START_S = 180  # a worker loads its model before it answers; two cores are shared with the tests


def connected(dock) -> bool:
    return dock.worker_panel.status_label.text().startswith("connected")


def notice_text(dock) -> str:
    panel = dock.worker_panel
    return "" if panel.notice.isHidden() else panel.notice_text.text()


def shown(widget) -> bool:
    """Not hidden by the panel (the test's main window itself is never shown on screen)."""
    return not widget.isHidden()


def test_the_settings_dialog_saves_every_value_and_a_reload_restores_them(plugin, new_user_settings, tmp_path):
    import qgis.utils

    Setting = new_user_settings
    values = {Setting.WORKER_PYTHON: str(tmp_path / "venv" / "bin" / "python"),
              Setting.WORKER_DIR: str(tmp_path / "checkout"), Setting.INDEX_ROOT: str(tmp_path / "indexes"),
              Setting.ENDPOINT: "tcp://127.0.0.1:47001", Setting.SERVER_KEY: str(tmp_path / "keys" / "server.key"),
              Setting.CLIENT_KEY: str(tmp_path / "keys" / "client.key_secret")}
    assert set(values) == set(Setting), "the test sets every setting there is"
    plugin.dock.worker_panel.settings_button.click()
    dialog = plugin.dock.settings_dialog
    assert dialog.isVisible()
    for setting, value in values.items():
        assert dialog.form.value(setting) == "", "a new user has nothing saved"
        dialog.form.set_value(setting, value)
    dialog.buttons.button(QDialogButtonBox.Ok).click()
    assert not dialog.isVisible()
    assert plugin.dock.worker_panel.endpoint_edit.text() == values[Setting.ENDPOINT], "the dock shows what was saved"

    assert qgis.utils.reloadPlugin("sketch_search")
    reloaded = qgis.utils.plugins["sketch_search"]
    assert reloaded is not plugin
    reloaded.dock.open_settings()
    form = reloaded.dock.settings_dialog.form
    assert {setting.key: form.value(setting) for setting in values} == {s.key: v for s, v in values.items()}
    reloaded.dock.settings_dialog.reject()
    assert reloaded.dock.worker_panel.endpoint_edit.text() == values[Setting.ENDPOINT]
    settings = QgsSettings()
    settings.sync()
    written = open(settings.fileName()).read()
    assert all(value in written for value in values.values()), "in the profile, for the next QGIS session"

    page = reloaded.options_factory.createWidget(None)  # the plugin's page in Settings > Options
    assert page.form.value(Setting.INDEX_ROOT) == values[Setting.INDEX_ROOT]
    page.form.set_value(Setting.ENDPOINT, "tcp://127.0.0.1:47002")
    page.apply()
    assert Setting.ENDPOINT.get() == "tcp://127.0.0.1:47002"
    assert reloaded.dock.worker_panel.endpoint_edit.text() == "tcp://127.0.0.1:47002"
    page.deleteLater()


def test_without_a_worker_start_explains_what_is_needed_and_set_up_makes_one(
        reloaded_plugin, new_user_settings, tmp_path, qgis_iface, monkeypatch):
    """A checkout nobody has set up: no worker anywhere. Start explains, Set up worker… runs the
    checkout's scripts/setup as a task and starts the worker it made."""
    from lab.worker_process import free_port

    Setting = new_user_settings
    checkout = tmp_path / "sketch-search"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(checkout)], check=True, timeout=120)
    assert not (checkout / ".venv").exists()
    monkeypatch.delenv("SKETCH_SEARCH_WORKER_PYTHON", raising=False)
    monkeypatch.delenv("SKETCH_SEARCH_WORKER_DIR", raising=False)
    Setting.WORKER_DIR.set(str(checkout))
    Setting.INDEX_ROOT.set(str(tmp_path / "indexes"))
    dock, panel = reloaded_plugin.dock, reloaded_plugin.dock.worker_panel
    panel.endpoint_edit.setText(f"tcp://127.0.0.1:{free_port()}")
    qgis_iface.messageBar().clear_messages()
    panel.start_button.click()
    assert process_until(lambda: "needs a worker" in notice_text(dock), 60), notice_text(dock)
    text = notice_text(dock)
    assert "Set up worker" in text and str(checkout) in text and "Change Worker Python" in text
    assert text.count(". ") + text.endswith(".") == 2, "two sentences"
    assert shown(panel.setup_button) and shown(panel.fix_button) and not shown(panel.use_button)
    assert not qgis_iface.messageBar().get_messages(Qgis.Critical), "an explanation, not a raw error"
    assert panel.status_label.text() == "disconnected"

    try:
        panel.setup_button.click()
        assert process_until(lambda: panel.status_label.text() == "setting up the worker…", 10)
        assert shown(panel.setup_progress) and shown(panel.log_view) and shown(panel.cancel_setup_button)
        assert process_until(lambda: connected(dock), WORKER_START_S), (panel.status_label.text(), notice_text(dock),
                                                                         panel.log_view.toPlainText())
        log = panel.log_view.toPlainText()
        assert "ready:" in log and panel.setup_progress.value() == 100, log
        assert Setting.WORKER_PYTHON.get() == str(checkout / ".venv" / "bin" / "python")
        assert Setting.WORKER_DIR.get() == str(checkout)
        assert dock.controller.local_worker.command.worker_dir == str(checkout)
        assert panel.notice.isHidden(), "connected: nothing left to explain"
    finally:
        dock.controller.stop_local_worker()


def test_first_use_offers_the_worker_it_finds_and_a_configured_worker_connects(
        reloaded_plugin, new_user_settings, tmp_path):
    """The test run's SKETCH_SEARCH_WORKER_PYTHON is a usable worker nobody saved yet: the dock
    offers it on first use; once used it is the configured worker, and Start uses it directly.
    Stopping a worker does not wait for it; one started on its port waits until it has gone; Stop
    stops it and disconnects."""
    from lab.worker_process import free_port
    from sketch_search.local_worker import STOPPING, finish_stopping

    Setting = new_user_settings
    Setting.INDEX_ROOT.set(str(tmp_path / "indexes"))
    dock, panel = reloaded_plugin.dock, reloaded_plugin.dock.worker_panel
    reloaded_plugin.action.setChecked(True)  # opening the dock the first time, it looks for a worker by itself
    assert process_until(lambda: "Found a usable worker" in notice_text(dock), 120), notice_text(dock)
    assert WORKER_PYTHON in notice_text(dock) and "SKETCH_SEARCH_WORKER_PYTHON" in notice_text(dock)
    assert shown(panel.use_button)
    panel.endpoint_edit.setText(f"tcp://127.0.0.1:{free_port()}")
    try:
        panel.use_button.click()
        assert process_until(lambda: connected(dock), WORKER_START_S), (panel.status_label.text(), notice_text(dock))
        assert Setting.WORKER_PYTHON.is_saved() and Setting.WORKER_PYTHON.get() == WORKER_PYTHON
        first = dock.controller.local_worker.process
        dock.controller.stop_local_worker()
        assert first.state() != QProcess.NotRunning, "stopping does not wait for the worker: QGIS stays live"
        panel.start_button.click()  # configured now: started at once, nothing asked, on the same port
        assert panel.status_label.text() == "starting local worker…"
        assert process_until(lambda: connected(dock), WORKER_START_S), (panel.status_label.text(), notice_text(dock))
        assert process_until(lambda: not QCoreApplication.instance().findChildren(QProcess, STOPPING), 10), \
            "the first worker has gone, and nothing of it is left"
        assert dock.controller.local_worker.command.python == WORKER_PYTHON
        assert panel.stop_button.isEnabled()
        panel.stop_button.click()  # freeing its memory without quitting QGIS
        assert panel.status_label.text() == "disconnected" and not panel.stop_button.isEnabled()
        assert dock.controller.link is None, "no requests left to time out against a worker that has gone"
        assert finish_stopping(), "as when QGIS quits: waited for until it ended by itself, not killed"
        assert all(p.state() == QProcess.NotRunning and p.exitStatus() == QProcess.NormalExit
                   for p in QCoreApplication.instance().findChildren(QProcess, STOPPING))
        assert panel.status_label.text() == "disconnected", "its serving line, if late, changes nothing"
    finally:
        dock.controller.stop_local_worker()


def test_a_worker_that_stops_at_start_says_which_setting_to_change(plugin, new_user_settings, tmp_path, qgis_iface):
    """QGIS's own Python has no torch (the issue's case): the dock shows the worker's last lines and
    a button to the setting to change."""
    from lab.worker_process import free_port

    Setting = new_user_settings
    Setting.WORKER_PYTHON.set("/usr/bin/python3")
    Setting.WORKER_DIR.set(str(REPO))
    Setting.INDEX_ROOT.set(str(tmp_path / "indexes"))
    dock, panel = plugin.dock, plugin.dock.worker_panel
    panel.endpoint_edit.setText(f"tcp://127.0.0.1:{free_port()}")
    qgis_iface.messageBar().clear_messages()
    panel.start_button.click()
    assert process_until(lambda: "stopped as it started" in notice_text(dock), 60), notice_text(dock)
    text, lines = notice_text(dock), panel.log_view.toPlainText()
    assert "ModuleNotFoundError" in lines and "Traceback" in lines, "the worker's last lines, as it wrote them"
    assert "Worker Python" in text and Setting.WORKER_PYTHON.path in text
    assert panel.status_label.text() == "local worker stopped"
    assert any("Worker Python" in m for m in qgis_iface.messageBar().get_messages(Qgis.Critical))
    assert shown(panel.fix_button) and shown(panel.setup_button)
    panel.fix_button.click()
    dialog = dock.settings_dialog
    assert dialog.isVisible() and dialog.form.value(Setting.WORKER_PYTHON) == "/usr/bin/python3"
    dialog.reject()

    Setting.WORKER_PYTHON.set(str(tmp_path / "no-such-python"))
    panel.start_button.click()
    assert process_until(lambda: "could not be run" in notice_text(dock), 30), notice_text(dock)
    assert "no-such-python" in panel.log_view.toPlainText() and "Worker Python" in notice_text(dock)


def test_a_worker_whose_set_up_did_not_finish_is_not_offered(reloaded_plugin, new_user_settings, tmp_path,
                                                                monkeypatch):
    """A set-up cancelled or failed while downloading leaves a venv that imports the worker and no
    model weights: it was offered as usable, and then stopped at start blaming its Python."""
    monkeypatch.setenv("SKETCH_SEARCH_ASSETS", str(tmp_path / "assets-without-weights"))  # where the weights go
    dock, panel = reloaded_plugin.dock, reloaded_plugin.dock.worker_panel
    reloaded_plugin.action.setChecked(True)
    assert process_until(lambda: "needs a worker" in notice_text(dock), 120), notice_text(dock)
    assert "weights are missing" in panel.log_view.toPlainText() and shown(panel.setup_button)
    assert not shown(panel.use_button)


def test_settings_paths_with_a_tilde_or_relative_are_taken_from_the_home_folder(plugin, new_user_settings):
    """The worker runs in another folder than QGIS: a relative or `~` index folder was made twice,
    once in each working folder, neither in the home folder. The dialog keeps what was typed; a
    bare Python name is found on PATH, as before."""
    import os

    Setting = new_user_settings
    home = os.path.expanduser("~")
    Setting.INDEX_ROOT.set(" ~/sketch-indexes ")
    Setting.WORKER_DIR.set("checkouts/sketch-search")
    Setting.WORKER_PYTHON.set("python3")
    assert Setting.INDEX_ROOT.as_path() == os.path.join(home, "sketch-indexes")
    assert Setting.WORKER_DIR.as_path() == os.path.join(home, "checkouts/sketch-search")
    assert Setting.WORKER_PYTHON.as_path() == "python3"
    plugin.dock.open_settings()
    assert plugin.dock.settings_dialog.form.value(Setting.INDEX_ROOT) == "~/sketch-indexes", "as typed"
    plugin.dock.settings_dialog.reject()


def test_a_worker_checkout_that_is_no_folder_is_the_setting_blamed(plugin, new_user_settings, tmp_path):
    from lab.worker_process import free_port

    Setting = new_user_settings
    Setting.WORKER_PYTHON.set(WORKER_PYTHON)
    Setting.WORKER_DIR.set(str(tmp_path / "moved-away"))
    Setting.INDEX_ROOT.set(str(tmp_path / "indexes"))
    dock, panel = plugin.dock, plugin.dock.worker_panel
    panel.endpoint_edit.setText(f"tcp://127.0.0.1:{free_port()}")
    panel.start_button.click()
    assert process_until(lambda: "moved-away is no folder" in notice_text(dock), 30), notice_text(dock)
    assert "could not be run" in notice_text(dock) and "Change “Worker checkout”" in notice_text(dock)


def fake_checkout(folder, setup_script: str):
    """A folder the plugin takes for a checkout, whose scripts/setup is `setup_script` (bash)."""
    (folder / "worker").mkdir(parents=True)
    (folder / "worker" / "__init__.py").write_text("")
    (folder / "scripts").mkdir()
    (folder / "scripts" / "setup").write_text("#!/usr/bin/env bash\n" + setup_script)
    (folder / "scripts" / "setup").chmod(0o755)
    return folder


@contextmanager
def set_up_running(dock, checkout, endpoint: str):
    """The set-up of `checkout` started (to start its worker at `endpoint`), and cancelled on
    leaving if it still runs: one left running would hold the shared dock in later tests."""
    dock.controller.set_up_worker(checkout, endpoint)
    try:
        yield
    finally:
        dock.controller.finder.cancel_setup()
        process_until(lambda: not dock.controller.finder.setting_up, 10)


def test_a_set_up_mid_line_is_cancelled_at_once_and_a_failed_one_offers_the_right_setting(
        reloaded_plugin, new_user_settings, tmp_path, qgis_iface):
    """Cancel set-up waited for the script's next line: one that wrote part of a line and then
    worked (a download) kept the cancel, and QGIS's task, waiting until it ended. A set-up that
    failed offered to change the setting an earlier notice had blamed (here the checkout). A
    worker that stopped while a set-up ran replaced the set-up's log and hid its Cancel."""
    import time

    from lab.worker_process import free_port

    Setting = new_user_settings
    Setting.WORKER_PYTHON.set(WORKER_PYTHON)
    Setting.WORKER_DIR.set(str(tmp_path / "moved-away"))
    Setting.INDEX_ROOT.set(str(tmp_path / "indexes"))
    dock, panel = reloaded_plugin.dock, reloaded_plugin.dock.worker_panel  # no worker linked, no notice left
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    panel.endpoint_edit.setText(endpoint)
    panel.start_button.click()
    assert process_until(lambda: dock.controller.local_worker is None, 30), "its failed start is told later"
    moved_away = str(tmp_path / "moved-away")
    assert moved_away in notice_text(dock) and "Change “Worker checkout”" in notice_text(dock), notice_text(dock)

    slow = fake_checkout(tmp_path / "slow", "echo 'creating worker venv'\nprintf 'downloading torch'\nsleep 120\n")
    qgis_iface.messageBar().clear_messages()
    panel.start_button.click()  # fails again: Qt tells it later, here while the set-up runs
    assert dock.controller.local_worker is not None, "not told yet"
    with set_up_running(dock, slow, endpoint):
        time.sleep(1)  # the failed start and the set-up's first line, both waiting to be told
        assert process_until(lambda: dock.controller.local_worker is None, 30)
        assert process_until(lambda: "creating worker venv" in panel.log_view.toPlainText(), 30), \
            panel.log_view.toPlainText()
        assert "Setting up the worker" in notice_text(dock) and shown(panel.cancel_setup_button)
        assert panel.status_label.text() == "setting up the worker…"
        meanwhile = [line for line in panel.log_view.toPlainText().splitlines() if line.startswith("(meanwhile)")]
        assert len(meanwhile) == 1 and moved_away in meanwhile[0], panel.log_view.toPlainText()
        assert any(moved_away in m for m in qgis_iface.messageBar().get_messages(Qgis.Critical))
        panel.cancel_setup_button.click()
        assert process_until(lambda: "Setting up the worker was cancelled" in notice_text(dock), 5), \
            (notice_text(dock), panel.log_view.toPlainText())

    failing = fake_checkout(tmp_path / "failing", "printf 'fetching 10%%\\rfetching 90%%\\r\\n'\n"
                                                  "echo 'python3.11 not found' >&2\nexit 3\n")
    dock.controller.set_up_worker(failing, endpoint)
    assert process_until(lambda: "Setting up the worker failed" in notice_text(dock), 30), notice_text(dock)
    assert panel.log_view.toPlainText().splitlines()[-3:] == ["fetching 10%", "fetching 90%", "python3.11 not found"]
    assert "python3.11 not found" in notice_text(dock), "the script's last line, from its error output"
    assert shown(panel.setup_button) and shown(panel.fix_button)
    assert panel.fix_button.text() == "Change Worker Python…", "an existing Python instead, not the checkout"


def test_a_set_up_while_the_dock_uses_another_worker_keeps_its_view_and_leaves_that_worker_in_use(
        plugin, new_user_settings, tmp_path, worker, qgis_iface, monkeypatch):
    """A set-up takes minutes (torch is GBs); meanwhile the user connects to a worker already
    running (a GPU machine's). Connecting hid the set-up's log and Cancel, Start (no worker
    configured) replaced them with a search for one, and the set-up, once done, started its
    worker and took the dock's connection from the worker the user had chosen."""
    from lab.worker_process import free_port
    from test_plugin import connected_to

    monkeypatch.delenv("SKETCH_SEARCH_WORKER_PYTHON", raising=False)  # no worker configured
    Setting = new_user_settings
    Setting.INDEX_ROOT.set(str(tmp_path / "indexes"))
    dock, panel = plugin.dock, plugin.dock.worker_panel
    checkout = fake_checkout(tmp_path / "checkout", "echo 'creating worker venv'\nmkdir -p .venv/bin\n"
                                                    "touch .venv/bin/python\n"
                                                    "while [ ! -e done-downloading ]; do sleep 0.1; done\n")
    its_endpoint = f"tcp://127.0.0.1:{free_port()}"
    with set_up_running(dock, checkout, its_endpoint):
        assert process_until(lambda: "creating worker venv" in panel.log_view.toPlainText(), 30)
        connected_to(dock, worker)
        assert "Setting up the worker" in notice_text(dock), notice_text(dock)
        assert shown(panel.cancel_setup_button) and "creating worker venv" in panel.log_view.toPlainText()
        qgis_iface.messageBar().clear_messages()
        panel.start_button.click()
        told = f"The worker is being set up: it starts at {its_endpoint} once it is"
        assert process_until(lambda: any(told in m for m in qgis_iface.messageBar().get_messages(Qgis.Info)), 5), \
            "not at the endpoint Connect put in the box, the other worker's"
        assert "Setting up the worker" in notice_text(dock) and shown(panel.cancel_setup_button)

        (checkout / "done-downloading").touch()
        assert process_until(lambda: not dock.controller.finder.setting_up, 10)
        assert (f"It was not started, as this dock is connected to the worker at {worker.bind}: to use it, press "
                f"Start local worker with the endpoint {its_endpoint}.") in notice_text(dock), notice_text(dock)
        assert dock.controller.link.endpoint == worker.bind and panel.status_label.text().startswith("connected")
        assert dock.controller.local_worker is None
        assert Setting.WORKER_PYTHON.get() == str(checkout / ".venv" / "bin" / "python"), "Start local worker uses it"


def test_an_endpoint_zeromq_cannot_dial_is_refused_before_a_set_up_and_never_replaces_the_one_it_starts_at(
        reloaded_plugin, new_user_settings, tmp_path, qgis_iface):
    """The endpoint was checked only once a set-up had ended, minutes later: the dock then said
    "Starting it…" while nothing started, and the light stayed at "setting up". Start pressed
    during a set-up with a worker configured also kept a mistyped endpoint as where the set-up's
    worker would start."""
    from lab.worker_process import free_port

    Setting = new_user_settings
    Setting.WORKER_PYTHON.set(WORKER_PYTHON)  # a worker configured: the user sets up another one
    Setting.WORKER_DIR.set(str(REPO))
    Setting.INDEX_ROOT.set(str(tmp_path / "indexes"))
    dock, panel = reloaded_plugin.dock, reloaded_plugin.dock.worker_panel  # linked to no worker: its own starts
    checkout = fake_checkout(tmp_path / "checkout", "echo 'creating worker venv'\nmkdir -p .venv/bin\n"
                                                    "touch .venv/bin/python\n"
                                                    "while [ ! -e done-downloading ]; do sleep 0.1; done\n")
    mistyped = "localhost:5555"
    how_written = "an endpoint is written tcp://HOST:PORT"
    qgis_iface.messageBar().clear_messages()
    with set_up_running(dock, checkout, mistyped):
        assert any(how_written in m for m in qgis_iface.messageBar().get_messages(Qgis.Warning)), "told at once"
        assert not dock.controller.finder.setting_up

    its_endpoint = f"tcp://127.0.0.1:{free_port()}"
    lights = []
    dock.controller.status_changed.connect(lambda text, _: lights.append(text))
    try:
        with set_up_running(dock, checkout, its_endpoint):
            assert process_until(lambda: "creating worker venv" in panel.log_view.toPlainText(), 30)
            qgis_iface.messageBar().clear_messages()
            panel.endpoint_edit.setText(mistyped)
            panel.start_button.click()
            assert any(how_written in m for m in qgis_iface.messageBar().get_messages(Qgis.Warning))
            assert dock.controller.local_worker is None and "Setting up the worker" in notice_text(dock)

            lights.clear()
            (checkout / "done-downloading").touch()
            assert process_until(lambda: not dock.controller.finder.setting_up, 10)
            assert process_until(lambda: "local worker stopped" in lights, 30), (lights, notice_text(dock))
        assert lights[0] == "starting local worker…", lights
        assert Setting.ENDPOINT.get() == its_endpoint, "started where the set-up was asked to start it"
        assert Setting.WORKER_PYTHON.get() == str(checkout / ".venv" / "bin" / "python")
    finally:
        dock.controller.stop_local_worker()


def test_a_local_worker_refused_the_endpoint_of_the_worker_in_use_leaves_that_connection(
        plugin, new_user_settings, tmp_path, worker):
    """Start with the endpoint still at the worker the dock is connected to (Connect puts it in the
    box): the local worker cannot take the port and stops, and the dock closed its connection to
    the worker in use as if that one had stopped (the two were matched by endpoint alone)."""
    from test_plugin import connected_to

    Setting = new_user_settings
    Setting.WORKER_PYTHON.set(WORKER_PYTHON)
    Setting.WORKER_DIR.set(str(REPO))
    Setting.INDEX_ROOT.set(str(tmp_path / "indexes"))
    dock, panel = plugin.dock, plugin.dock.worker_panel
    connected_to(dock, worker)
    panel.start_button.click()
    assert process_until(lambda: "stopped as it started" in notice_text(dock), WORKER_START_S), notice_text(dock)
    assert "Address already in use" in panel.log_view.toPlainText() and "Endpoint" in notice_text(dock)
    assert dock.controller.link is not None and dock.controller.link.endpoint == worker.bind
    assert panel.status_label.text().startswith("connected"), "the worker in use is still connected"


@pytest.mark.parametrize("lines, key", [
    (["ModuleNotFoundError: No module named 'worker'"], "worker_dir"),
    (["zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:5555')"], "endpoint"),
    # an ipc endpoint another worker serves, and one the worker cannot serve on: the Python was blamed
    (["error: cannot listen on ipc:///tmp/w.sock: another worker is serving there; stop it, or choose another "
      "address with --bind"], "endpoint"),
    (["error: --bind 'tcp://127.0.0.1:99999': the port must be a number from 1 to 65535"], "endpoint"),
    (["ModuleNotFoundError: No module named 'torch'"], "python"),
    # a worker serving logs its jobs, naming the index folder: a crash was blamed on that setting
    (["2026-12-06 14:40:12,430 INFO worker.service.jobs: index job 1f of {index_root}/coast: running",
      "2026-12-06 14:40:13,001 WARNING worker.service.jobs: index job 1f of {index_root}/coast: failed: no disk",
      "MemoryError"], "python")])
def test_the_setting_to_blame_follows_the_last_lines(plugin, new_user_settings, lines, key):
    from sketch_search.local_worker import WorkerExit, setting_to_blame

    lines = [line.format(index_root=new_user_settings.INDEX_ROOT.as_path()) for line in lines]
    assert setting_to_blame(lines).key == key
    # the line quoted as why it stopped is no log record of what it did; one killed quotes none
    stopped = WorkerExit(1, tuple(lines), setting_to_blame(lines), was_serving=True)
    assert f"stopped (exit code 1): {lines[-1]}." in stopped.message
    killed = WorkerExit(9, tuple(lines), setting_to_blame(lines), was_serving=True, killed=True)
    assert "(signal 9). Start local worker starts it again" in killed.message


def test_a_local_worker_killed_mid_search_and_mid_index_is_started_again_and_its_job_followed(
        plugin, new_user_settings, tmp_path, qgis_iface):
    """Killed (the OOM killer, `kill -9`): a search waiting on it ends and Search comes back; the
    build's progress says interrupted; the message says to start it again, not to change a working
    Python; started again, the worker goes on with the job, and the dock follows it (Cancel too)."""
    import os
    import signal
    import socket

    from lab.worker_process import free_port
    from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer
    from test_plugin import line_sketch
    from worker.assets import load_asset_paths

    Setting = new_user_settings
    Setting.WORKER_PYTHON.set(WORKER_PYTHON)
    Setting.WORKER_DIR.set(str(REPO))
    Setting.INDEX_ROOT.set(str(tmp_path / "indexes"))
    dock, panel, index_panel = plugin.dock, plugin.dock.worker_panel, plugin.dock.index_panel

    def start() -> int:
        panel.start_button.click()
        assert process_until(lambda: connected(dock), WORKER_START_S), (panel.status_label.text(), notice_text(dock))
        return dock.controller.local_worker.process.processId()

    def killed_notice() -> bool:
        return "was killed (out of memory, or kill -9) (signal 9)." in notice_text(dock)

    for _ in range(20):  # a free port whose next one is free too (another connection's own port took it once)
        port, next_port = free_port(), socket.socket()
        try:
            next_port.bind(("127.0.0.1", port + 1))  # the worker's default progress port, taken (another QGIS's worker)
            break
        except OSError:
            next_port.close()
    else:
        pytest.fail("no free port whose next one is free")
    panel.endpoint_edit.setText(f"tcp://127.0.0.1:{port}")
    scene = QgsRasterLayer(load_asset_paths()["s2_rgb"], "s2")  # 6,561 tiles of 32 px: minutes to index
    QgsProject.instance().addMapLayer(scene)
    QgsProject.instance().setCrs(QgsCoordinateReferenceSystem("EPSG:3857"))  # hits are drawn in it
    qgis_iface.mapCanvas().setDestinationCrs(QgsProject.instance().crs())
    try:
        pid = start()
        index_panel.table.clearSelection()
        index_panel.name_edit.setText("fine")
        index_panel.tiling_form.tile_spin.setValue(32)  # thousands of tiles: still running when killed
        index_panel.tiling_form.scales_edit.setText("1")
        index_panel.build_button.click()
        assert process_until(lambda: index_panel.progress.format().startswith("running"), 120), \
            index_panel.progress.format()
        def listed_for_search() -> bool:  # once its first tiles are committed (every few seconds)
            index_panel.refresh_button.click()
            return process_until(lambda: dock.index_combo.findText("fine") >= 0, 3)
        assert any(listed_for_search() for _ in range(20))
        dock.index_combo.setCurrentText("fine")
        dock.load_sketch_image(str(line_sketch(tmp_path / "sketch.png")))
        qgis_iface.messageBar().clear_messages()
        os.kill(pid, signal.SIGSTOP)  # it takes the search and never answers
        dock.search_button.click()
        assert dock.searching, qgis_iface.messageBar().get_messages(Qgis.Warning)
        os.kill(pid, signal.SIGKILL)
        assert process_until(killed_notice, 30), notice_text(dock)
        assert not dock.searching, "the search ended with its worker"
        assert index_panel.progress.format().endswith("then disconnected from the worker")
        assert not index_panel.cancel_button.isEnabled()
        assert "Start local worker starts it again; an indexing job" in notice_text(dock)
        assert "Worker Python" not in notice_text(dock)
        assert panel.fix_button.isHidden() and panel.setup_button.isHidden(), "no setting to change"

        start()
        assert process_until(lambda: index_panel.progress.format().startswith("running"), 60), \
            "the job the worker went on with is followed again"
        start()  # Start again: the worker asked to stop says the job is interrupted, the next goes on with it
        assert process_until(lambda: index_panel.progress.format().startswith("running"), 60), \
            index_panel.progress.format()
        index_panel.cancel_button.click()
        assert process_until(lambda: index_panel.progress.format().startswith("cancelled"), 60), \
            index_panel.progress.format()
    finally:
        dock.clear_sketch()
        dock.controller.stop_local_worker()
        QgsProject.instance().removeMapLayer(scene.id())
        next_port.close()


@pytest.mark.parametrize("job_file, said", [
    (None, "left is incomplete (* tiles) and no longer being built: Build / extend it to finish it"),
    ("{damaged", "left: indexing could not go on: * is damaged or cannot be read *")])
def test_a_lost_job_the_restarted_worker_does_not_go_on_with_says_how_the_index_was_left(
        plugin, new_user_settings, tmp_path, qgis_iface, job_file, said):
    """A job lost with its worker, which the worker started again no longer runs (it finished
    before the dock asked, or it could not be taken up: its job file gone, or damaged): the
    progress bar said "then disconnected from the worker" for good."""
    import fnmatch

    import os
    import signal

    from lab.worker_process import free_port
    from qgis.core import QgsProject, QgsRasterLayer
    from worker.assets import load_asset_paths

    Setting = new_user_settings
    Setting.WORKER_PYTHON.set(WORKER_PYTHON)
    Setting.WORKER_DIR.set(str(REPO))
    Setting.INDEX_ROOT.set(str(tmp_path / "indexes"))
    dock, panel, index_panel = plugin.dock, plugin.dock.worker_panel, plugin.dock.index_panel
    panel.endpoint_edit.setText(f"tcp://127.0.0.1:{free_port()}")
    scene = QgsRasterLayer(load_asset_paths()["s2_rgb"], "s2")  # the raster the index is built of
    QgsProject.instance().addMapLayer(scene)
    try:
        panel.start_button.click()
        assert process_until(lambda: connected(dock), WORKER_START_S), (panel.status_label.text(), notice_text(dock))
        index_panel.table.clearSelection()
        index_panel.name_edit.setText("left")
        index_panel.tiling_form.tile_spin.setValue(32)  # thousands of tiles: still running when killed
        index_panel.tiling_form.scales_edit.setText("1")
        index_panel.build_button.click()

        def committed() -> bool:  # once its first tiles are committed (every few seconds)
            index_panel.refresh_button.click()
            item = lambda: dock.controller.index_named("left") or {}  # noqa: E731
            return process_until(lambda: item().get("path", "").startswith(str(tmp_path)) and item()["tile_count"], 3)
        assert any(committed() for _ in range(20)), index_panel.progress.format()
        assert index_panel.progress.format().startswith("running"), index_panel.progress.format()
        os.kill(dock.controller.local_worker.process.processId(), signal.SIGKILL)
        assert process_until(lambda: index_panel.progress.format().endswith("then disconnected from the worker"), 30)
        left_behind = tmp_path / "indexes" / "left" / "job.json"  # what the next worker would go on with
        left_behind.unlink() if job_file is None else left_behind.write_text(job_file)

        panel.start_button.click()
        assert process_until(lambda: fnmatch.fnmatch(index_panel.progress.format(), said), WORKER_START_S), \
            index_panel.progress.format()
        assert not index_panel.cancel_button.isEnabled()
        # the bar cuts a long one (an error's message): whole in its tooltip and the message bar
        assert index_panel.progress.toolTip() == index_panel.progress.format()
        assert f"Index {index_panel.progress.format()}." in qgis_iface.messageBar().get_messages(Qgis.Info)[-1]
    finally:
        dock.controller.stop_local_worker()
        QgsProject.instance().removeMapLayer(scene.id())
