"""The command line's overrides checked before Hydra runs: a bad key or a value of the wrong type
is one ConfigError line (exit 2 at the entry point), not Hydra's five-line report and exit 1.

Values of the right type but wrong meaning are the dataclasses' `__post_init__` checks, which run
when the RunConfig is built; this module only catches what fails while composing.
"""

from __future__ import annotations

from typing import Sequence

from distributed_sae.config.errors import ConfigError

CONFIG_MODULE = "distributed_sae.conf"


def user_overrides(argv: Sequence[str]) -> list[str] | None:
    """The `key=value` overrides of a command line, or None where Hydra should see it alone:
    a flag (--help, --cfg, -m/--multirun, whose sweeps `k=16,32` do not compose as one job)."""
    if any(arg.startswith("-") for arg in argv):
        return None
    return [arg for arg in argv if not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]


def check_overrides(overrides: Sequence[str], config_name: str = "config") -> None:
    """Compose the config with `overrides`; raise a one-line ConfigError naming the bad override
    where that fails (unknown key, wrong type, unknown preset, unparsable override)."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module(CONFIG_MODULE, version_base=None):
            compose(config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_unparsable(overrides) or one_line(err)) from None


def _unparsable(overrides: Sequence[str]) -> str:
    """A message naming the first override Hydra's grammar cannot parse, or "" if all parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException as err:
            return (f"cannot parse the override {override!r}: {one_line(err, hint=False)} "
                    "(lists are written [a,b], strings with spaces or commas in quotes)")
    return ""


# Lines of Hydra's and OmegaConf's messages that are detail, not the error.
_DETAIL = ("full_key", "object_type", "reference_type", "See https", "Set the environment",
           "invalid literal")


def one_line(err: BaseException, hint: bool = True) -> str:
    """Hydra's and OmegaConf's multi-line messages (the error and its direct cause) as one line,
    without their detail lines; with `hint`, ending with where to see the keys and their types."""
    parts: list[str] = []
    for exc in (err, err.__cause__ or err.__context__):
        for line in str(exc or "").splitlines():
            line = line.strip().rstrip(".")
            if line.startswith("Config search path"):
                break
            if not line or line == "None" or "$VALUE" in line or line.startswith(_DETAIL) \
                    or line in parts:
                continue
            if parts and parts[-1].startswith("Available options"):  # the options, on one line
                parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
            else:
                parts.append(line)
    text = "; ".join(parts)
    return text + " (`--cfg job` with no overrides prints every key and its type)" if hint else text
