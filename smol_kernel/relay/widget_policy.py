"""Jupyter widget messages as a client may get them: the widget half of the output policy
(``output_policy.py``).

A widget is a model in the user's browser that the kernel creates and updates over a comm;
the browser's widget manager builds views from it, and views put model values into the
page. The guest writes every value, so a model is let through only as one of ipywidgets'
own (``WIDGET_MODELS``: its module, view and view module exactly as ipywidgets declares
them), each value filtered for what that model's view does with it:

* HTML and HTMLMath values are sanitized HTML, every ``description`` (typeset) and a
  Label's value lose the TeX commands that link, style or load, ``description_allow_html``
  is off;
* an Image, Video or Audio of format "url" is dropped (the browser would fetch the value:
  a kernel with no network must not have the user's browser send data for it), and layout
  and style values that could load a URL are removed;
* an Output widget's outputs pass the bundle policy;
* Link and DirectionalLink models are not among them: the browser copies one model's
  value into another, past every check above; nor is any third-party module, whose views
  we cannot know;
* binary buffers go only into the fields that are binary (an image's ``value``, a file
  upload's contents), by paths of names and indices that cannot reach a prototype;
* a model keeps the kind it was opened as: an update that names another model is dropped,
  and so is any message for a comm the kernel did not open with the policy's consent.

The control comm's ``update_states`` (the kernel's answer when a page asks for every
widget) is filtered entry by entry the same way, each entry's kind from its own
``model_name``, and the models it creates are remembered as if opened.
"""

from __future__ import annotations

import re
from typing import Any

from .mime_bundle import neutralize_tex, sanitize_bundle, sanitize_html

WIDGET_TARGETS = frozenset({"jupyter.widget", "jupyter.widget.control", "jupyter.widget.version"})
BASE = "@jupyter-widgets/base"
CONTROLS = "@jupyter-widgets/controls"
OUTPUT = "@jupyter-widgets/output"


def _models() -> dict[str, tuple[str, str, str]]:
    """model name -> (model module, view name, view module), as ipywidgets 7 and 8 declare
    them (read from ipywidgets 8.1's classes)."""
    same_view = """Accordion Audio Box Button Checkbox ColorPicker ColorsInput Combobox
        ControllerAxis ControllerButton Controller DatePicker Datetime Dropdown FileUpload
        FloatLogSlider FloatRangeSlider FloatSlider FloatText FloatsInput GridBox HBox
        HTMLMath HTML Image IntRangeSlider IntSlider IntText IntsInput Label Password Play
        RadioButtons Select SelectMultiple SelectionRangeSlider SelectionSlider Stack Tab
        TagsInput Text Textarea Time ToggleButton ToggleButtons VBox Valid Video"""
    models = {f"{n}Model": (CONTROLS, f"{n}View", CONTROLS) for n in same_view.split()}
    models.update({
        "BoundedFloatTextModel": (CONTROLS, "FloatTextView", CONTROLS),
        "BoundedIntTextModel": (CONTROLS, "IntTextView", CONTROLS),
        "FloatProgressModel": (CONTROLS, "ProgressView", CONTROLS),
        "IntProgressModel": (CONTROLS, "ProgressView", CONTROLS),
        "NaiveDatetimeModel": (CONTROLS, "DatetimeView", CONTROLS),
        "LayoutModel": (BASE, "LayoutView", BASE),
        "StyleModel": (BASE, "StyleView", BASE),
        "OutputModel": (OUTPUT, "OutputView", OUTPUT),
    })  # fmt: skip
    styles = """Button Checkbox Description HTMLMath HTML Label Progress Slider String Text
        ToggleButton ToggleButtons"""
    models.update({f"{n}StyleModel": (CONTROLS, "StyleView", BASE) for n in styles.split()})
    return models


WIDGET_MODELS = _models()
HTML_MODELS = frozenset({"HTMLModel", "HTMLMathModel"})
MEDIA_MODELS = frozenset({"ImageModel", "VideoModel", "AudioModel"})  # format "url": fetched
BINARY_FIELDS = {"ImageModel": {"value"}, "VideoModel": {"value"}, "AudioModel": {"value"},
                 "FileUploadModel": {"value", "data"}}  # fmt: skip
UNSAFE_KEYS = frozenset({"__proto__", "constructor", "prototype"})
MAX_BUFFER_PATHS = 64
# CSS functions a layout or style value may use: none of them loads anything.
SAFE_CSS_FUNCTIONS = frozenset({
    "rgb", "rgba", "hsl", "hsla", "hwb", "calc", "min", "max", "clamp", "var", "repeat",
    "minmax", "fit-content",
})  # fmt: skip
_CSS_FUNCTION = re.compile(r"([a-z0-9_-]*)\s*\(")
_IDENTITY = ("_model_module", "_view_name", "_view_module")


def css_value_ok(value: str) -> bool:
    """May a layout or style widget put ``value`` on an element's style? Not when it could
    make the browser load something (``url()``, ``image-set()``, ...; escapes refused, so
    ``u\\72l(`` cannot spell one)."""
    low = value.lower()
    if "\\" in low or "/*" in low:
        return False
    return all(name in SAFE_CSS_FUNCTIONS for name in _CSS_FUNCTION.findall(low))


def _styles(model: str) -> bool:
    return model == "LayoutModel" or model.endswith("StyleModel")


def widget_state(model: str, state: dict) -> dict | None:
    """``state`` (whole or an update) of a ``model`` as a client may get it; None to drop
    the message (another model's identity, a URL the browser would fetch)."""
    identity = dict(zip(_IDENTITY, WIDGET_MODELS[model], strict=True), _model_name=model)
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key in UNSAFE_KEYS:
            return None
        if key in identity:
            if value != identity[key]:
                return None
        elif key == "format" and model in MEDIA_MODELS:
            if not isinstance(value, str) or value.strip().lower() == "url":
                return None
        elif key == "description_allow_html":
            value = False
        elif key == "value" and model in HTML_MODELS:
            value = sanitize_html(value) if isinstance(value, str) else ""
        elif key == "outputs" and model == "OutputModel":
            value = _outputs(value)
        elif isinstance(value, str) and _styles(model) and not css_value_ok(value):
            continue
        elif isinstance(value, str) and (key == "description" or model == "LabelModel"):
            value = neutralize_tex(value)  # typeset by the browser
        out[key] = value
    return out


def _outputs(outputs: Any) -> list:
    kept = []
    for output in outputs if isinstance(outputs, list) else []:
        if not isinstance(output, dict):
            continue
        if output.get("output_type") not in ("stream", "error", "display_data", "execute_result"):
            continue
        if "data" in output:
            data, metadata = sanitize_bundle(output.get("data"), output.get("metadata"))
            output = {**output, "data": data, "metadata": metadata}
        kept.append(output)
    return kept


def buffer_paths_ok(model: str, paths: Any) -> bool:
    """Where the browser puts a message's binary buffers: only into ``model``'s binary
    fields, by names and indices (ipywidgets' put_buffers follows them as given)."""
    if not isinstance(paths, list) or len(paths) > MAX_BUFFER_PATHS:
        return False
    for path in paths:
        if not isinstance(path, list) or not path or len(path) > 8:
            return False
        if path[0] not in BINARY_FIELDS.get(model, ()):
            return False
        for part in path:
            if isinstance(part, bool) or not isinstance(part, str | int) or part in UNSAFE_KEYS:
                return False
    return True


class WidgetPolicy:
    """The widget comms of one kernel: which comm is which model (see the module doc)."""

    def __init__(self) -> None:
        self.models: dict[str, str] = {}  # comm id -> model name
        self.others: set[str] = set()  # control and version comms the kernel opened

    def comm_open(self, content: dict) -> dict | None:
        comm_id, target = content.get("comm_id"), content.get("target_name")
        data = content.get("data")
        if not isinstance(comm_id, str) or comm_id in self.models or not isinstance(data, dict):
            return None
        if target != "jupyter.widget":  # (nothing for a frontend to do with its data)
            self.others.add(comm_id)
            return {**content, "data": {}}
        state = data.get("state")
        model = state.get("_model_name") if isinstance(state, dict) else None
        if model not in WIDGET_MODELS or state.get("_model_module") != WIDGET_MODELS[model][0]:
            return None
        kept = self._data(model, data)
        if kept is None:
            return None
        self.models[comm_id] = model
        return {**content, "data": kept}

    def comm_msg(self, content: dict) -> dict | None:
        comm_id, data = content.get("comm_id"), content.get("data")
        if not isinstance(data, dict):
            return None
        model = self.models.get(comm_id)  # type: ignore[arg-type]
        if model is None:
            # The control comm is opened by the page (we never see it open): the kernel's
            # one message on it is update_states. Anything else for a comm we did not see
            # open is dropped.
            states = None if comm_id in self.others else self._update_states(data)
            return None if states is None else {**content, "data": states}
        kept = None if "states" in data else self._data(model, data)
        return None if kept is None else {**content, "data": kept}

    @staticmethod
    def _data(model: str, data: dict) -> dict | None:
        """A comm_open's or comm_msg's data for ``model``: its state and buffer paths."""
        out = dict(data)
        if "state" in data:
            if not isinstance(data["state"], dict):
                return None
            state = widget_state(model, data["state"])
            if state is None:
                return None
            out["state"] = state
        if "buffer_paths" in data and not buffer_paths_ok(model, data["buffer_paths"]):
            return None
        return out

    def _update_states(self, data: dict) -> dict | None:
        """The control comm's ``update_states``: every widget, each filtered as its own
        model; the models it creates in the browser are remembered."""
        states, paths = data.get("states"), data.get("buffer_paths", {})
        if data.get("method") != "update_states" or not isinstance(states, dict):
            return None
        if not isinstance(paths, dict):
            return None
        kept, seen = {}, {}
        for model_id, entry in states.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("state"), dict):
                return None
            model = entry.get("model_name")
            if model not in WIDGET_MODELS or entry.get("model_module") != WIDGET_MODELS[model][0]:
                return None
            if self.models.get(model_id, model) != model or model_id in self.others:
                return None
            state = widget_state(model, entry["state"])
            if state is None:
                return None
            version = entry.get("model_module_version")
            kept[model_id] = {"model_name": model, "model_module": WIDGET_MODELS[model][0],
                              "model_module_version": version if isinstance(version, str)
                              else "", "state": state}  # fmt: skip
            seen[model_id] = model
        for model_id, model_paths in paths.items():
            if model_id not in seen or not buffer_paths_ok(seen[model_id], model_paths):
                return None
        self.models.update(seen)
        return {"method": "update_states", "states": kept, "buffer_paths": paths}
