"""Built-in example shapes (small .npy files shipped with the package, made by make_examples.py).

    from fastlddmm.data import load_example, list_examples
    ex = load_example("face")      # {"source", "target", "edges", "target_edges", "faces", "description"}
    r = fl.register(torch.from_numpy(ex["source"]).float(), torch.from_numpy(ex["target"]).float())
"""

from __future__ import annotations

from importlib import resources

import numpy as np

__all__ = ["EXAMPLES", "list_examples", "load_example"]

EXAMPLES = {
    "face": "2-D face, smiling (source) -> neutral (target): 7 curves, 262 points, drawn as lines "
            "(point i of the source corresponds to point i of the target)",
    "blob": "3-D three-lobed column (source, a triangle mesh, 1500 points) -> a bent and twisted version "
            "sampled at 1400 other points (target)",
}


def list_examples() -> dict[str, str]:
    """Name -> one-line description of each built-in example."""
    return dict(EXAMPLES)


def _load(name: str) -> np.ndarray:
    with resources.files(__name__).joinpath(name).open("rb") as f:
        return np.load(f, allow_pickle=False)


def load_example(name: str) -> dict:
    """The example ``name`` as a dict of numpy arrays:

        source (N, D) float64, target (M, D) float64,
        edges (E, 2) int64 or None: segments of the source drawn as lines (curves),
        target_edges (E', 2) int64 or None: the same for the target,
        faces (F, 3) int64 or None: triangles of the source (a mesh),
        description: str.
    """
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; available: {', '.join(EXAMPLES)}")
    if name == "face":
        edges = _load("face_edges.npy")
        return {"source": _load("face_source.npy"), "target": _load("face_target.npy"), "edges": edges,
                "target_edges": edges, "faces": None, "description": EXAMPLES[name]}
    return {"source": _load("blob_source.npy"), "target": _load("blob_target.npy"), "edges": None,
            "target_edges": None, "faces": _load("blob_faces.npy"), "description": EXAMPLES[name]}
