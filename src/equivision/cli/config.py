"""What every ``equivision`` subcommand parser gets after it is built: ``--config FILE``
(long option names as keys; flags on the command line win), ``--quiet``, and help texts
that show every default."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import CLIError

try:  # TOML configs from Python 3.11 on (tomllib is in the standard library there)
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    tomllib = None
import yaml

__all__ = ["CONFIG_FORMATS", "apply_config", "finish_parser", "load_config"]

#: config file suffixes read by :func:`load_config`
CONFIG_FORMATS = ((".toml",) if tomllib is not None else ()) + (".json", ".yaml", ".yml")

_SILENT = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _show_default(action: argparse.Action) -> None:
    """Append ``(default: ...)`` to an option's help unless it already names its default
    or has no meaningful one."""
    if isinstance(action, _SILENT) or any(action.default is v for v in
                                            (None, False, argparse.SUPPRESS)):
        return
    text = action.help or ""
    if "default" in text.lower():
        return
    action.help = f"{text} (default: %(default)s)".strip()


def finish_parser(p: argparse.ArgumentParser) -> None:
    """Give subcommand parser ``p`` ``--config FILE`` and ``--quiet`` (where it lacks
    them) and show every default in its ``--help``."""
    flags = {s for a in p._actions for s in a.option_strings}
    if "--quiet" not in flags:
        p.add_argument("--quiet", action="store_true", help="no progress bars (they are "
                       "also off when the output is not a terminal)")
    p.add_argument("--config", metavar="FILE", help="read options from a "
                   f"{'/'.join(s[1:] for s in CONFIG_FORMATS)} file whose keys are long "
                   "option names (e.g. batch-size = 64); options given here win")
    for action in p._actions:
        _show_default(action)


def load_config(path: str | Path) -> dict[str, Any]:
    """The options of a ``--config`` file as ``{key: value}`` (TOML, YAML or JSON).

    Raises:
        CLIError: a missing or unreadable file, an unsupported suffix, a syntax error or
            a file that is not a table of options.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CONFIG_FORMATS:
        raise CLIError(f"--config {str(path)!r}: use a {', '.join(CONFIG_FORMATS)} file")
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except OSError as err:
        raise CLIError(f"--config {str(path)!r} cannot be read: {err.strerror or err}") from None
    except (ValueError, yaml.YAMLError) as err:
        raise CLIError(f"--config {str(path)!r} is not valid {suffix[1:].upper()}: "
                       f"{str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CLIError(f"--config {str(path)!r} must hold a table of options, "
                       f"got {type(data).__name__}")
    return data


def _convert(action: argparse.Action, key: str, value: Any) -> Any:
    """A config value as the parsed value of ``action``'s option."""
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise CLIError(f"key {key!r} takes true or false, got {value!r}")
        return value
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int)
    items = value if many and isinstance(value, list) else [value]
    if not many and isinstance(value, (list, dict)):
        raise CLIError(f"key {key!r} takes one value, got {value!r}")
    out = []
    for item in items:
        if action.type is not None and not isinstance(item, bool):
            try:
                item = action.type(str(item))
            except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
                raise CLIError(f"key {key!r}: {err}") from None
        if action.choices is not None and item not in action.choices:
            raise CLIError(f"key {key!r}: {item!r} is not one of "
                           f"{', '.join(map(str, action.choices))}")
        out.append(item)
    return out if many else out[0]


def apply_config(p: argparse.ArgumentParser, path: str | Path) -> None:
    """Make the options of the config file ``path`` the defaults of parser ``p`` (so
    that flags on the command line override them).

    Raises:
        CLIError: naming every key that is not a long option of ``p``, or a bad value.
    """
    data = load_config(path)
    by_name = {s[2:]: a for a in p._actions for s in a.option_strings if s.startswith("--")}
    by_name.pop("config", None)
    by_name.pop("help", None)
    unknown = [k for k in data if str(k).replace("_", "-") not in by_name]
    if unknown:
        raise CLIError(f"--config {str(path)!r}: unknown key(s) {', '.join(map(repr, unknown))}"
                       f" for `{p.prog}`; valid keys: {', '.join(sorted(by_name))}")
    for key, value in data.items():
        action = by_name[str(key).replace("_", "-")]
        try:
            p.set_defaults(**{action.dest: _convert(action, key, value)})
        except CLIError as err:
            raise CLIError(f"--config {str(path)!r}: {err}") from None
        action.required = False


def config_path(argv: Sequence[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (``--config F`` or ``--config=F``), if any."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None
