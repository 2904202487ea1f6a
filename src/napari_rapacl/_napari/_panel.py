"""The *RaPaCL panel*: every step of the plugin in one dock, in workflow order.

Tabs *Open*, *Cells*, *Predict*, *Genes*, *Export* hold the same widgets the Plugins menu offers one
by one (each still reachable alone there). Each tab scrolls on its own, so the dock fits a
1366 x 768 screen beside napari's layer list whatever a tab holds; a tab whose job runs is marked
(``Cells ●``) so a job started in one tab is not forgotten in another, and each widget shows its own
progress bar with the time elapsed and left. Creating the panel makes this plugin napari's reader for
slide files the user has not assigned to another reader (:func:`._reader.prefer_plugin_readers`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFrame,
    QScrollArea,
    QSizePolicy,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

#: the panel's width in px: wide enough for the widest row (a file field with its button), narrow
#: enough to leave a 1366 px screen most of its width for the canvas and the layer list
PANEL_WIDTH = 340
#: the mark a tab's title gets while its job runs
RUNNING_MARK = " ●"


def compact_choices(widget, chars: int = 14) -> None:
    """Drop-down lists inside ``widget`` ask for room for ``chars`` characters, not for their longest
    choice (a checkpoint path or a long model name would otherwise widen the whole dock); the list
    that opens still shows each choice in full."""
    for combo in widget.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(chars)


def _tabs():
    from ._widgets import CellsWidget, ExportWidget, GeneWidget, LoadWidget, PredictWidget

    return (
        ("Open", LoadWidget),
        ("Cells", CellsWidget),
        ("Predict", PredictWidget),
        ("Genes", GeneWidget),
        ("Export", ExportWidget),
    )


class RapaclPanel(QWidget):
    """One dock with the plugin's widgets as tabs (workflow order); ``panel.widgets["Predict"]`` is the
    Predict widget itself (the same class the Plugins menu docks alone)."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self._viewer = viewer  # (the Open tab makes the plugin the default slide reader)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.setUsesScrollButtons(False)
        self.widgets: dict = {}
        for title, cls in _tabs():
            widget = cls(viewer)
            widget.margins = (6, 6, 6, 6)
            compact_choices(widget.native)
            page = QWidget()  # the widget at its natural height, the rest of the page empty
            column = QVBoxLayout(page)
            column.setContentsMargins(0, 0, 0, 0)
            column.addWidget(widget.native)
            column.addStretch(1)
            scroll = QScrollArea()
            scroll.setWidgetResizable(True)
            scroll.setFrameShape(QFrame.NoFrame)
            scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)  # rows wrap to the dock's width
            scroll.setWidget(page)
            self.tabs.addTab(scroll, title)
            self.widgets[title] = widget
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)
        self.setMinimumWidth(PANEL_WIDTH)
        self.setMaximumWidth(int(PANEL_WIDTH * 1.6))
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Expanding)
        self._timer = QTimer(self)
        self._timer.setInterval(300)
        self._timer.timeout.connect(self._mark_running)
        self._timer.start()

    def reset_choices(self, *_):
        """napari calls this when layers change: every tab's layer choices follow."""
        for widget in self.widgets.values():
            widget.reset_choices()

    def show_tab(self, title: str):
        """Bring a tab to the front (``"Open"``, ``"Cells"``, ``"Predict"``, ``"Genes"``, ``"Export"``)
        and return its widget."""
        self.tabs.setCurrentIndex(list(self.widgets).index(title))
        return self.widgets[title]

    def _mark_running(self):
        for i, (title, widget) in enumerate(self.widgets.items()):
            text = title + (RUNNING_MARK if getattr(widget, "busy", False) else "")
            if self.tabs.tabText(i) != text:
                self.tabs.setTabText(i, text)
