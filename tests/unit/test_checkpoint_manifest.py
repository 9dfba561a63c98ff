"""A checkpoint folder counts only while its manifest (written last) matches every file in it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf.errors import UserError
from rlhf.training.checkpoint import MANIFEST_FILE, _check_files, _digest, _files_of, _seal, _weights_only_loads


@pytest.fixture
def sealed(tmp_path):
    folder = tmp_path / "step-0000008"
    (folder / "model").mkdir(parents=True)
    torch.save({"w": torch.arange(1000.0)}, folder / "model" / "mp_rank_00_model_states.pt")
    torch.save({"torch": torch.get_rng_state()}, folder / "rng_rank0.pt")
    torch.save({"torch": torch.get_rng_state()}, folder / "rng_rank1.pt")
    # Two ranks each hash half of the files, as save_checkpoint does; rank 0 merges and seals.
    files = _files_of(folder)
    for rank in (0, 1):
        part = {name: _digest(folder / name) for i, name in enumerate(files) if i % 2 == rank}
        (folder / f".{MANIFEST_FILE}.rank{rank}").write_text(json.dumps(part))
    _seal(folder, step=8, world_size=2)
    return folder


def verdicts(folder) -> list[str | None]:
    files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    return [_check_files(folder, files, rank=rank, world_size=2) for rank in (0, 1)]


def test_a_sealed_folder_verifies_on_every_rank(sealed):
    manifest = json.loads((sealed / MANIFEST_FILE).read_text())
    assert manifest["step"] == 8 and manifest["world_size"] == 2
    assert set(manifest["files"]) == {"model/mp_rank_00_model_states.pt", "rng_rank0.pt", "rng_rank1.pt"}
    assert not list(sealed.glob(f".{MANIFEST_FILE}.rank*"))  # the pieces are gone once merged
    assert verdicts(sealed) == [None, None]


def flip_first_byte(path):
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 1]) + data[1:])


DAMAGE = {
    "truncated": (lambda f: (f / "rng_rank0.pt").write_bytes((f / "rng_rank0.pt").read_bytes()[:100]), "has 100 bytes"),
    "emptied": (lambda f: (f / "rng_rank1.pt").write_bytes(b""), "has 0 bytes"),
    "deleted": (lambda f: (f / "model" / "mp_rank_00_model_states.pt").unlink(), "is missing"),
    "planted": (lambda f: (f / "model" / "extra.pt").write_bytes(b"x"), "is not in its manifest"),
    "tampered, same size": (lambda f: flip_first_byte(f / "model" / "mp_rank_00_model_states.pt"), "SHA-256 differs"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damage_is_found_by_some_rank(sealed, damage):
    change, said = DAMAGE[damage]
    change(sealed)
    found = [v for v in verdicts(sealed) if v]
    # Sizes are checked by every rank, contents by the rank that hashed the file: the stage
    # all-reduces the verdicts, so one rank finding it is enough.
    assert found and all(said in v for v in found), found


def test_a_manifest_cannot_point_outside_its_folder(sealed, tmp_path):
    shutil.copy(sealed / "rng_rank0.pt", tmp_path / "outside.pt")
    files = json.loads((sealed / MANIFEST_FILE).read_text())["files"]
    files["../outside.pt"] = _digest(tmp_path / "outside.pt")
    assert "outside the checkpoint" in _check_files(sealed, files, rank=0, world_size=1)


def test_a_piece_still_in_its_temp_file_is_not_listed(sealed):
    # Rank 1 may be mid-write of its piece while rank 0 lists the folder to hash its share.
    (sealed / f"..{MANIFEST_FILE}.rank1.4242.tmp").write_text("{")
    (sealed / f".{MANIFEST_FILE}.rank1").write_text("{}")
    assert _files_of(sealed) == ["model/mp_rank_00_model_states.pt", "rng_rank0.pt", "rng_rank1.pt"]


def _mark(path: str) -> None:
    Path(path).touch()


class Planted:
    """What someone with write access could leave in a checkpoint: unpickling it calls `_mark`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_mark, (self.marker,))


def test_every_load_while_resuming_refuses_pickled_code(sealed, tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"python": Planted(marker), "torch": torch.get_rng_state()}, sealed / "rng_rank0.pt")
    with pytest.raises(UserError, match="refused to load checkpoint .* could run code"):
        with _weights_only_loads(sealed):
            # A library's own load (DeepSpeed's) may ask for full unpickling: it is refused all the same.
            torch.load(sealed / "rng_rank0.pt", weights_only=False)
    assert not marker.exists()
