"""The plugin's settings as a form: in a dialog opened from the dock, and as the plugin's page in
Settings > Options. One form, so both show and save the same keys the same way."""

from __future__ import annotations

from typing import Callable, Optional

from qgis.gui import QgsFileWidget, QgsOptionsPageWidget, QgsOptionsWidgetFactory
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QDialog, QDialogButtonBox, QFormLayout, QLabel, QLineEdit, QVBoxLayout, QWidget

from .settings import Setting

TITLE = "Sketch search"
# how each path setting is picked: (storage mode, file filter)
PICKERS = {Setting.WORKER_PYTHON: (QgsFileWidget.GetFile, ""),
           Setting.WORKER_DIR: (QgsFileWidget.GetDirectory, ""),
           Setting.INDEX_ROOT: (QgsFileWidget.GetDirectory, ""),
           Setting.SERVER_KEY: (QgsFileWidget.GetFile, "Public keys (*.key);;All files (*)"),
           Setting.CLIENT_KEY: (QgsFileWidget.GetFile, "Secret keys (*.key_secret);;All files (*)")}
INTRO = ("A local worker runs on this machine with the worker Python; a remote one (a GPU machine) is reached at "
         "the endpoint, with the two key files when it was started with --curve-keys. An empty field takes "
         "the value shown in grey.")


class SettingsForm(QWidget):
    """Every setting with its picker; load() shows what is saved, save() writes what is shown."""

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        intro = QLabel(INTRO)
        intro.setWordWrap(True)
        layout.addWidget(intro)
        form = QFormLayout()
        layout.addLayout(form)
        self.editors: dict = {}
        for setting in Setting:
            editor = self._editor(setting)
            editor.setToolTip(setting.help_text)
            form.addRow(setting.label, editor)
            self.editors[setting] = editor
        layout.addStretch(1)
        self.load()

    @staticmethod
    def _editor(setting: Setting) -> QWidget:
        if setting not in PICKERS:
            return QLineEdit()
        mode, file_filter = PICKERS[setting]
        picker = QgsFileWidget()
        picker.setStorageMode(mode)
        picker.setDialogTitle(setting.label)
        if file_filter:
            picker.setFilter(file_filter)
        return picker

    def _line(self, setting: Setting) -> QLineEdit:
        editor = self.editors[setting]
        return editor.lineEdit() if isinstance(editor, QgsFileWidget) else editor

    def value(self, setting: Setting) -> str:
        editor = self.editors[setting]
        return (editor.filePath() if isinstance(editor, QgsFileWidget) else editor.text()).strip()

    def set_value(self, setting: Setting, value: str) -> None:
        editor = self.editors[setting]
        if isinstance(editor, QgsFileWidget):
            editor.setFilePath(value)
        else:
            editor.setText(value)

    def load(self) -> None:
        for setting in Setting:
            self.set_value(setting, setting.get() if setting.is_saved() else "")
            self._line(setting).setPlaceholderText(setting.default() or "not set")

    def save(self) -> None:
        """Write every field; an empty one goes back to its default."""
        for setting in Setting:
            value = self.value(setting)
            if value:
                setting.set(value)
            else:
                setting.reset()


class SettingsDialog(QDialog):
    """The settings form with OK and Cancel; saved is emitted after OK wrote them."""

    saved = pyqtSignal()

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.setWindowTitle(f"{TITLE} settings")
        self.setMinimumWidth(560)
        layout = QVBoxLayout(self)
        self.form = SettingsForm(self)
        layout.addWidget(self.form)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        self.buttons.button(QDialogButtonBox.Ok).setToolTip("Save the settings (they are kept in your QGIS profile).")
        self.buttons.button(QDialogButtonBox.Cancel).setToolTip("Close without saving.")
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout.addWidget(self.buttons)

    def show_setting(self, setting: Setting) -> None:
        """Open (not blocking QGIS) with the keyboard in `setting`'s field."""
        self.form.load()
        self.open()
        self.form.editors[setting].setFocus()

    def accept(self) -> None:
        self.form.save()
        super().accept()
        self.saved.emit()


class SettingsPage(QgsOptionsPageWidget):
    """The plugin's page in Settings > Options; QGIS calls apply() when the user presses OK."""

    def __init__(self, on_saved: Callable[[], None], parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.on_saved = on_saved
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.form = SettingsForm(self)
        layout.addWidget(self.form)

    def apply(self) -> None:
        self.form.save()
        self.on_saved()


class SettingsPageFactory(QgsOptionsWidgetFactory):
    """Registers the page with iface.registerOptionsWidgetFactory (QGIS 3.x)."""

    def __init__(self, icon: QIcon, on_saved: Callable[[], None]):
        super().__init__(TITLE, icon)
        self.on_saved = on_saved

    def createWidget(self, parent: Optional[QWidget] = None) -> SettingsPage:  # noqa: N802 (QGIS's name)
        return SettingsPage(self.on_saved, parent)
