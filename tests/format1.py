"""Rewrite a Checkpoint 2.0 folder's metadata in format version 1 (every chunk listed, files inline) or 2 (unsealed).

Checkpoints written before format version 2 must keep loading, and the hostile-input
tests forge chunk lists and file entries, which only version 1 spells out.
"""

from __future__ import annotations

import json
from pathlib import Path

from resumable.formats import v2


def downgrade(folder: Path) -> dict:
    """Write ``folder/metadata.json`` as format version 1 from what it describes now; remove files.json."""
    meta = v2.read_metadata(folder)
    doc = {"format": v2.FORMAT, "format_version": 1, "iteration": meta.iteration,
           "layout": {"world_size": meta.layout.world_size, "mesh": meta.layout.mesh,
                      "pipeline_stages": meta.layout.pipeline_stages, "writers": meta.layout.writers},
           "save_optimizer": meta.save_optimizer,
           "tensors": {name: {"dtype": t.dtype, "shape": t.shape, "kind": t.kind,
                              "chunks": [{"offsets": list(box.offsets), "shape": list(box.shape),
                                          "stored": [{"file": s.file, "key": s.key} for s in copies]}
                                         for box, copies in meta.stored(name)]}
                       for name, t in meta.tensors.items()},
           "files": {n: {"size": f.size, "xxh3_64": f.xxh3_64, "kind": f.kind, "rank": f.rank}
                     for n, f in meta.files.items()}}
    (folder / v2.METADATA).write_text(json.dumps(doc))
    (folder / v2.FILES).unlink()
    return doc


def downgrade_to_2(folder: Path) -> dict:
    """Write ``folder/metadata.json`` as format version 2: no seal, common.json not recorded (files.json kept)."""
    doc = json.loads((folder / v2.METADATA).read_bytes())
    doc.pop("seal"), doc.pop("common")
    doc["format_version"] = 2
    (folder / v2.METADATA).write_text(json.dumps(doc, separators=(",", ":")))
    return doc


def sealed(doc: dict) -> str:
    """``doc`` (a parsed version-3 metadata.json, maybe edited) as metadata.json text with a fresh seal,
    as a forger who knows the format writes it."""
    return v2.seal(json.dumps({k: v for k, v in doc.items() if k != "seal"}, separators=(",", ":")))
