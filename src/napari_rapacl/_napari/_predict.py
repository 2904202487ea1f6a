"""The *Predict expression* widget."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    create_widget,
)

from ._common import (
    ALL,
    COLORMAPS,
    ROI,
    VISIBLE,
    _JobWidget,
    _nullable,
    colored_by,
    keep_units_consistent,
)
from ._genes import most_reliable, section_name, spots_base_name, style_spots, warm_canvas_title
from .layers import (
    META_KEY,
    box_um,
    dense_layer_data,
    merge_columns,
    slide_from_layer,
    spots_from_layer_data,
    spots_in_box,
)

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)


class PredictWidget(_JobWidget):
    """Predict expression at the spots of a region (visible / ROI / all) from the slide under them.

    A checkpoint defines the model (its registry name, config, weights, genes); without one the chosen
    registry model runs with random initial weights (for trying the plugin out). Inference is tiled and
    cached per widget (panning back and predicting again costs only cache lookups); predictions are
    merged into the spots layer's ``features`` (NaN for spots not predicted yet). PixNet also adds a dense
    map of the coloured gene as an Image layer ``"<section> <gene> (dense)"`` placed on the slide.
    """

    run_text = "Predict"
    #: side of the tile grid (level-0 px). A tile is predicted whole (all its spots), so a view costs
    #: the spots of the tiles it touches: smaller tiles waste less outside the view (a 2048 px view
    #: touches at most 3 x 3 tiles of 1024 px, i.e. 2.25 x its area, against 4 x with 2048 px tiles).
    tile_px = 1024

    def __init__(self, viewer: napari.viewer.Viewer):
        from ..jobs import installed_models, user_models
        from ..tiled import TileCache

        self._viewer = viewer
        keep_units_consistent(viewer)
        self._image = create_widget(annotation="napari.layers.Image", label="slide")
        self._spots = create_widget(annotation="napari.layers.Points", label="spots")
        models = user_models()  # the *_tiny test variants stay out of the user interface
        installed = list(installed_models())  # trained models in the user's folder (the main job's)
        self._checkpoint_model: str | None = None  # the model a chosen checkpoint holds
        default = installed[0] if installed else ("stnet" if "stnet" in models else models[0])
        self._model = ComboBox(label="model", choices=self._model_choices, value=default)
        self._checkpoint = FileEdit(label="checkpoint", filter="*.pt", mode="r")
        self._scope = ComboBox(label="region", choices=[VISIBLE, ROI, ALL], value=VISIBLE)
        self._roi = _nullable("napari.layers.Shapes", "ROI")
        self._device = ComboBox(label="device", choices=["auto", "cpu", "cuda"], value="auto")
        self._dense = CheckBox(text="dense map (PixNet)", value=True)
        self._dense_wanted = True  # the user's choice, kept while a model without a dense head is chosen
        super().__init__(
            widgets=[
                self._image,
                self._spots,
                self._model,
                self._checkpoint,
                self._scope,
                self._roi,
                self._device,
                self._dense,
                *self._init_job(),
            ]
        )
        self.cache = TileCache()
        self._loaded = None
        self._loaded_choice = None
        self._preload_key = None
        self.preloaded = None  # a Future of the chosen model, built in the background
        self._shown = None  # the partial result of the running job already written to the layer
        self.last_result = None
        self._checkpoint.changed.connect(self._on_checkpoint)
        self._checkpoint.changed.connect(self._preload_model)
        self._model.changed.connect(self._preload_model)
        self._model.changed.connect(self._update_dense)
        self._dense.changed.connect(self._on_dense)
        self._preload_model()
        self._update_dense()
        warm_canvas_title(viewer)

    # -- the dense-map box follows the model ----------------------------------------------------
    def _on_dense(self, value):
        if self._dense.enabled:
            self._dense_wanted = bool(value)

    def _update_dense(self, *_):
        """Only models with a dense head (PixNet) draw a dense map: the box is unticked and disabled
        for the others (the user's choice comes back with a dense model)."""
        dense = "pixnet" in str(self._model.value or "").lower()
        with self._dense.changed.blocked():
            self._dense.enabled = dense
            self._dense.value = self._dense_wanted if dense else False
        self._dense.tooltip = None if dense else f"{self._model.value} has no dense head (PixNet has)"

    # -- model -------------------------------------------------------------------------------
    def _choice(self):
        from ._env import checkpoint_path

        ckpt = checkpoint_path(self._checkpoint.value)
        if ckpt is not None:
            if not ckpt.is_file():
                raise FileNotFoundError(
                    f"checkpoint not found: {ckpt}; choose an existing .pt file, or clear the checkpoint "
                    "field to try the model with random weights"
                )
            return ("checkpoint", str(ckpt.resolve()), ckpt.stat().st_mtime_ns), (None, ckpt)
        return ("registry", self._model.value), (self._model.value, None)

    def _model_choices(self, _widget=None) -> list[str]:
        """The production models, plus the model of the chosen checkpoint (whatever it is)."""
        from ..jobs import user_models

        models = user_models()
        extra = self._checkpoint_model
        return models + [extra] if extra and extra not in models else models

    def _on_checkpoint(self, *_):
        """A checkpoint names its model: show it in the model picker (read from the YAML beside it)."""
        from ..models.checkpoint import config_path_for
        from ._env import checkpoint_path

        ckpt = checkpoint_path(self._checkpoint.value)
        self._model.enabled = ckpt is None
        name = None
        if ckpt is not None and config_path_for(ckpt).is_file():
            import yaml

            name = (yaml.safe_load(config_path_for(ckpt).read_text()) or {}).get("model")
        self._checkpoint_model = name if isinstance(name, str) and name else None
        self._model.reset_choices()
        if self._checkpoint_model is not None:
            self._model.value = self._checkpoint_model
        self._update_dense()

    def _preload_model(self, *_):
        """Build the chosen model in the background (imports, weights, the hash that keys its cached
        tiles), so that a click on Predict starts predicting at once; the job waits for it in its
        worker thread when it is not ready yet. A choice that cannot load is reported by Predict."""
        from ..jobs import preload_model
        from ._env import avoid_llvm_clash

        try:
            key, choice = self._choice()
        except Exception:  # a missing checkpoint: Predict says so
            return
        if key in (self._loaded_choice, self._preload_key):
            return
        avoid_llvm_clash()  # before the preloading thread imports torch
        self._preload_key, self.preloaded = key, preload_model(*choice)

    # -- run ---------------------------------------------------------------------------------
    def start(self, *_):
        """Start predicting in a worker thread; returns the worker (tests wait on it), or None."""
        from ..jobs import iter_predict
        from ._env import avoid_llvm_clash

        if self._refuse_if_busy():
            return None
        image, points = self._image.value, self._spots.value
        if image is None or points is None:
            self._say("choose a slide and its spots layer (open them with 'Open slide and spots')")
            return None
        try:
            key, choice = self._choice()
            box = self._region(self._scope.value, image, self._roi.value)
            slide = slide_from_layer(image)
            slide.require_mpp("spot prediction")
        except Exception as exc:  # a message for the user, not a traceback
            self._say(f"cannot predict: {exc}")
            return None
        n_in_box = len(spots_in_box(points.data, box))
        if n_in_box == 0:
            self._say(self._no_spots_message(box, slide.mpp))
            return None
        from ..jobs._estimate import estimate

        model_name = self._checkpoint_model if key[0] == "checkpoint" else self._model.value
        cost = estimate("predict", n_spots=n_in_box, model=model_name)
        avoid_llvm_clash()  # before the worker imports torch
        spots = spots_from_layer_data(points.data, points.features, slide.mpp)
        if self._loaded is not None and key == self._loaded_choice:
            model = self._loaded
        elif key == self._preload_key and self.preloaded is not None:
            model = self.preloaded  # a Future: the worker waits for it
        else:
            model = choice
        self._pending = (points, box, key, slide.mpp, self._device.value, time.perf_counter())
        self._shown = None
        return self._launch(
            iter_predict,
            model,
            slide,
            spots,
            box,
            cache=self.cache,
            device=self._device.value,
            dense=bool(self._dense.value),
            dense_gene=self._dense_gene(points, key),  # the map of the gene the spots show
            tile_px=self.tile_px,
            view_first=True,  # show the region's spots first, then complete the tiles around it
            desc=f"predict {box_um(box, slide.mpp)}",
            on_done=self._on_done,
            estimate=cost,
        )

    def _dense_gene(self, points, key) -> str | None:
        """The gene whose dense map to compute: the one the spots show, else (first prediction) the
        one they will show -- the most reliable when the model is loaded; None: the model's first."""
        gene = colored_by(points)
        loaded = self._loaded if key == self._loaded_choice else None
        if loaded is not None and gene not in loaded.genes:
            rel = getattr(loaded, "gene_reliability", None)
            return most_reliable(list(loaded.genes), dict(rel) if rel else None)
        return gene

    def _no_spots_message(self, box, mpp) -> str:
        where = box_um(box, mpp)
        if self._scope.value == ROI:
            return f"no spots in this ROI ({where}): draw the ROI over the spots, or choose 'all spots'"
        if self._scope.value == VISIBLE:
            return (
                f"no spots in the visible region ({where}): pan or zoom to the spots, or choose 'all spots'"
            )
        return "the spots layer holds no spots: open a spot file with the slide"

    def _on_error(self, exc):
        self._job_open = False
        self._say(f"prediction failed: {exc}")

    def _on_progress(self, progress):
        super()._on_progress(progress)
        part = progress.result
        if part is not None and getattr(part, "partial", False) and getattr(self, "_job_open", False):
            self._show_spots(part)  # the region's spots, before the tiles around them are complete
            self._shown = part
            self._say(
                f"{part.loaded.name}: {len(part.index)} spots shown in "
                f"{time.perf_counter() - self._pending[-1]:.1f} s; completing the tiles for the cache..."
            )

    def _on_aborted(self):
        shown = self._shown
        if shown is None:
            return super()._on_aborted()
        self._job_open = False
        self._say(
            f"{self._job_desc}: cancelled after the {len(shown.index)} spots of the region were shown "
            "(the tiles around them were not completed, so nothing was cached)"
        )

    def _on_done(self, res):
        points = self._pending[0]
        shown = self._shown
        same = (
            shown is not None
            and np.array_equal(shown.index, res.index)
            and np.array_equal(shown.values, res.values)
        )
        if not same:
            self._show_spots(res)
        if res.dense is not None:
            self._show_dense(res, points, self._pending[3])
        self.last_result = res
        genes = res.loaded.genes
        n_done = int(np.isfinite(points.features[genes[0]].to_numpy(dtype=float)).sum())
        seconds = time.perf_counter() - self._pending[-1]
        if len(res.index) == 0:
            self._say(self._no_spots_message(res.box, self._pending[3]))
            return
        gene = colored_by(points)
        self._say(
            f"{res.loaded.name}: {len(res.index)} spots predicted in {seconds:.1f} s "
            f"({n_done}/{len(points.data)} of the section so far; {res.tiles_computed} tiles computed, "
            f"{res.tiles_cached} from the cache); showing {gene}"
            + ("" if self._reliability(res) else " (no validation scores stored in this checkpoint)")
        )

    def _show_spots(self, res):
        """Merge predictions into the spots layer's features (one assignment) and colour the spots."""
        from ..jobs import LoadedModel

        points, box, key, mpp, device, t0 = self._pending
        loaded: LoadedModel = res.loaded
        self._loaded, self._loaded_choice = loaded, key
        genes = loaded.genes
        info = dict(points.metadata.get(META_KEY, {}))
        model_id = repr(loaded.key)
        reset = info.get("model_id") != model_id  # another model: earlier predictions are stale
        base = points.features
        reliability = self._reliability(res)
        if reset:  # drop the previous model's genes (this model's are reset to NaN below)
            base = base.drop(columns=[g for g in info.get("genes") or [] if g in base and g not in genes])
        features = merge_columns(base, res.index, res.values, genes, reset=reset)
        rad_cols = list(info.get("radiomics_columns") or [])
        if res.radiomics is not None:  # the spot radiomics that fed the model (RaPaCL-ST)
            cols = [str(c) for c in res.radiomics.columns]
            features = merge_columns(features, res.index, res.radiomics.to_numpy(np.float32), cols)
            rad_cols = list(dict.fromkeys([*rad_cols, *cols]))
        prov = {} if reset else dict(info.get("provenance") or {})
        regions = [] if reset else list(prov.get("regions", []))
        regions.append([int(v) for v in box])
        prov.update(loaded.provenance())
        prov.update(regions=regions, device=device, tile_px=self.tile_px)
        gene = colored_by(points)
        cmap = getattr(points.face_colormap, "name", "viridis")
        points.features = features
        info.setdefault("base_name", points.name)
        info.update(
            genes=list(genes),
            provenance=prov,
            model_id=model_id,
            radiomics_columns=rad_cols,
            gene_reliability=reliability,
        )
        points.metadata = {**points.metadata, META_KEY: info}
        if gene not in genes:  # first prediction: the most reliable gene (else the model's first)
            gene, cmap = most_reliable(list(genes), reliability) or genes[0], "viridis"
        style_spots(points, gene, cmap if cmap in COLORMAPS else "viridis", viewer=self._viewer)

    @staticmethod
    def _reliability(res) -> dict[str, float] | None:
        """The genes' validation r stored in the checkpoint (None for older checkpoints or none)."""
        rel = getattr(res, "gene_reliability", None)
        if rel is None:
            rel = getattr(getattr(res.loaded, "model", None), "gene_reliability", None)
        return {str(g): float(r) for g, r in rel.items()} if rel else None

    def _show_dense(self, res, points, mpp):
        dense = res.dense
        gene = res.dense_gene
        meta = {"spots": spots_base_name(points), "region": list(res.box), "model": res.loaded.name}
        data, kwargs, _ = dense_layer_data(
            dense.values[0], dense.translate_px, dense.px_size, mpp, gene=gene, metadata=meta
        )
        # on the spots' slide, wherever it sits (a second slide opens beside the first), named by its
        # section so that a map of the same gene on another slide is another layer
        kwargs["translate"] = tuple(np.asarray(kwargs["translate"]) + np.asarray(points.translate)[-2:])
        name = kwargs["name"] = f"{section_name(points)} {kwargs['name']}"
        if name in self._viewer.layers:
            layer = self._viewer.layers[name]
            layer.data = data
            for key in ("scale", "translate", "contrast_limits", "metadata"):
                setattr(layer, key, kwargs[key])
        else:
            layer = self._viewer.add_image(data, **kwargs)
            # keep the spots above the map
            self._viewer.layers.move(self._viewer.layers.index(layer), self._viewer.layers.index(points))
        if hasattr(layer, "colorbar"):
            layer.colorbar.visible = True


# --------------------------------------------------------------------------------------------
# Genes: search, colormap, contrast, colour bar
# --------------------------------------------------------------------------------------------
