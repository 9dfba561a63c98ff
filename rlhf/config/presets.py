"""The preset configs shipped inside the package (`rlhf/presets/*.yaml`), by name or by path.

`-c ppo-opt-1.3b` (or `ppo-opt-1.3b.yaml`) names a preset from any directory, also from an
installed wheel, which has no checkout's `configs/` folder; `-c path/to/file.yaml` is a file as
before. A file that exists wins over a preset of the same name, so a user's own file is never
shadowed by one the package ships.
"""

from __future__ import annotations

from pathlib import Path

from rlhf.errors import UserError

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset(name: str) -> Path:
    """The shipped preset called `name` (with or without `.yaml`)."""
    path = PRESETS_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        raise UserError(f"no preset {name!r}; the presets are {', '.join(preset_names())}")
    return path


def config_file(value: Path | str | None) -> Path | None:
    """A `-c` value as a file: the path when it exists, else the preset of that name when it is a
    plain name; otherwise the path as given, which the loader reports as missing (`missing_hint`)."""
    if value is None:
        return None
    path = Path(value)
    if not path.exists() and len(path.parts) == 1 and (PRESETS_DIR / f"{path.name.removesuffix('.yaml')}.yaml").is_file():
        return preset(path.name)
    return path


def missing_hint(path: Path | str) -> str:
    """What a missing config file's error adds when the value could have named a preset."""
    return f"; nor is it a preset (presets: {', '.join(preset_names())})" if len(Path(path).parts) == 1 else ""
