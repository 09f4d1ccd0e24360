"""Config files that build on others: a top-level ``__base__`` key names the files a YAML config extends.

jsonargparse composes configs given on the command line (``--config a.yaml --config b.yaml``), but has no way for
one file to pull in another, and ``occscene-pl fit --config configs/kitti.yaml`` must work alone. So the shipped
per-dataset configs say::

    __base__: base.yaml      # a path relative to this file, or a list of them (later ones win)
    model:
      aligner:
        depth_range: [2.0, 52.0]

and the CLI parses YAML with :data:`PARSER_MODE`, whose loader reads the bases first (recursively) and merges the
file over them with ``OmegaConf.merge``: mappings are merged key by key, anything else (lists, scalars, null)
replaces the base's value. OmegaConf ``${...}`` interpolation is resolved after the merge, over the whole result.
Files without ``__base__`` load exactly as in jsonargparse's ``omegaconf`` mode.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import jsonargparse
import yaml
from jsonargparse import set_loader
from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["BASE_KEY", "PARSER_MODE", "load_config_text", "read_config", "register_parser_mode"]

BASE_KEY = "__base__"
"""Top-level key of a config listing the config files it extends."""
PARSER_MODE = "occscene_yaml"
"""jsonargparse parser mode of ``occscene-pl``: ``omegaconf`` plus :data:`BASE_KEY` (see the module docstring)."""


def _with_bases(config: DictConfig, directory: Path, chain: tuple[Path, ...]) -> DictConfig:
    """``config`` merged over its :data:`BASE_KEY` files (relative to ``directory``), recursively, unresolved."""
    if BASE_KEY not in config:
        return config
    bases = config[BASE_KEY]
    if isinstance(bases, ListConfig):
        bases = OmegaConf.to_object(bases)
    del config[BASE_KEY]
    names = [bases] if isinstance(bases, str) else bases
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{BASE_KEY} must be a config file path or a list of them, got {bases!r}")
    parts: list[DictConfig] = []
    for name in names:
        path = (directory / os.path.expanduser(name)).resolve()
        if path in chain:
            raise ValueError(f"{BASE_KEY}: {path} includes itself ({' -> '.join(str(p) for p in (*chain, path))})")
        if not path.is_file():
            raise ValueError(f"{BASE_KEY}: config file {path} does not exist")
        loaded = OmegaConf.load(path)
        if not isinstance(loaded, DictConfig):
            raise ValueError(f"{BASE_KEY}: {path} is not a YAML mapping")
        parts.append(_with_bases(loaded, path.parent, (*chain, path)))
    merged = OmegaConf.merge(*parts, config)
    assert isinstance(merged, DictConfig)
    return merged


def _current_directory() -> Path:
    """Directory of the config file jsonargparse is reading (relative paths resolve against it), else the cwd."""
    return Path(jsonargparse.Path(".", mode="dr").absolute)


def load_config_text(text: str) -> Any:
    """The jsonargparse loader of :data:`PARSER_MODE`: OmegaConf YAML plus :data:`BASE_KEY` (module docstring).

    Relative :data:`BASE_KEY` paths resolve against the directory of the config file being read (jsonargparse sets
    it while it reads a file), or the working directory for values given on the command line.

    Raises:
        ValueError: A missing, circular or malformed base.
    """
    if BASE_KEY in text:
        config = OmegaConf.create(text)
        if isinstance(config, DictConfig) and BASE_KEY in config:
            return OmegaConf.to_object(_with_bases(config, _current_directory(), ()))
    return _omegaconf_loader()(text)


def read_config(path: str | Path) -> dict[str, Any]:
    """A config file with its bases merged and interpolations resolved, as plain data (what the CLI parses).

    Raises:
        ValueError: Not a YAML mapping, or a bad :data:`BASE_KEY`.
    """
    path = Path(path).resolve()
    config = OmegaConf.load(path)
    if not isinstance(config, DictConfig):
        raise ValueError(f"{path} is not a YAML mapping")
    loaded = OmegaConf.to_object(_with_bases(config, path.parent, (path,)))
    assert isinstance(loaded, dict)
    return cast(dict[str, Any], loaded)


def _omegaconf_loader() -> Any:
    """The loader of jsonargparse's own ``omegaconf`` mode (files without a base load exactly as there)."""
    from jsonargparse._optionals import get_omegaconf_loader

    return get_omegaconf_loader("omegaconf")


def register_parser_mode() -> None:
    """Make :data:`PARSER_MODE` available to jsonargparse parsers (idempotent)."""
    set_loader(PARSER_MODE, load_config_text, (yaml.YAMLError, ValueError))
