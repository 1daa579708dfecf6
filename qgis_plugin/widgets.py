"""Small widget helpers the dock's panels share."""

from __future__ import annotations

from qgis.PyQt.QtWidgets import QBoxLayout, QPushButton


def add_button(text: str, tip: str, row: QBoxLayout) -> QPushButton:
    """A push button with its tooltip (every control explains itself), added to `row`."""
    button = QPushButton(text)
    button.setToolTip(tip)
    row.addWidget(button)
    return button
