"""The dock's Worker box: connect or start a worker, its status light, and a notice that says,
on first use, what was found or what is needed (with the buttons to act on it)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Callable, Optional

from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (QFileDialog, QFormLayout, QFrame, QGroupBox, QHBoxLayout, QLabel, QLineEdit,
                                 QPlainTextEdit, QProgressBar, QPushButton, QVBoxLayout, QWidget)

from .checkout import known_checkout
from .widgets import add_button
from .controller import SearchController, Status
from .local_worker import WorkerExit
from .user_requests import Connection
from .settings import Setting
from .worker_detection import SETTINGS_SOURCE, ProbeResult
from .worker_finder import MissingWorker

NEEDED = ("Sketch search needs a worker: a Python with torch and the sketch-search <i>worker</i> package, which "
          "does the searching, on this machine or on a GPU machine.")
NONE_HERE = ("None was found here: press <b>Set up worker…</b> to install one from {where} (several GB; it runs "
             "in the background), or press <b>Change Worker Python…</b> to choose an existing one.")
LOG_BLOCKS = 400  # lines kept in the log view


class WorkerPanel(QGroupBox):
    def __init__(self, controller: SearchController, open_settings: Callable[[Setting], None],
                 parent: Optional[QWidget] = None):
        super().__init__("Worker", parent)
        self.controller = controller
        self.open_settings = open_settings
        self.offered: Optional[ProbeResult] = None  # the worker Use this worker would save and start
        self.setting_to_change = Setting.WORKER_PYTHON  # what the notice's Change … button opens Settings at
        layout = QVBoxLayout(self)
        form = QFormLayout()
        layout.addLayout(form)
        self.endpoint_edit = QLineEdit(Setting.ENDPOINT.get())
        self.endpoint_edit.setToolTip(Setting.ENDPOINT.help_text)
        form.addRow("Endpoint", self.endpoint_edit)
        row = QHBoxLayout()
        self.connect_button = add_button("Connect", "Connect to a worker already running at the endpoint "
                                                      "(with the key files from Settings for a remote one).", row)
        self.start_button = add_button("Start local worker", "Run the worker on this machine with the worker "
                                                               "Python from Settings; with none set, look for one.", row)
        self.stop_button = add_button("Stop", "Stop the local worker started here, freeing its memory (an indexing "
                                              "job commits its batch first; start it again to resume the job).", row)
        form.addRow(row)
        self.status_light = QLabel("●")
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        self.status_label.setToolTip("Whether a worker answers, where it computes and which model it has.")
        self.status_light.setToolTip(self.status_label.toolTip())
        status = QHBoxLayout()
        status.addWidget(self.status_light)
        status.addWidget(self.status_label, 1)
        self.settings_button = add_button("Settings…", "The worker Python, checkout, index folder, endpoint "
                                                         "and key files.", status)
        form.addRow("Status", status)
        layout.addWidget(self._build_notice())
        self.connect_button.clicked.connect(self.connect_worker)
        self.start_button.clicked.connect(self.start_worker)
        self.stop_button.clicked.connect(self.stop_worker)
        self.settings_button.clicked.connect(lambda: self.open_settings(Setting.WORKER_PYTHON))
        finder = controller.finder
        finder.searching.connect(self._show_searching)
        finder.found.connect(self._show_found)
        finder.missing.connect(self._show_missing)
        finder.setup_started.connect(self._show_setup_started)
        finder.setup_line.connect(self.log_view.appendPlainText)
        finder.setup_progress.connect(lambda percent: self.setup_progress.setValue(int(percent)))
        controller.set_up_ended.connect(self._show_setup_ended)
        controller.status_changed.connect(self.show_status)
        controller.worker_stopped.connect(self._show_stopped)
        self.show_status(*Status.DISCONNECTED)

    def _build_notice(self) -> QFrame:
        self.notice = QFrame()
        self.notice.setFrameShape(QFrame.StyledPanel)
        layout = QVBoxLayout(self.notice)
        self.notice_text = QLabel()
        self.notice_text.setTextFormat(Qt.RichText)  # escaped text: a path's "&" shown as "&", never "&amp;"
        self.notice_text.setWordWrap(True)
        self.notice_text.setToolTip("What the plugin found out about the worker, and what to do.")
        layout.addWidget(self.notice_text)
        self.setup_progress = QProgressBar()
        self.setup_progress.setRange(0, 100)
        self.setup_progress.setToolTip("How far scripts/setup is, by the steps it has announced.")
        layout.addWidget(self.setup_progress)
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(LOG_BLOCKS)
        self.log_view.setMaximumHeight(110)
        self.log_view.setToolTip("The set-up script's log, or the last lines the worker wrote before it stopped.")
        layout.addWidget(self.log_view)
        row = QHBoxLayout()
        self.use_button = add_button("Use this worker", "Save this worker Python in Settings and start it.", row)
        self.setup_button = add_button("Set up worker…", "Run the sketch-search checkout's scripts/setup "
                                                           "(installs torch and the model), then start the worker.", row)
        self.cancel_setup_button = add_button("Cancel set-up", "Stop scripts/setup; run it again later to "
                                                                 "resume.", row)
        self.fix_button = add_button("", "Open Settings at the setting to change.", row)
        row.addStretch(1)
        layout.addLayout(row)
        self.use_button.clicked.connect(self._use_offered)
        self.setup_button.clicked.connect(self.set_up_worker)
        self.cancel_setup_button.clicked.connect(self.controller.finder.cancel_setup)
        self.fix_button.clicked.connect(lambda: self.open_settings(self.setting_to_change))
        self.notice.hide()
        return self.notice

    def _show_notice(self, text: str, *buttons: QPushButton, fix: Setting | None = None, lines: tuple = (),
                     progress: bool = False) -> None:
        """Show `text` with `buttons`, and a Change … button opening Settings at `fix` when given."""
        self.notice_text.setText(text)
        if fix is not None:
            self.setting_to_change = fix
            self.fix_button.setText(f"Change {fix.label}…")
        for button in (self.use_button, self.setup_button, self.cancel_setup_button):
            button.setVisible(button in buttons)
        self.fix_button.setVisible(fix is not None)
        self.setup_progress.setVisible(progress)
        if lines:
            self.log_view.setPlainText("\n".join(lines))
        self.log_view.setVisible(bool(lines) or progress)
        self.notice.show()

    # -- what the controller says ----------------------------------------------------------------
    def show_status(self, text: str, colour: str) -> None:
        self.status_light.setStyleSheet(f"color: {colour}; font-size: 16px")
        self.status_label.setText(text)
        self.stop_button.setEnabled(self.controller.local_worker is not None)
        if text.startswith("connected") and not self.controller.finder.setting_up:  # a set-up's log and Cancel stay
            self.notice.hide()

    def _show_searching(self) -> None:
        self._show_notice("Looking for a worker on this machine…")

    def _show_found(self, found: ProbeResult) -> None:
        command = found.candidate.command
        if found.candidate.source == SETTINGS_SOURCE:
            self.offered = None
            return self._show_notice(f"The worker in Settings is ready ({html.escape(found.detail)}): press "
                                     "<b>Start local worker</b>.")
        self.offered = found
        self._show_notice(f"Found a usable worker: <b>{html.escape(command.python)}</b> "
                          f"(from {html.escape(found.candidate.source)}; {html.escape(found.detail)}).",
                          self.use_button, fix=Setting.WORKER_PYTHON)

    def _show_missing(self, missing: MissingWorker) -> None:
        where = (f"the checkout in {html.escape(str(missing.checkout))}" if missing.checkout
                 else "the sketch-search repository, whose folder you choose")
        tried = tuple(f"{r.candidate.command.python} ({r.candidate.source}): {r.detail}" for r in missing.tried)
        self._show_notice(f"{NEEDED} {NONE_HERE.format(where=where)}", self.setup_button, fix=Setting.WORKER_PYTHON,
                          lines=tried)

    def _show_setup_started(self, checkout: str) -> None:
        self.log_view.clear()
        self.setup_progress.setValue(0)
        self._show_notice(f"Setting up the worker in {html.escape(checkout)} (its scripts/setup)…",
                          self.cancel_setup_button, progress=True)

    def _show_setup_ended(self, ok: bool, message: str, starts: bool) -> None:
        if starts:
            self._show_notice(html.escape(message) + " Starting it…", progress=True)
        elif ok:
            self._show_notice(html.escape(message))
        else:
            self._show_notice(html.escape(message), self.setup_button, fix=Setting.WORKER_PYTHON, progress=False,
                              lines=tuple(self.log_view.toPlainText().splitlines()))

    def _show_stopped(self, exit_: WorkerExit) -> None:
        if self.controller.finder.setting_up:  # its notice, log and Cancel stay; the stop joins its log
            self.log_view.appendPlainText(f"(meanwhile) {exit_.message}")
            return
        set_up = (self.setup_button,) if exit_.blamed == Setting.WORKER_PYTHON else ()
        self._show_notice(html.escape(exit_.message) + " Its last lines:", *set_up, fix=exit_.blamed,
                          lines=exit_.last_lines)

    # -- what the user does ----------------------------------------------------------------------
    def connection(self) -> Connection:
        return Connection(self.endpoint_edit.text().strip(), Setting.SERVER_KEY.as_path(),
                          Setting.CLIENT_KEY.as_path())

    def connect_worker(self) -> None:
        self.controller.connect_worker(self.connection())

    def start_worker(self) -> None:
        self.controller.start_local_worker(self.endpoint_edit.text().strip())

    def stop_worker(self) -> None:
        self.controller.stop_by_user()
        self.stop_button.setEnabled(self.controller.local_worker is not None)

    def _use_offered(self) -> None:
        if self.offered is not None:
            self.controller.use_worker(self.offered.candidate.command, self.endpoint_edit.text().strip())

    def set_up_worker(self) -> None:
        """Set up from the known checkout, or from the folder the user picks."""
        checkout = known_checkout()
        if checkout is None:
            chosen = QFileDialog.getExistingDirectory(self, "Choose the sketch-search repository folder")
            if not chosen:
                return
            checkout = Path(chosen)
        self.controller.set_up_worker(checkout, self.endpoint_edit.text().strip())

    def reload_settings(self) -> None:
        """Show what Settings now say (after the Settings dialog or Options page saved)."""
        self.endpoint_edit.setText(Setting.ENDPOINT.get())
