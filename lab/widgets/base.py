"""What every panel shares: where its front-end files are, a static HTML fallback, and a stable repr."""
import base64
import html
import math
import os
import re
import warnings
from pathlib import Path

import anywidget
import traitlets as t
from anywidget._file_contents import FileContents  # what anywidget hot-reloads; it has no public name

from ..checks import show

_HERE = Path(__file__).resolve().parent
_ASSET_DIRS = [_HERE.parent / "static" / "widgets", _HERE.parents[1] / "widgets"]


def asset(name):
    """Path of a front-end file: inside the installed package, or widgets/ in a source checkout."""
    for d in _ASSET_DIRS:
        if (d / name).is_file():
            return d / name
    raise FileNotFoundError(f"widget front-end file {name!r} not found in {[str(d) for d in _ASSET_DIRS]}")


# a static import or re-export: `import {a} from "x"`, `import * as m from "x"`, `export {a} from "x"`, `import "x"`
_IMPORT = re.compile(r"""(\b(?:import|export)\b[^;'"]*?\bfrom\s*|\bimport\s*)(["'])([^"'\n]*)\2""")
_SIBLING = re.compile(r"\./[\w.-]+\.js")


def linked_source(path, _importers=()):
    """`path`'s ES module with each sibling import "./name.js" pointing at that module's own linked source as a
    data: URL. anywidget imports a widget's module from a blob: URL, against which a relative specifier does not
    resolve; a data: URL does, offline, and the browser still links it as a separate module (one instance per
    page, as the module map is keyed by URL)."""
    path = Path(path)
    if path in _importers:
        raise ValueError(f"widget modules import each other in a circle: "
                         f"{' -> '.join(p.name for p in (*_importers, path))}")
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: a widget module must be UTF-8 text: {e}") from None

    def link(match):
        spec = match.group(3)
        if spec.startswith(("data:", "http://", "https://")):
            return match.group(0)
        target = path.parent / spec[2:]
        if not _SIBLING.fullmatch(spec) or not target.is_file():
            raise ValueError(f"{path}: cannot link import {spec!r}: a panel's module may import only modules beside "
                             f"it in {path.parent}, as './name.js', or absolute URLs")
        data = base64.b64encode(linked_source(target, (*_importers, path)).encode("utf-8")).decode("ascii")
        return f"{match.group(1)}{match.group(2)}data:text/javascript;base64,{data}{match.group(2)}"

    return _IMPORT.sub(link, source)


class PanelModule(FileContents):
    """A panel's ES module as anywidget's `_esm`: the file at `path`, served linked (see linked_source). With
    ANYWIDGET_HMR=1 it watches the file and every module it imports, and each change re-sends the linked module
    (anywidget re-renders the panel); files in an installed package are not watched."""

    def __init__(self, path):
        path = Path(path).resolve()   # as the watcher reports changed files
        super().__init__(path, start_thread=_hot_reload(path))

    @property
    def path(self):
        return self._path

    def files(self):
        """The module's file and those it imports, directly or through another."""
        seen, todo = [], [self._path]
        while todo:
            p = todo.pop()
            if p not in seen and p.is_file():
                seen.append(p)
                todo += [p.parent / m.group(3)[2:] for m in _IMPORT.finditer(p.read_text(encoding="utf-8"))
                         if _SIBLING.fullmatch(m.group(3))]
        return seen

    def watch(self):
        import watchfiles
        # the folder, not the files: an editor's save that replaces a file ends a watch on the file itself
        for changes in watchfiles.watch(self._path.parent, stop_event=self._stop_event):
            try:
                if not {Path(p).resolve() for _, p in changes} & set(self.files()):
                    continue
                self._contents = linked_source(self._path)
            except (OSError, ValueError) as e:  # a module mid-edit: the panel stays as it was until it links
                warnings.warn(f"hot reload of {self._path.name} skipped: {e}", stacklevel=1)
                continue
            self.changed.emit(self._contents)
            yield changes

    def __str__(self):
        if self._contents is None:
            self._contents = linked_source(self._path)
        return self._contents


def _hot_reload(path):
    # as anywidget decides for its own files: an installed package's copies are not what a developer edits
    if os.environ.get("ANYWIDGET_HMR") != "1" or {"site-packages", "dist-packages"} & set(path.parts):
        return False
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        warnings.warn("ANYWIDGET_HMR=1: the panels do not hot-reload without the watchfiles package "
                      "(pip install watchfiles)", stacklevel=3)
        return False
    return True


def panel_module(name):
    """A panel's `_esm`: its file in widgets/, linked to the shared helpers it imports."""
    return PanelModule(asset(name))


def panel_css():
    """The panels' stylesheet as a path: anywidget serves the file, and hot-reloads it under ANYWIDGET_HMR=1."""
    return asset("panels.css")


def jsonable(value):
    """`value` as the browser may receive it: NaN and +-inf (numpy's or Python's, inside dicts, lists and tuples)
    become None, numpy scalars Python numbers. The kernel's JSON refuses non-finite floats: such a message is sent
    only after a warning, with the numbers as the strings 'nan' / 'inf', and a chart fed those draws nothing."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:   # a numpy scalar or one-element array
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def require_model(panel, model):
    """A panel's model argument: a lab model (an nn.Module with a config), else one error saying so, not an
    AttributeError from deep inside the first generation."""
    from ..nn import Module
    if not (isinstance(model, Module) and hasattr(getattr(model, "config", None), "block_size")):
        raise ValueError(f"{panel} needs a lab language model (e.g. lab.models.TransformerLM), got {show(model)}")
    return model


def require_tokenizer(panel, tokenizer):
    """A panel's tokenizer argument: anything with encode() and decode() (a str has encode: 'unknown encoding')."""
    if not all(callable(getattr(tokenizer, name, None)) for name in ("encode", "decode")):
        raise ValueError(f"{panel} needs a tokenizer with encode() and decode() (e.g. lab.data.CharTokenizer), "
                         f"got {show(tokenizer)}")
    return tokenizer


def figure_png(fig):
    """A matplotlib figure as base64 PNG (closed afterwards)."""
    import base64
    import io
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Panel(anywidget.AnyWidget):
    """Base of lab's panels. For exported notebooks (no live kernel) each panel has a static fallback: text/html
    with what does not change from run to run, and image/png with what does (losses, samples, timings). nbval
    compares text/html but not images, so notebooks stay comparable."""

    error = t.Unicode("").tag(sync=True)   # shown in the panel: bad input from the browser never raises in the kernel
    _settable = ()                         # the panel's own traits the browser may set; the rest are outputs

    def __init__(self, **kwargs):
        self._check_traits(kwargs)   # a bad argument is a ValueError naming it, as from any other Python call
        super().__init__(**kwargs)
        self.on_msg(self._on_message)

    def _check_traits(self, values):
        """Each of the panel's own traits in `values` validated before any is set, refused in a message of bounded
        length (traitlets' own quote the whole value)."""
        for key in self._own_traits() & set(values):
            trait = self.traits()[key]
            try:
                trait._validate(self, values[key])
            except t.TraitError:
                raise ValueError(f"{key} must be {trait.info()}, got {show(values[key])}") from None

    def _own_traits(self):
        return set(self.trait_names(sync=True)) - set(anywidget.AnyWidget.class_trait_names(sync=True))

    def set_state(self, sync_data):
        """Values from the browser. One a trait refuses (wrong type, out of range), or one the browser may not set
        (an output such as `error` or a result), shows in the panel's error line, and the browser gets the kernel's
        valid values back; the kernel never sees an exception."""
        try:
            if not isinstance(sync_data, dict):
                raise TypeError(f"expected an object of trait values, got {show(sync_data)}")
            refused = sorted(k for k in sync_data if k in self._own_traits() and k not in self._settable)
            if refused:
                raise ValueError(f"{show(refused)} cannot be set from the panel: settable are {list(self._settable)}")
            self._check_traits(sync_data)
            super().set_state(sync_data)
        except (t.TraitError, TypeError, ValueError) as e:
            self.error = f"invalid value from the panel: {e}"
            if isinstance(sync_data, dict):
                self.send_state([k for k in sync_data if k in self.keys])

    def _commands(self):
        """{name: handler(message)} for the browser's {"cmd": name, ...} messages."""
        return {}

    @staticmethod
    def _values(message, example):
        """The {field: value} object of a "set" message."""
        values = message.get("values")
        if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
            raise TypeError(f"'set' needs its values as an object of named fields, e.g. {example}, got {show(values)}")
        return values

    def _on_message(self, widget, content, buffers):
        try:
            if not isinstance(content, dict):
                raise TypeError(f"expected a message object {{\"cmd\": ...}}, got {show(content)}")
            commands = self._commands()
            cmd = content.get("cmd")
            if not isinstance(cmd, str) or cmd not in commands:
                raise ValueError(f"unknown command {show(cmd)}: " + (f"expected one of {sorted(commands)}" if commands
                                                                     else "this panel takes no commands"))
            commands[cmd](content)
        except Exception as e:  # a bad message shows in the panel and never takes the kernel down
            self.error = f"{type(e).__name__}: {e}"

    def _static_html(self):
        return ""

    def _static_png(self):
        return ""

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        if isinstance(data, dict):
            data["text/plain"] = self._plain()
            static = self._static_html()
            if static:
                data["text/html"] = f'<div class="lab-static">{static}</div>'
            png = self._static_png()
            if png:
                data["image/png"] = png
        return bundle

    def _plain(self):
        # no changing numbers here: notebooks compare this text under nbval
        return f"{type(self).__name__}()"

    @staticmethod
    def esc(text):
        return html.escape(str(text))
